"""``full``: the baseline, every token kept, plain attention."""

from dataclasses import dataclass

from kvsift.methods.base import KVMethod, register


@register("full")
@dataclass(frozen=True)
class Full(KVMethod):
    """Full KV cache (baseline): keeps every token."""

    needs_budget = False
