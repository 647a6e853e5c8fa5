"""Tiny random-weight models of real families, for fast tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gemma3")


def tiny_config(family: str = "llama", vocab_size: int = 49152, layers: int = 2, hidden: int = 64,
                heads: int = 4, kv_heads: int = 2, max_positions: int = 4096):
    """A small config of a real family: ``(layers, hidden, heads, kv_heads)``, GQA by default."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma3": Gemma3TextConfig}.get(family)
    if cls is None:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    kw = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
              head_dim=hidden // heads, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "mistral":
        kw["sliding_window"] = None
    if family == "gemma3":  # alternating local (sliding window 32) and global layers
        kw.update(sliding_window=32, query_pre_attn_scalar=hidden // heads,
                  layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    return cls(**kw)


def tiny_model(family: str = "llama", seed: int = 0, **kwargs):
    """A random-weight ``*ForCausalLM`` in fp32, eval mode. Weights are scaled up a little so that
    attention is peaky enough for eviction to matter."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **kwargs)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model.eval()


def save_tiny_model(path: str | Path, family: str = "llama", seed: int = 0, tokenizer=None, **kwargs) -> Path:
    """Write a tiny model (and a tokenizer, e.g. the default model's) as an HF directory."""
    path = Path(path)
    model = tiny_model(family, seed, **kwargs)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
