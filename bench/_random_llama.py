"""A random-weight Llama-shaped model for the benches: on CUDA the Llama-3.1-8B shape (bf16), on the
CPU a narrow model (fp32): with the 8B's KV shape (8 KV heads of 128, so its KV per token and layer
is the 8B's) or a tiny one."""

from __future__ import annotations

import torch

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256)
CPU_8B_KV = dict(hidden_size=1024, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=8,
                 head_dim=128, vocab_size=1000)
CPU_TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)


def random_llama(layers: int, max_positions: int, cpu_shape: dict = CPU_8B_KV, seed: int = 0):
    """``(model, device)``: ``layers`` decoder layers, positions up to ``max_positions``, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=max_positions, rope_theta=500000.0,
                      **(LLAMA_8B if dev.type == "cuda" else cpu_shape))
    torch.manual_seed(seed)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    return model, dev
