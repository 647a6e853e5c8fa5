"""``snapkv``: SnapKV (Li et al., 2024) - the last prompt tokens vote for the keys to keep.

The observation window (last ``window`` prompt queries) attends to every key; attention weights
are averaged over the window and over the query heads of each KV group (GQA-aware), smoothed by
1D pooling, and the top keys per KV head are kept together with the window itself.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvsift.methods.base import EvictionMethod, attention_blocks, module_scale, register


def window_attention_scores(query, keys, positions, window: int, scale: float) -> torch.Tensor:
    """Mean attention of the last ``window`` queries to each key.

    query ``(batch, q_heads, q, dim)``, keys ``(batch, kv_heads, n, dim)``, positions
    ``(batch, kv_heads, n)`` (the last ``window`` slots are the window's own tokens). Returns
    ``(batch, kv_heads, n)`` fp32, averaged over window queries and the heads of each group (a
    padding query counts as a zero row). The weights go through :func:`attention_blocks`, so their
    memory stays bounded for long prompts and large batches.
    """
    b, hq, _, _ = query.shape
    hk, n = keys.shape[1], keys.shape[2]
    w = min(window, query.shape[2], n)
    out = torch.zeros(b, hk, n, dtype=torch.float32, device=keys.device)
    qpos = positions[:, 0, -w:]                                           # (b, w): the window's own positions
    for _, weights in attention_blocks(query[:, :, -w:], keys, positions, qpos, scale):
        out += weights.sum(dim=(2, 3))
    return out / (w * (hq // hk))


@register("snapkv")
@dataclass(frozen=True)
class SnapKV(EvictionMethod):
    """SnapKV: observation-window attention, pooled, GQA-aware; keeps the window.

    Parameters
    ----------
    budget : int | float
        Tokens kept per layer and KV head after prefill (the window included).
    window : int
        Last prompt queries whose attention votes for the keys (always kept).
    kernel_size : int
        Odd width of the 1D pooling that smooths the votes (1: none).
    pooling : str
        ``avg`` or ``max`` pooling.
    """

    window: int = 32
    kernel_size: int = 7
    pooling: str = "avg"

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.window <= 4096:
            raise ValueError(f"window must be in [1, 4096], got {self.window}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")

    def min_last_chunk(self) -> int:
        return self.window

    def shares_prefix(self) -> bool:
        return True   # scores with the last chunk's window queries (pyramidkv too)

    def score(self, query, keys, values, positions, module, layer_idx):
        scale = module_scale(module, keys)
        s = window_attention_scores(query, keys, positions, self.window, scale)
        if self.kernel_size > 1:
            pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
            b, h, n = s.shape
            s = pool(s.reshape(b * h, 1, n), self.kernel_size, stride=1, padding=self.kernel_size // 2).reshape(b, h, n)
        w = min(self.window, query.shape[2], keys.shape[2])
        # the window itself is always kept (scores are attention weights <= 1), newest first when
        # the budget is smaller than the window (no tie for top-k to break arbitrarily)
        s[..., -w:] = 2.0 + torch.arange(w, device=s.device, dtype=s.dtype) / w
        return s
