"""Distillation: the loss against a hand computation and PyTorch's own KL and cross-entropy; the
shallow student against the teacher's own blocks run by hand; the training loop on tiny models
(it learns, it is deterministic, a resumed run is bit-identical, checkpoints are safetensors)."""

import json
import math
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import llmlab
from llmlab import corpus, hf
from llmlab.compress import distill as d
from llmlab.compress.student import evenly_spaced_layers, make_student, shallow_student, student_dir
from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.eval import kl_divergence
from llmlab.llm import LLM, random_model
from llmlab.model import rope_cos_sin

CPU = torch.device("cpu")
TINY = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=1024)
FAST = d.DistillConfig(steps=6, batch=4, seq=16, lr=3e-3, min_lr=3e-4, warmup=2, temperature=2.0, alpha=0.7,
                       log_every=2, eval_every=3, checkpoint_every=3)


# --- the loss -----------------------------------------------------------------------------------

def hand_loss(z_s, z_t, y, T, alpha):
    """The docstring's formula with explicit loops over positions and tokens, in float64."""
    kl_sum = ce_sum = 0.0
    for s_row, t_row, target in zip(z_s, z_t, y):
        q = np.exp(s_row / T) / np.exp(s_row / T).sum()
        p = np.exp(t_row / T) / np.exp(t_row / T).sum()
        kl_sum += sum(p[i] * (math.log(p[i]) - math.log(q[i])) for i in range(len(p)))
        ce_sum += -math.log(math.exp(s_row[target]) / np.exp(s_row).sum())
    kl, ce = kl_sum / len(y), ce_sum / len(y)
    return alpha * T * T * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("T, alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.9), (0.5, 0.0)])
def test_loss_matches_a_hand_computation(T, alpha):
    z_s = np.array([[1.0, -0.5, 2.0, 0.0, 0.3], [0.2, 0.1, -1.0, 3.0, 0.0], [-2.0, 0.0, 0.5, 0.5, 1.0]])
    z_t = np.array([[0.5, 0.0, 2.5, -1.0, 0.3], [1.2, 0.1, -0.3, 2.0, 0.4], [-1.0, 0.2, 0.0, 1.5, 0.7]])
    y = [2, 3, 4]
    loss = d.distillation_loss(torch.tensor(z_s), torch.tensor(z_t), torch.tensor(y), T, alpha)
    expected = hand_loss(z_s, z_t, y, T, alpha)
    assert [x.item() for x in loss] == pytest.approx(expected, rel=1e-5)


def test_loss_matches_torch_kl_div_and_cross_entropy():
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(2, 7, 50, generator=g) * 3, torch.randn(2, 7, 50, generator=g) * 3
    y = torch.randint(0, 50, (2, 7), generator=g)
    T, alpha = 3.0, 0.6
    loss = d.distillation_loss(z_s, z_t, y, T, alpha)
    kl = F.kl_div((z_s / T).log_softmax(-1), (z_t / T).log_softmax(-1), log_target=True, reduction="sum") / 14
    ce = F.cross_entropy(z_s.reshape(-1, 50), y.reshape(-1))
    assert loss.kl.item() == pytest.approx(kl.item(), rel=1e-5)
    assert loss.ce.item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss.total.item() == pytest.approx((alpha * T * T * kl + (1 - alpha) * ce).item(), rel=1e-5)


def test_at_t1_and_alpha1_the_loss_is_the_plain_kl_divergence():
    g = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(9, 30, generator=g), torch.randn(9, 30, generator=g)
    loss = d.distillation_loss(z_s, z_t, torch.zeros(9, dtype=torch.long), temperature=1.0, alpha=1.0)
    assert loss.total.item() == loss.kl.item() == pytest.approx(kl_divergence(z_t, z_s), rel=1e-5)


def test_loss_is_zero_kl_when_the_student_is_the_teacher_and_refuses_bad_settings():
    z = torch.randn(4, 10)
    assert d.distillation_loss(z, z, torch.zeros(4, dtype=torch.long)).kl.abs().item() < 1e-6
    with pytest.raises(LlmlabError, match="temperature"):
        d.distillation_loss(z, z, torch.zeros(4, dtype=torch.long), temperature=0.0)
    with pytest.raises(LlmlabError, match="do not match"):
        d.distillation_loss(z, z[:3], torch.zeros(4, dtype=torch.long))


# --- students -----------------------------------------------------------------------------------

def test_evenly_spaced_layers_keep_the_first_and_the_last():
    assert evenly_spaced_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(LlmlabError):
        evenly_spaced_layers(4, 5)


@torch.inference_mode()
def test_half_depth_student_is_the_teacher_with_the_dropped_blocks_skipped(llm):
    student = make_student("half-depth", llm)
    keep = evenly_spaced_layers(30, 15)
    assert student.config.n_layers == 15 and student.tokenizer is llm.tokenizer
    tokens = torch.tensor([llm.tokenizer.encode("Now is the winter of our discontent")])
    teacher = llm.model
    cos, sin = rope_cos_sin(torch.arange(tokens.shape[1]), teacher.config.head_dim, teacher.config.rope_theta,
                            torch.float32)
    x = teacher.embed(tokens)
    for i in keep:                              # the teacher's own blocks, the dropped ones skipped
        x = teacher.layers[i](x, cos, sin, i, 0, None)
    reference = teacher.head(teacher.norm(x))
    torch.testing.assert_close(student.model(tokens), reference, rtol=0, atol=1e-5)
    # copies, not views: training the student must leave the teacher as it was
    assert student.model.layers[1].mlp.w_up.weight.data_ptr() != teacher.layers[2].mlp.w_up.weight.data_ptr()
    assert torch.equal(student.model.layers[1].mlp.w_up.weight, teacher.layers[2].mlp.w_up.weight)


def test_shallow_student_keeps_its_layers_own_widths():
    config = replace(TINY, layer_ffn_dims=(16, 32, 48), layer_heads=(4, 2, 4))
    teacher = LLM(random_model(config, torch.float32, CPU), None, "tiny")
    student = shallow_student(teacher, [0, 2])
    assert student.config.layer_ffn_dims == (16, 48) and student.config.layer_heads == (4, 4)
    with pytest.raises(LlmlabError, match="increasing"):
        shallow_student(teacher, [2, 0])


def test_student_dir_is_under_the_cache_and_refuses_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path))
    assert student_dir("half-depth") == tmp_path / "students" / "half-depth"
    with pytest.raises(LlmlabError):
        student_dir("../elsewhere")


