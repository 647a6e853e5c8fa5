"""Shared fixtures: tiny random models of real families and the bundled default model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer (converted once from the bundled GGUF, then cached)."""
    from transformers import AutoTokenizer

    from kvsift.models.loader import _convert_gguf, default_model_path

    return AutoTokenizer.from_pretrained(_convert_gguf(default_model_path()))


@pytest.fixture(scope="session")
def tiny_llms(default_tokenizer):
    """family -> LLM over a tiny random-weight model (GQA: 4 q heads, 2 kv heads)."""
    from kvsift import LLM
    from kvsift.models import tiny_model

    return {f: LLM.from_model(tiny_model(f, seed=1), default_tokenizer, name=f"tiny-{f}", chunk_size=64)
            for f in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def tiny_llm(tiny_llms):
    return tiny_llms["llama"]


@pytest.fixture(scope="session")
def real_llm():
    """The bundled default model, SmolLM2-135M-Instruct (loaded once per test session)."""
    from kvsift import LLM

    return LLM()


def random_prompt(n: int, seed: int = 0, vocab: int = 49152) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()
