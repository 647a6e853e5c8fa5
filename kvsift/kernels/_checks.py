"""Argument checks shared by the kernels that score one decode query per row against a layer's
keys (``token_votes``, ``slot_scores``): clear ``ValueError``s before any work."""

from __future__ import annotations

import torch


def check_group_keys(q: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, n: str = "n") -> None:
    """``q (batch, q_heads, dim)``, ``keys (batch, kv_heads, n, dim)`` with ``q_heads`` a multiple
    of ``kv_heads``, and integer ``key_pos (batch, kv_heads, n)``; ``n`` names the slot axis in
    the messages."""
    if q.dim() != 3 or keys.dim() != 4:
        raise ValueError(f"q must be (batch, q_heads, dim) and keys (batch, kv_heads, {n}, dim), got "
                         f"{tuple(q.shape)} and {tuple(keys.shape)}")
    b, hq, d = q.shape
    if keys.shape[0] != b or keys.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and keys {tuple(keys.shape)} disagree on batch or dim")
    hk = keys.shape[1]
    if hk == 0 or hq % hk:
        raise ValueError(f"q_heads ({hq}) must be a multiple of kv_heads ({hk})")
    if tuple(key_pos.shape) != tuple(keys.shape[:3]) or key_pos.is_floating_point():
        raise ValueError(f"key_pos must be integers of shape (batch, kv_heads, {n}) = {tuple(keys.shape[:3])}, "
                         f"got {key_pos.dtype} {tuple(key_pos.shape)}")