def test_load_reads_a_student_by_name(llm, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path))
    with pytest.raises(LlmlabError, match="llmlab.compress.distill --name tiny"):
        llmlab.load("student:tiny")
    saved = LLM(random_model(replace(TINY, vocab_size=llm.config.vocab_size), torch.float32, CPU, seed=5),
                llm.tokenizer, "tiny")
    hf.save_folder(saved, student_dir("tiny"))
    student = llmlab.load("student:tiny")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(student.model(ids), saved.model(ids))


# --- training -----------------------------------------------------------------------------------

def tiny_pair(student_seed=2):
    """A random teacher with sharp next-token distributions (its tied embedding scaled up), and a
    one-layer random student to teach."""
    teacher = random_model(TINY, torch.float32, CPU, seed=1)
    with torch.no_grad():
        teacher.embed.weight.mul_(10)
    student = random_model(replace(TINY, n_layers=1), torch.float32, CPU, seed=student_seed)
    return LLM(teacher, None, "tiny teacher"), LLM(student, None, "tiny student")


# Text the tiny teacher writes itself (sampled, seeded): on it the teacher is a good model (perplexity
# about 1.7), so a student that learns the teacher's distributions scores better on it too.
TEXT = [0] + list(tiny_pair()[0].generate_ids([0], 599, temperature=1.0, seed=0, stop_ids=set()))
TRAIN_IDS, HELD_OUT = TEXT[:500], TEXT[500:]


def test_token_windows_visit_every_window_once_per_epoch():
    ids = torch.arange(51)          # (51 - 1) // 10 = 5 windows of 11 tokens
    windows = d.TokenWindows(ids, seq=10, batch=2, seed=0)
    starts = torch.cat([windows.batch_at(step)[:, 0] for step in range(5)]).tolist()      # 10 = 2 epochs
    assert sorted(starts[:5]) == sorted(starts[5:]) == [0, 10, 20, 30, 40]
    batch = windows.batch_at(0)
    assert torch.equal(batch, batch[:, :1] + torch.arange(11))           # consecutive tokens


def test_learning_rate_warms_up_then_decays_to_its_minimum():
    rates = [d.learning_rate(step, FAST) for step in range(1, FAST.steps + 1)]
    assert rates[0] == FAST.lr / 2 and rates[1] == FAST.lr
    assert rates[-1] == pytest.approx(FAST.min_lr) and rates == sorted(rates[:2]) + sorted(rates[2:], reverse=True)
    for wrong in ({"steps": 0}, {"min_lr": 1.0}, {"alpha": 1.5}, {"temperature": 0.0}):
        with pytest.raises(LlmlabError):
            replace(FAST, **wrong)


def test_training_lowers_the_loss_and_the_held_out_perplexity(tmp_path):
    teacher, student = tiny_pair()
    cfg = replace(FAST, steps=40, lr=1e-2, min_lr=1e-3, warmup=4, eval_every=40)
    log = d.distill(teacher, student, TRAIN_IDS, HELD_OUT, cfg, tmp_path, progress=False)
    total, kl = log["loss"]["total"], log["loss"]["kl"]
    assert len(total) == 40 and log["loss"]["step"] == list(range(1, 41))
    assert np.mean(total[-5:]) < 0.5 * np.mean(total[:5]) and np.mean(kl[-5:]) < 0.5 * np.mean(kl[:5])
    assert log["perplexity"]["step"] == [0, 40]
    before, after = log["perplexity"]["value"]
    assert after < before / 4                       # about 40 -> 3; the teacher's is 1.7
    assert json.loads((tmp_path / d.LOG).read_text())["loss"] == log["loss"]


