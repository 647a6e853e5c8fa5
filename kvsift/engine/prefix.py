"""Full-cache KV of prompt prefixes, computed once and reused by many methods (prefix sharing).

Most methods do nothing during a prompt's prefill until its last chunk: they score with that
chunk's queries (snapkv, pyramidkv, tova), compress after the prefill (kvzip, kivi, shadowkv) or act
only at decode (quest, tokenselect). For them (:meth:`KVMethod.shares_prefix
<kvsift.methods.base.KVMethod.shares_prefix>`) the KV of every chunk before the last is exactly the
full cache's; a few build state of their own by then that does not depend on the budget (h2o's
accumulated attention: :meth:`KVMethod.prefix_state <kvsift.methods.base.KVMethod.prefix_state>`),
which the stored prefix then carries for that method at every budget. A :class:`PrefixStore` on
the runner (``llm.runner.prefix_store``) keeps that KV per prompt, so the next method that
prefills the same prompt with the same chunking starts at its last chunk. An evaluation grid
prefills each prompt about once instead of once per (method, budget) (``kvsift bench run
--share-prefix-gib G``). The engine's scheduler does not count the store's memory: it is a tool
for grids, set by their harness.

How the runner uses it (:meth:`ModelRunner._prefill_rows`; with a store, a sharing method's batch
is prefilled one sequence at a time): the *cut* of a row is the start of its last prefill chunk.
A row whose prefix is stored (same tokens before the cut, same chunk bounds there) starts from a
copy of it and runs the chunks from the cut on; otherwise the row runs from its start and its KV is
copied into the store when its prefill reaches the cut. Either way the row's forwards, chunk for
chunk, are those of a prefill without the store, so the tokens are the same as with
``prefill_mode="rows"`` and no store (tested for every sharing method).

Reread passes (kvzip's context reconstruction, about one more prefill per prompt) are the other
cost a grid repeats per budget. A method whose passes leave only budget-free per-layer state
(:meth:`KVMethod.reread_state <kvsift.methods.base.KVMethod.reread_state>`) has that state kept
here too, per prompt (:meth:`PrefixStore.get_reread` / :meth:`PrefixStore.put_reread`): a later
prefill of the same prompt runs its last chunk and installs a copy instead of rereading. The state
is what the passes would compute again (the same KV, the same forwards), so the tokens stay the
same.

Entries live on the model's device, up to ``max_bytes``. Once it is full, a new prefix takes the
room of entries of *another kind* (another ``prefix_state``: the full cache's KV alone, h2o's
prefixes, expected_attention's), least recently used first, and is refused when those do not
free enough: entries of its own kind are never evicted for it (a grid reads a prompt set's rows in
the same order cell after cell, so evicting the oldest of a kind would make every row miss). A
grid running one method after another over a prompt set thus keeps what the method at hand uses
(h2o's own prefixes replace the plain ones the methods before it used; a plain method after it
takes them back), until the owner calls :meth:`PrefixStore.clear` (the eval harness does when it
moves to the next prompt set).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from kvsift.cache import SiftCache


@dataclass(slots=True)
class PrefixStats:
    """Counters over a store's life: rows that started from a stored prefix (``hits``) or ran
    from their start (``misses``), prefixes stored, prefixes not stored for want of room, and
    prompt tokens not recomputed; entries dropped to make room for another kind (``evicted``); rows
    whose reread passes' state was reused (``reread_hits``) or computed (``reread_misses``)."""

    hits: int = 0
    misses: int = 0
    stored: int = 0
    refused: int = 0
    tokens_reused: int = 0
    evicted: int = 0
    reread_hits: int = 0
    reread_misses: int = 0


