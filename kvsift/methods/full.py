"""``full``: the baseline, every token kept, plain attention."""

from dataclasses import dataclass

from kvsift.methods.base import KVMethod, register


@register("full")
@dataclass(frozen=True)
class Full(KVMethod):
    """Full KV cache (baseline): keeps every token.

    Parameters
    ----------
    budget : None
        Not used: every token is kept.
    """

    needs_budget = False

    def reads_context_in_place(self) -> bool:
        return True  # attends to every slot as it is: a reused context is read by reference

    def chunk_invariant(self) -> bool:
        return True

    def shares_prefix(self) -> bool:
        return True

    def joins_rows(self) -> bool:
        return True  # attends to every slot: rows prefilled apart stack exactly (left padding)

    def pads_exactly(self) -> bool:
        return True  # each row attends to its own tokens only