def test_the_gpus_bf16_autocast_step_runs_and_learns_on_the_cpu_too():
    teacher, student = tiny_pair()
    cfg = replace(FAST, lr=1e-2)
    optimizer = d.make_optimizer(student.model, cfg)
    batch = d.TokenWindows(torch.tensor(TRAIN_IDS), cfg.seq, cfg.batch, seed=0).batch_at(0)
    losses = [d.train_step(student.model, teacher.model, batch, optimizer, cfg.lr, cfg, bf16=True)
              for _ in range(10)]
    assert all(p.dtype == torch.float32 for p in student.model.parameters())     # fp32 master weights
    assert losses[-1][0] < 0.7 * losses[0][0]


def weights(llm):
    return {name: p.detach().clone() for name, p in llm.model.named_parameters()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_two_runs_with_one_seed_end_with_identical_weights(tmp_path):
    runs = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        teacher, student = tiny_pair()
        cfg = replace(FAST, seed=seed)
        log = d.distill(teacher, student, TRAIN_IDS, None, cfg, tmp_path / run, progress=False)
        runs.append((weights(student), log["loss"]))
    assert_same_weights(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    assert runs[0][1] != runs[2][1]              # another seed: other windows, other losses


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    teacher, student = tiny_pair()
    whole = d.distill(teacher, student, TRAIN_IDS, HELD_OUT, FAST, tmp_path / "whole", progress=False)
    expected = weights(student)

    teacher, student = tiny_pair()
    first = d.distill(teacher, student, TRAIN_IDS, HELD_OUT, FAST, tmp_path / "split", until=4, progress=False)
    assert first["loss"]["step"] == [1, 2, 3, 4]
    # a student with other weights: only the checkpoint's can make the result match
    teacher, student = tiny_pair(student_seed=99)
    second = d.distill(teacher, student, TRAIN_IDS, HELD_OUT, FAST, tmp_path / "split", progress=False)
    assert_same_weights(weights(student), expected)
    assert second["loss"] == whole["loss"] and second["perplexity"] == whole["perplexity"]

    with pytest.raises(LlmlabError, match="other settings"):
        d.distill(teacher, student, TRAIN_IDS, HELD_OUT, replace(FAST, lr=1e-3),
                  tmp_path / "split", progress=False)


def test_checkpoints_are_safetensors_with_weights_and_optimizer_state(tmp_path):
    teacher, student = tiny_pair()
    d.distill(teacher, student, TRAIN_IDS, None, FAST, tmp_path, until=3, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [d.CHECKPOINT, d.LOG]
    raw = (tmp_path / d.CHECKPOINT).read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]           # safetensors: u64 length, JSON header, raw data
    header = json.loads(raw[8:8 + header_len])
    assert header["__metadata__"]["step"] == "3"
    names = set(header) - {"__metadata__"}
    assert {f"model.{n}" for n, _ in student.model.named_parameters()} <= names
    assert {"optimizer.0.exp_avg", "optimizer.0.exp_avg_sq", "optimizer.0.step"} <= names


def test_the_command_distils_saves_and_the_student_loads_back(llm, tmp_path, capsys):
    """The whole command on a tiny teacher that speaks SmolLM2's tokens: run half of it, resume,
    save; llmlab.load reads the student folder back with the trained weights."""
    config = replace(TINY, vocab_size=llm.config.vocab_size)
    hf.save_folder(LLM(random_model(config, torch.float32, CPU, seed=5), llm.tokenizer, "tiny"), tmp_path / "teacher")
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 600).astype(np.uint16)
    np.savez(tmp_path / "ids.npz", train=ids, held_out=ids[:50])
    argv = ["--teacher", str(tmp_path / "teacher"), "--student", "layers:0,2", "--data", str(tmp_path / "ids.npz"),
            "--out", str(tmp_path / "run"), "--steps", "4", "--batch", "2", "--seq", "16", "--eval-tokens", "50"]
    d.main(argv + ["--until", "2"])
    assert "stopped at step 2 of 4" in capsys.readouterr().out
    d.main(argv)
    student = llmlab.load(tmp_path / "run" / "student")
    assert student.config.n_layers == 2
    saved = load_file(tmp_path / "run" / d.CHECKPOINT)
    assert torch.equal(student.model.layers[1].mlp.w_down.weight, saved["model.layers.1.mlp.w_down.weight"])


def test_corpus_ids_round_trip_through_the_token_file(llm, tmp_path):
    written = d.write_corpus_ids(tmp_path / "ids.npz", llm.tokenizer)
    read = d.read_corpus_ids(tmp_path / "ids.npz")
    assert read["train"].dtype == np.uint16 and np.array_equal(read["train"], written["train"])
    assert len(read["train"]) > 2_000_000 and len(read["held_out"]) > 70_000
    assert llm.tokenizer.decode(read["held_out"][:200].tolist()) in corpus.held_out_text()
