"""``squeezed``: Squeezed Attention (Hooper et al., 2024, arXiv 2411.09688) - for reusable contexts
(prefill once, ask many): cluster the context's keys offline, attend only the best clusters.

At prefill end (once per context, per layer and KV head) the keys are clustered by k-means on their
directions (``iters`` Lloyd steps, about ``cluster_size`` tokens per cluster), and the layer's
slots are reordered so that every cluster is contiguous (attention masks come from positions, so
the order of slots carries no meaning). Each cluster keeps the mean of its keys as its centroid.

At decode the query scores the centroids (``q . centroid``, the mean ``q . k`` over the cluster's
tokens; GQA groups reduced by ``reduce``), each page of ``page`` slots takes the best score of the
clusters it holds, and the best ``budget // page`` pages are attended, read in place through a slot
table, together with every token after the clustered context (the question and the generated
tokens). The clustering is done once: a question prefilled over a context (``generate(question,
context=ctx)``, the server's ``/v1/contexts``) keeps the context's clusters, and they persist with
it. The full KV stays on the device: this saves reads, not memory. With a budget of the whole
context every page is attended and the output equals ``full``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsift.kernels.dispatch import chunk_scores
from kvsift.methods.base import DecodeSelect, LayerState, Selection, register, select_pages


@dataclass
class SqueezedState(LayerState):
    """One layer's clusters: ``centroids (batch, kv_heads, clusters, head_dim)`` (mean keys),
    ``labels (batch, kv_heads, n)`` int64 cluster of each clustered slot (``-1``: padding), and
    ``n`` the clustered slots (the context; later slots are always attended). Rows stacked into a
    running batch (:meth:`Squeezed.restack_state`) each keep their own clusters: ``row_n (batch,)``
    int64 is then where each row's clustered slots end and its always-attended slots begin (its
    own decode tokens, the padding after them, the batch's common decode slots), ``n`` the largest
    and ``tail_from`` the smallest of them."""

    centroids: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    n: int = 0
    row_n: torch.Tensor | None = None
    tail_from: int = 0
    planner: ClassVar[bool] = True  # answering from a context should use this method


def kmeans_directions(keys: torch.Tensor, valid: torch.Tensor, clusters: int, iters: int,
                      block: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of ``keys (batch, kv_heads, n, dim)`` by cosine similarity (``valid (batch,
    kv_heads, n)`` bool: the slots to cluster), seeded with evenly spaced slots. Returns ``labels
    (batch, kv_heads, n)`` int64 (``-1`` for invalid slots) and the mean raw key of each cluster
    ``(batch, kv_heads, clusters, dim)`` float32 (an empty cluster keeps its seed)."""
    b, h, n, d = keys.shape
    kf = keys.float()
    kn = torch.nn.functional.normalize(kf, dim=-1)
    seeds = torch.linspace(0, n - 1, clusters, device=keys.device).round().long()
    cent = kn[:, :, seeds].clone()                                            # (b, h, C, d) unit
    labels = torch.zeros(b, h, n, dtype=torch.int64, device=keys.device)
    for it in range(iters + 1):
        for s in range(0, n, block):                                         # (b, h, block, C) at a time
            labels[:, :, s:s + block] = torch.matmul(kn[:, :, s:s + block], cent.transpose(-1, -2)).argmax(-1)
        lab = torch.where(valid, labels, clusters)                           # invalid -> a dummy cluster
        if it == iters:
            break
        sums = torch.zeros(b, h, clusters + 1, d, device=keys.device).scatter_add_(
            2, lab[..., None].expand(b, h, n, d), kn)
        new = torch.nn.functional.normalize(sums[:, :, :clusters], dim=-1)
        empty = sums[:, :, :clusters].abs().sum(-1, keepdim=True) == 0
        cent = torch.where(empty, cent, new)
    sums = torch.zeros(b, h, clusters + 1, d, device=keys.device).scatter_add_(2, lab[..., None].expand(b, h, n, d), kf)
    cnt = torch.zeros(b, h, clusters + 1, device=keys.device).scatter_add_(2, lab, torch.ones_like(kf[..., 0]))
    means = sums[:, :, :clusters] / cnt[:, :, :clusters, None].clamp(min=1)
    return torch.where(valid, labels, -1), means


