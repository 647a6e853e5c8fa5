"""``pyramidkv``: PyramidKV (Cai et al., 2024) - SnapKV scores, pyramid-shaped layer budgets.

Lower layers attend broadly and keep more; upper layers concentrate and keep less. Budgets fall
linearly from ``2*avg - avg/beta`` (first layer) to ``avg/beta`` (last layer): the mean over
layers stays the requested budget, so total memory matches SnapKV at the same budget.
"""

from dataclasses import dataclass

from kvsift.methods.base import register
from kvsift.methods.snapkv import SnapKV


@register("pyramidkv")
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV: SnapKV scoring with budgets decreasing linearly over layers.

    Parameters
    ----------
    budget : int | float
        Mean tokens kept per layer and KV head (lower layers keep more, upper layers less).
    window : int
        SnapKV's observation window (last prompt queries, always kept).
    kernel_size : int
        Odd width of SnapKV's vote pooling.
    pooling : str
        ``avg`` or ``max`` pooling.
    beta : float
        Steepness: the last layer keeps ``budget / beta``, the first ``2 * budget - budget / beta``.
    """

    beta: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 1.0:
            raise ValueError(f"beta must be >= 1, got {self.beta}")

    def layer_budget(self, run, layer_idx: int) -> int:
        avg, n = run.tokens, run.num_layers
        if n <= 1:
            return avg
        low = avg / self.beta
        high = 2 * avg - low
        b = high - (high - low) * layer_idx / (n - 1)
        return max(1, min(run.prompt_len, round(b)))