class PrefixStore:
    """Per-prompt full-cache KV up to a chunk boundary (see the module docstring).

    ``max_bytes``: bytes the entries (KV, carried method state and the reread passes' state) may
    take together (beyond that, new ones are not stored)."""

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.stats = PrefixStats()
        self._entries: OrderedDict[tuple, tuple[SiftCache, int]] = OrderedDict()
        self._rereads: dict[tuple, list[dict]] = {}   # key -> per layer, {state name: LayerState}

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(row: list[int], bounds: list[tuple[int, int]], state: Hashable | None = None) -> tuple:
        """The key of ``row``'s prefix made by the prefill chunks ``bounds`` (those ending at or
        before the cut): its tokens, the chunking that computed them and the method state it
        carries (``KVMethod.prefix_state``: None for the full cache's KV alone)."""
        cut = bounds[-1][1]
        return cut, tuple(bounds), _digest(row[:cut]), state

    def get(self, key: tuple, room: int) -> SiftCache | None:
        """A copy of the stored prefix (``room`` free slots per layer after it), or None."""
        hit = self._entries.get(key)
        if hit is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        self.stats.tokens_reused += key[0]
        return hit[0].clone(room=room)

    def put(self, key: tuple, cache: SiftCache) -> bool:
        """Keep a copy of ``cache`` (one row of plain KV, and method state only where ``key``
        names some) under ``key``; False when it is not kept (no room left, or not that)."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        stateful = key[-1] is not None
        if not all(ly.k_buf is None or (ly.k_buf.shape[0] == 1 and ly.ragged is None and ly.quant is None
                                        and (stateful or not ly.state) and ly.prefix is None and not ly.holes
                                        and not any(getattr(v, "offloaded", False) for v in ly.state.values()))
                   for ly in cache.layers):
            return False
        n = sum(2 * ly.keys.numel() * ly.keys.element_size() + ly.positions.numel() * ly.positions.element_size()
                + sum(v.nbytes()[0] for v in ly.state.values()) for ly in cache.layers if ly.k_buf is not None)
        if self.nbytes + n > self.max_bytes and not self._make_room(n, key[-1]):
            self.stats.refused += 1
            return False
        copy = cache.clone(room=0)
        self._entries[key] = (copy, n)
        self.nbytes += n
        self.stats.stored += 1
        return True

    def _make_room(self, n: int, state: Hashable | None) -> bool:
        """Evict prefixes whose kind (``prefix_state``) is not ``state``, least recently used first,
        until ``n`` more bytes fit; False (nothing evicted) when all of them would not be enough."""
        others = [k for k in self._entries if k[-1] != state]          # oldest use first
        if self.nbytes - sum(self._entries[k][1] for k in others) + n > self.max_bytes:
            return False
        for k in others:
            if self.nbytes + n <= self.max_bytes:
                break
            self.nbytes -= self._entries.pop(k)[1]
            self.stats.evicted += 1
        return True

    @staticmethod
    def reread_key(row: list[int], bounds: list[tuple[int, int]], passes: list[list[int]], state: Hashable) -> tuple:
        """The key of the state ``row``'s reread ``passes`` leave, prefilled in chunks ``bounds``, for
        a method whose :meth:`~kvsift.methods.base.KVMethod.reread_state` is ``state``."""
        return "reread", len(row), tuple(bounds), _digest(row, *passes), state

    def get_reread(self, key: tuple) -> list[dict] | None:
        """Copies of the per-layer states stored under ``key`` (one ``{name: LayerState}`` per
        layer), or None."""
        hit = self._rereads.get(key)
        if hit is None:
            self.stats.reread_misses += 1
            return None
        self.stats.reread_hits += 1
        return [{k: v.clone() for k, v in states.items()} for states in hit]

    def put_reread(self, key: tuple, layer_states: list[dict]) -> bool:
        """Keep copies of ``layer_states`` (each layer's ``state`` after the passes) under ``key``;
        False when there is no room (then nothing is kept)."""
        if key in self._rereads:
            return True
        if any(getattr(v, "offloaded", False) for states in layer_states for v in states.values()):
            return False
        n = sum(sum(v.nbytes()) for states in layer_states for v in states.values())
        if self.nbytes + n > self.max_bytes:
            self.stats.refused += 1
            return False
        self._rereads[key] = [{k: v.clone() for k, v in states.items()} for states in layer_states]
        self.nbytes += n
        return True

    def clear(self) -> None:
        """Drop every entry (their device memory is freed)."""
        self._entries.clear()
        self._rereads.clear()
        self.nbytes = 0


def _digest(*seqs: list[int]) -> str:
    """A 128-bit hash of token-id sequences (each as int64 bytes, ``|`` between them)."""
    h = hashlib.blake2b(digest_size=16)
    for i, s in enumerate(seqs):
        h.update((b"|" if i else b"") + torch.tensor(s, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()