@register("squeezed")
@dataclass(frozen=True)
class Squeezed(DecodeSelect):
    """Squeezed Attention: k-means clusters of a context's keys; decode attends the best clusters.

    Parameters
    ----------
    budget : int | float
        Context tokens attended per layer and KV head at each decode step (``budget // page``
        pages of cluster-sorted slots), on top of the tokens after the context.
    cluster_size : int
        Mean tokens per cluster (clusters = context tokens // cluster_size).
    iters : int
        Lloyd iterations of the k-means at prefill end.
    page : int
        Slots per page of the cluster-sorted layout (the unit of selection).
    reduce : str
        How the query heads of a GQA group combine their centroid scores: ``max`` or ``mean``.
    decode_budget : int | float | None
        Tokens attended at decode when composed after an eviction (default: ``budget``).
    """

    cluster_size: int = 32
    iters: int = 8
    page: int = 16
    reduce: str = "max"

    def __post_init__(self):
        super().__post_init__()
        if not 2 <= self.cluster_size <= 65536:
            raise ValueError(f"cluster_size must be in [2, 65536], got {self.cluster_size}")
        if not 0 <= self.iters <= 100:
            raise ValueError(f"iters must be in [0, 100], got {self.iters}")
        if not 1 <= self.page <= 256:
            raise ValueError(f"page must be in [1, 256], got {self.page}")
        if self.reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {self.reduce!r}")

    def prefill_end(self, run, layer, query, module, ctx) -> None:
        """Cluster the layer's keys and sort its slots by cluster (once: a question prefilled over
        a clustered context keeps the context's clusters)."""
        if layer.k_buf is None or layer.length == 0 or self.name in layer.state:
            return
        keys, pos = layer.keys, layer.positions
        n = keys.shape[2]
        clusters = max(1, n // self.cluster_size)
        valid = pos >= 0
        labels, cent = kmeans_directions(keys, valid, clusters, self.iters)
        big = torch.iinfo(torch.int64).max // 4
        order = torch.where(valid, labels * (n + 1) + pos.to(torch.int64), big).argsort(dim=-1)
        layer.keep(order)
        layer.state[self.name] = SqueezedState(cent.to(keys.dtype), labels.gather(2, order), n)

    def quantized_ok(self) -> bool:
        return False  # its clusters index the layer's key buffer

    def chunk_invariant(self) -> bool:
        """False: its k-means at the prefill's end is discontinuous, so keys that differ in the last
        bits (a prompt prefilled in other chunk widths) can fall into other clusters."""
        return False

    def shares_prefix(self) -> bool:
        return True   # clusters the keys at the prefill's end (rows prefilled apart: restack_state)

    def joins_rows(self) -> bool:
        """Rows stacked into a running batch select as alone: each keeps its own clusters and
        attends everything after its own clustered slots (:meth:`restack_state`)."""
        return True

    def join_token(self, run) -> int:
        return run.sel_tokens  # the tokens attended per step: joined rows must share it

    def restack_state(self, layer, sources) -> None:
        """After ``SiftLayer.set_rows`` stacked ``sources`` (``(source layer, row)`` each, in the new
        batch's order): every row's slots start with its clustered ones (the cluster-sorted prompt,
        left padding dropped), so its labels and centroids carry over as they are, padded to the
        batch's largest; ``row_n`` says where each row's clustered slots end (host syncs: once per
        layer and row at a join)."""
        rows = []
        for src, i in sources:
            st: SqueezedState | None = src.state.get(self.name)
            if st is None:
                layer.state.pop(self.name, None)   # not clustered yet: nothing to carry
                return
            n_i = int(st.row_n[i]) if st.row_n is not None else int((st.labels[i, 0] >= 0).sum())
            rows.append((st.centroids[i], st.labels[i, :, :n_i], n_i))
        b, (hk, _, d) = len(rows), rows[0][0].shape
        n = max(r[2] for r in rows)
        c = max(r[0].shape[1] for r in rows)
        cent = rows[0][0].new_zeros(b, hk, c, d)
        labels = torch.full((b, hk, n), -1, dtype=torch.int64, device=cent.device)
        for j, (ce, la, n_i) in enumerate(rows):
            cent[j, :, : ce.shape[1]] = ce
            labels[j, :, :n_i] = la
        row_n = torch.tensor([r[2] for r in rows], dtype=torch.int64, device=cent.device)
        layer.state[self.name] = SqueezedState(cent, labels, n, row_n, min(r[2] for r in rows))

    def plan(self, run, layer, query, ctx):
        st: SqueezedState | None = layer.state.get(self.name)
        if not ctx.decoding or st is None:
            return None
        n0, page = st.n, self.page
        pages = math.ceil(n0 / page)
        cs = chunk_scores(query[:, :, -1].to(st.centroids.dtype), st.centroids, self.reduce)   # (b, hk, C)
        per_slot = torch.where(st.labels >= 0, cs.gather(2, st.labels.clamp(min=0)), float("-inf"))
        pad = pages * page - n0
        if pad:
            per_slot = torch.nn.functional.pad(per_slot, (0, pad), value=float("-inf"))
        b, hk = per_slot.shape[:2]
        scores = per_slot.view(b, hk, pages, page).amax(-1)                  # (b, hk, pages)
        k = min(pages, run.sel_tokens // page)
        # each row attends every slot after its own clustered ones (one row: after the context)
        tail, tail_from = (n0, n0) if st.row_n is None else (st.row_n[:, None, None], st.tail_from)
        width = (layer.k_buf.shape[2] if ctx.cache.static else layer.length) - tail_from
        own = select_pages(scores, k, page, tail, width)                     # past the buffer: skipped
        sel = own[..., : k * page]
        own[..., : k * page] = torch.where(sel >= tail, -1, sel)            # a last partial page's tail slots
        return Selection(own=own)
