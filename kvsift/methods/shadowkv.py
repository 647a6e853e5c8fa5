"""``shadowkv``: ShadowKV (Sun et al., 2024, arXiv 2410.21465) - low-rank keys on the device, values
on the host, sparse chunks rebuilt at decode.

Prefill (``prefill_end``, per layer, right after the layer attended over the whole prompt). The
prompt of each row is cut into the ``sinks`` first tokens, the ``window`` last ones and the middle,
in chunks of ``chunk`` consecutive positions (the last one may be shorter):

1. the middle's keys are rotated back to pre-RoPE (``ForwardContext.rope``, the model's own rotary
   embedding; keys stay as they are without one) and factorized per layer and row over the KV heads
   of a token together: ``K (tokens, kv_heads * head_dim) ~= A B`` with ``A (tokens, r)`` and ``B (r,
   kv_heads * head_dim)`` the top ``r = min(rank, kv_heads * head_dim)`` right singular vectors
   (an eigendecomposition of ``K^T K`` in float64: exact at a full rank). ``A`` and ``B`` stay on
   the device, the keys themselves are not kept;
2. every chunk gets a landmark per KV head, the mean of its post-RoPE keys (on the device);
3. the ``outliers`` chunks per KV head whose keys are least like their landmark (lowest cosine
   similarity of a key to the chunk's mean) stay on the device in full, with the sinks and the
   window (the layer's own buffer, where generated tokens are appended);
4. the values (and positions) of the other middle chunks move to the host: sentencekv's
   :class:`~kvsift.methods._offload.ChunkStore` as a values-only store (``keys=False``), which also
   keeps the landmarks.

Decode (``plan``, once per layer per step): the query scores every offloaded chunk by ``q .
landmark`` (the query heads of a GQA group averaged), the best chunks within the budget are picked;
their keys are rebuilt on the device (``A`` rows times ``B``, RoPE applied at the chunks' positions)
and their values fetched from the host; the token attends over them (a
:class:`~kvsift.methods.base.SlotSource`, the ``extra`` of a selection) plus the whole own buffer
(sinks, outliers, window, generated tokens), masked by positions as every selection.

Budget: ``budget`` is the number of prompt tokens attended per layer and KV head at each step:
sinks + window + outlier chunks + selected chunks. With a budget of the whole prompt every chunk
is selected, and with a full rank (``rank >= kv_heads * head_dim``) the output equals ``full``.

Device bytes: ``A`` (``r`` numbers per middle token instead of ``2 * kv_heads * head_dim``), ``B``,
the landmarks (one key per chunk and KV head), sinks, window and outliers in full; the values and
positions of the offloaded chunks are host bytes.

A prompt read row by row (``ctx.row``) writes each row into the batch's state (one host store, one
``A`` with room for the longest prompt). A reused context keeps what it offloaded; the question's
tokens stay on the device. ``shadowkv`` composes only after a prefill attention stage
(``minference+shadowkv``): an eviction before it would keep different tokens per KV head, which the
joint factorization cannot hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kvsift.errors import MethodOptionError
from kvsift.kernels.dispatch import chunk_scores, topk_select
from kvsift.methods._offload import ChunkStore, FetchStats
from kvsift.methods.base import KVMethod, LayerState, Run, Selection, SlotSource, check_int_options, register
from kvsift.methods.expected_attention import rotate_half


# ---- low-rank keys ---------------------------------------------------------------------------------
GRAM_BLOCK = 8192
"""Rows of the keys cast to float64 at a time for their Gram matrix (bounds the prefill's memory)."""


def low_rank(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (batch, n, D)`` float -> ``(A (batch, n, r), B (batch, r, D))`` in ``x``'s dtype with ``A @ B``
    the best rank-``r`` approximation of ``x`` (``r = min(rank, D)``, Eckart-Young): ``B`` the top
    right singular vectors (eigenvectors of ``x^T x``, accumulated in float64 over blocks of
    :data:`GRAM_BLOCK` rows), ``A = x B^T``. Zero rows (padding) change nothing; at a full rank ``B``
    is orthogonal and ``A @ B`` is ``x`` up to rounding."""
    b, n, D = x.shape
    r = min(rank, D)
    gram = torch.zeros(b, D, D, dtype=torch.float64, device=x.device)
    for s in range(0, n, GRAM_BLOCK):
        xs = x[:, s:s + GRAM_BLOCK].double()
        gram += xs.transpose(1, 2) @ xs
    _, vecs = torch.linalg.eigh(gram)                                       # ascending eigenvalues
    v = vecs[..., -r:].flip(-1)                                             # (batch, D, r)
    return x @ v.to(x.dtype), v.transpose(1, 2).to(x.dtype).contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it, with ``cos``/``sin`` of ``x``'s shape."""
    return x * cos + rotate_half(x) * sin


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`apply_rope` (the rope's ``attention_scaling`` divided out)."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def rope_at(rope, positions: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` float32 of shape ``(*positions.shape, head_dim)`` at ``positions (batch, ...)``
    (negative ones read position 0: they are masked anyway)."""
    b = positions.shape[0]
    cos, sin = rope(positions.clamp(min=0).reshape(b, -1), layer_idx)
    shape = (*positions.shape, cos.shape[-1])
    return cos.float().reshape(shape), sin.float().reshape(shape)


def softmax_max_scores(q: torch.Tensor, landmarks: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """The paper's chunk scores: ``q (batch, q_heads, head_dim)`` against ``landmarks (batch,
    kv_heads, n, head_dim)``, each query head's softmax over the ``n`` chunks (scaled by
    ``head_dim ** -0.5``; ``empty (batch, kv_heads, n)`` chunks left out), the largest over the
    query heads of each GQA group. Returns ``(batch, kv_heads, n)`` float32."""
    b, hq, d = q.shape
    hk = landmarks.shape[1]
    s = torch.einsum("bhgd,bhnd->bhgn", q.float().view(b, hk, hq // hk, d), landmarks.float()) * d ** -0.5
    s = s.masked_fill(empty[:, :, None], float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0).amax(2)


# ---- state -----------------------------------------------------------------------------------------
@dataclass
class ShadowKVState(LayerState):
    """One layer's ShadowKV state: the values-only host store (its device landmarks ``mean``, chunk
    lengths: 0 for a head's outlier chunks, kept on the device), the low-rank factors of the middle's
    pre-RoPE keys ``a (batch, rows, r)`` (row ``i``: position ``first + i``) and ``b (batch,
    kv_heads, r, head_dim)``, ``first`` (the first middle position: the sinks kept), ``rope``
    (whether keys were rotated back, i.e. the model has a rotary embedding) and ``dev_tokens`` (the
    fewest prompt tokens a KV head keeps on the device)."""

    store: ChunkStore | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    first: int = 0
    rope: bool = True
    dev_tokens: int = 0

    @property
    def offloaded(self) -> bool:
        return self.store is not None and self.store.n > 0

    @property
    def rank(self) -> int:
        return 0 if self.a is None else self.a.shape[-1]

    def keys(self, chunks: torch.Tensor, positions: torch.Tensor, rope, layer_idx: int) -> torch.Tensor:
        """Post-RoPE keys ``(batch, kv_heads, k * chunk, head_dim)`` of chunks ``(batch, kv_heads, k)``
        (``-1`` = none), rebuilt from the factors and rotated at ``positions (batch, kv_heads, k *
        chunk)`` (``-1`` = none: zeros)."""
        b, hk, k = chunks.shape
        L = self.store.L
        rows = (chunks[..., None] * L + torch.arange(L, device=chunks.device)).view(b, hk, k * L)
        rows = torch.where(positions >= 0, rows, 0).clamp(max=self.a.shape[1] - 1)
        # whole rows of the factor, indexed by row (one offset per row), not gathered with the index
        # expanded to every value (31 of a 225 ms CPU step at 16k tokens: see slot_rows)
        bi = torch.arange(b, device=rows.device)[:, None]
        coef = self.a[bi, rows.view(b, hk * k * L)].view(b, hk, k * L, -1)
        pre = torch.matmul(coef.float(), self.b.float())                   # (b, hk, k * L, d)
        if self.rope and rope is not None:
            cos, sin = rope_at(rope, positions, layer_idx)
            pre = apply_rope(pre, cos, sin)
        return torch.where(positions[..., None] >= 0, pre, 0).to(self.b.dtype)


@dataclass
class ShadowKVRun(Run):
    """One generation's ShadowKV counters: host fetches and decode steps (device counter)."""

    fetch: FetchStats = field(default_factory=FetchStats)
    steps: Any = None


@register("shadowkv")
@dataclass(frozen=True)
class ShadowKV(KVMethod):
    """ShadowKV: low-rank pre-RoPE keys and chunk landmarks on the device, values on the host.

    Parameters
    ----------
    budget : int | float
        Prompt tokens attended per layer and KV head at each decode step (sinks + window + outlier
        chunks + selected chunks).
    rank : int | float
        Rank of the keys' factorization per layer (over the KV heads of a token together; 160 in the
        paper for 8 KV heads of 128). At ``kv_heads * head_dim`` or more it is exact. A float in
        (0, 1) is a fraction of that key width (``0.15625`` is the paper's 160 of 1,024 on any
        model, e.g. rank 20 for 2 KV heads of 64).
    chunk : int
        Tokens per chunk (landmarks, outliers and selection are per chunk; 8 in the paper).
    outliers : int
        Chunks per layer and KV head whose keys are least like their landmark, kept whole on the
        device (at most half of the budget left after sinks and window).
    window : int
        Last prompt tokens kept on the device.
    sinks : int
        First prompt tokens kept on the device.
    score : str
        How a decode query scores the chunks: ``mean`` (the query heads of a GQA group averaged, one
        dot with each landmark) or ``softmax_max`` (the paper's: each query head's softmax over the
        chunks' landmarks, the largest over the group).
    sparse_budget : bool
        The budget counts the selected chunks' tokens only, as the paper's sparse budget does
        (sinks, window and ``outliers`` chunks are kept on top of it); by default it counts every
        prompt token attended. The paper's settings: ``rank=160, chunk=8, outliers=48, window=32,
        score="softmax_max", sparse_budget=True`` at a budget of 1.56% of the prompt.
    """

    rank: int | float = 160
    chunk: int = 8
    outliers: int = 8
    window: int = 32
    sinks: int = 4
    score: str = "mean"
    sparse_budget: bool = False
    composes = False   # one factorization for every KV head of a token: no per-head eviction before

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.rank, float) and not isinstance(self.rank, bool):
            if not 0 < self.rank < 1:
                raise MethodOptionError(f"method 'shadowkv': rank must be an int >= 1 or a fraction of the key "
                                        f"width in (0, 1), got {self.rank!r}", param="rank")
            check_int_options(self, {"chunk": 1, "outliers": 0, "window": 0, "sinks": 0}, "method 'shadowkv': ")
        else:
            check_int_options(self, {"rank": 1, "chunk": 1, "outliers": 0, "window": 0, "sinks": 0},
                              "method 'shadowkv': ")
        if self.chunk > 256:
            raise MethodOptionError(f"method 'shadowkv': chunk must be at most 256 tokens, got {self.chunk}",
                                    param="chunk")
        if self.score not in ("mean", "softmax_max"):
            raise MethodOptionError(f"method 'shadowkv': score must be 'mean' or 'softmax_max', got {self.score!r}",
                                    param="score")
        if not isinstance(self.sparse_budget, bool):
            raise MethodOptionError(f"method 'shadowkv': sparse_budget must be true or false, got {self.sparse_budget!r}",
                                    param="sparse_budget")

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, prompt_len: int, num_layers: int) -> ShadowKVRun:
        base = super().start(prompt_len, num_layers)
        return ShadowKVRun(base.tokens, prompt_len, num_layers)

    def key_rank(self, width: int) -> int:
        """The factorization's rank for keys of ``width`` channels per token (``kv_heads *
        head_dim``): ``rank``, or ``rank * width`` (at least 1) for a fraction; at most ``width``."""
        r = max(1, round(self.rank * width)) if isinstance(self.rank, float) else self.rank
        return min(r, width)

    def sizes(self, tokens: int) -> tuple[int, int, int]:
        """``(sinks, window, outlier chunks)`` within a budget of ``tokens``: sinks first, then the
        window, then outlier chunks in at most half of what is left (the rest selects chunks). With
        ``sparse_budget`` the budget is the selection's alone: the options as they are."""
        if self.sparse_budget:
            return self.sinks, self.window, self.outliers
        sinks = min(self.sinks, tokens)
        window = min(self.window, tokens - sinks)
        return sinks, window, min(self.outliers, (tokens - sinks - window) // (2 * self.chunk))

    def row_prefill_ok(self) -> bool:
        return True  # one state for the batch, each row written into it

    def shares_prefix(self) -> bool:
        return True  # factors keys and offloads values at the prefill's end

    def offloads_to_host(self) -> bool:
        return True  # the middle chunks' values live in the host store

    def host_share(self, head_dim=None) -> float:
        return 0.5  # values (and positions) only: about half of each token's KV, a lower bound

    def device_tokens(self, run, prompt_len: int, info=None) -> int:
        """The budget's tokens whole, plus every prompt token's low-rank key factor (``rank`` values
        of the ``kv_heads * head_dim`` key width) and landmark share (the width over ``chunk``
        tokens), counted as tokens of full KV (keys and values: twice the width). Without the
        model's shape: the whole prompt (an upper bound)."""
        if info is None:
            return prompt_len
        width = info.num_kv_heads * info.head_dim
        share = (self.key_rank(width) + width / self.chunk) / (2 * width)
        return min(prompt_len, run.tokens + math.ceil(prompt_len * share))

    def quantized_ok(self) -> bool:
        return False  # it keeps KV in its own layout (factors, host values)

    def joins_rows(self) -> bool:
        """A joining request is prefilled alone into its own store and factors; the running batch's
        rows are then stacked with it (:meth:`restack_state`): the host rows read where they are,
        each row's factors and chunk tables carried over as they are."""
        return True

    def join_token(self, run) -> int:
        return run.tokens  # the batch run's budget sizes the sinks, window and selection: rows share it

    def restack_state(self, layer, sources) -> None:
        """The running batch's rows changed (``sources``: ``(source layer, row)`` in the new order):
        one values store over the rows' own (``ChunkStore.stack``, nothing copied), each row's
        key factors ``a`` (padded to the most middle rows) and ``b``, the fewest device prompt
        tokens of the rows that offloaded (equal for prompts with a full middle)."""
        states = [(src.state.get(self.name), row) for src, row in sources]
        ref = next((st for st, _ in states if st is not None), None)
        if ref is None:
            return
        new = ShadowKVState(first=ref.first, rope=ref.rope)
        # each row's state where it offloaded (a store and factors, built together at its prefill)
        off = [st if st is not None and st.store is not None and st.a is not None else None for st, _ in states]
        held = [st for st in off if st is not None]
        if held:
            new.store = ChunkStore.stack([(st.store if st is not None else None, row)
                                          for st, (_, row) in zip(off, states)])
            rows = max(st.a.shape[1] for st in held)
            new.a = held[0].a.new_zeros(len(states), rows, held[0].a.shape[-1])
            new.b = held[0].b.new_zeros(len(states), *held[0].b.shape[1:])
            for i, (st, (_, row)) in enumerate(zip(off, states)):
                if st is not None:
                    new.a[i, : st.a.shape[1]] = st.a[row]
                    new.b[i] = st.b[row]
            new.dev_tokens = min(st.dev_tokens for st in held)
        else:
            new.dev_tokens = min(st.dev_tokens for st, _ in states if st is not None)
        layer.state[self.name] = new

    # ---- prefill: factorize, summarise, offload ---------------------------------------------
    def prefill_end(self, run, layer, query, module, ctx) -> None:
        if layer.k_buf is None or layer.length == 0:
            return
        row = ctx.row if ctx is not None else None
        states = ctx.row_states[layer.layer_idx] if row is not None else layer.state
        if row is None and self.name in states:
            return  # a reused context answering a question: what it offloaded stays, the question stays here
        keys, values, pos = layer.keys, layer.values, layer.positions         # (b, hk, n, d), (b, hk, n)
        b, hk, n, d = keys.shape
        batch, r0 = (row[1], row[0]) if row is not None else (b, 0)
        C = self.chunk
        sinks, window, n_out = self.sizes(run.tokens)
        p = pos[:, 0].to(torch.int64)                                         # (b, n): every head holds the same tokens
        row_len = p.amax(-1) + 1                                              # (b,)
        mid_len = (row_len - sinks - window).clamp(min=0)                     # (b,) middle tokens per row
        nc = int(math.ceil(int(mid_len.max()) / C))
        st = states.get(self.name)
        if st is None:
            st = states[self.name] = ShadowKVState(first=sinks, rope=ctx is not None and ctx.rope is not None)
        if nc == 0:  # nothing to offload: every token stays on the device
            st.dev_tokens = self._fewest(st, int((pos >= 0).sum(-1).min()), row)
            return
        N = nc * C
        # the middle in position order: row i of a batch row holds position sinks + i
        mid = (p >= sinks) & (p < (sinks + mid_len)[:, None])                 # (b, n)
        dst = torch.where(mid, p - sinks, N)                                  # (b, n), N: a scratch row
        gi = dst[:, None, :, None].expand(b, hk, n, d)
        post = keys.new_zeros(b, hk, N + 1, d).scatter_(2, gi, keys)[:, :, :N]
        vals = values.new_zeros(b, hk, N + 1, d).scatter_(2, gi, values)[:, :, :N]
        ar = torch.arange(N, device=keys.device)
        valid = ar < mid_len[:, None]                                         # (b, N)
        mpos = torch.where(valid, sinks + ar, -1).to(torch.int32)             # (b, N)
        # 1. low-rank pre-RoPE keys, every KV head of a token together
        pre = post.float()
        if st.rope:
            cos, sin = rope_at(ctx.rope, mpos[:, None].expand(b, hk, N), layer.layer_idx)
            pre = undo_rope(pre, cos, sin)
        pre = torch.where(valid[:, None, :, None], pre, 0)
        fa, fb = low_rank(pre.permute(0, 2, 1, 3).reshape(b, N, hk * d), self.key_rank(hk * d))
        r = fb.shape[1]
        fb = fb.view(b, r, hk, d).permute(0, 2, 1, 3)                         # (b, hk, r, d)
        # 2-3. outlier chunks: the lowest cosine similarity of a key to its chunk's mean key
        ck = post.float().view(b, hk, nc, C, d)
        cvalid = valid.view(b, 1, nc, C)
        mean = (ck * cvalid[..., None]).sum(3) / cvalid.sum(3, keepdim=True).clamp(min=1)
        sim = torch.nn.functional.cosine_similarity(ck, mean[:, :, :, None], dim=-1)   # (b, hk, nc, C)
        worst = torch.where(cvalid, sim, float("inf")).amin(3)                # (b, hk, nc)
        worst = worst.masked_fill(~cvalid.any(3), float("inf"))
        out = torch.zeros(b, hk, nc, dtype=torch.bool, device=keys.device)
        if n_out:
            sel = (-worst).topk(min(n_out, nc), dim=-1)
            out.scatter_(2, sel.indices, torch.isfinite(sel.values))
        # 4. the values of the other middle chunks to the host (the store keeps their landmarks)
        store = st.store
        if store is None:
            store = st.store = ChunkStore(batch, hk, C, d, keys.dtype, keys.device, cache_chunks=0, keys=False,
                                          capacity=run.prompt_len if row is not None else 0)
            rows_cap = N if row is None else int(math.ceil(max(0, run.prompt_len - sinks - window) / C)) * C
            st.a = torch.zeros(batch, max(rows_cap, N), r, dtype=keys.dtype, device=keys.device)
            st.b = torch.zeros(batch, hk, r, d, dtype=keys.dtype, device=keys.device)
        if st.a.shape[1] < N:  # a row longer than the room made for it
            st.a = torch.cat([st.a, st.a.new_zeros(batch, N - st.a.shape[1], r)], 1)
        st.a[r0:r0 + b, :N] = fa.to(st.a.dtype)
        st.b[r0:r0 + b] = fb.to(st.b.dtype)
        tok_out = out.repeat_interleave(C, -1)                                # (b, hk, N)
        offl = valid[:, None] & ~tok_out                                      # (b, hk, N)
        nz = offl.nonzero(as_tuple=True)                                      # (bi, hi, i)
        i = nz[2]
        store.append(post[nz], vals[nz], mpos[nz[0], i], (nz[0] + r0) * hk + nz[1], i // C, i % C, nc,
                     row=r0 if row is not None else None)
        # the device keeps sinks, window and outlier chunks (+ room for generated tokens), by position
        slot_out = out.gather(2, (dst.clamp(max=N - 1) // C)[:, None].expand(b, hk, n))
        keep = (pos >= 0) & ~(mid[:, None] & ~slot_out)                       # (b, hk, n)
        m = int(keep.sum(-1).max())
        big = torch.iinfo(torch.int64).max
        order = torch.where(keep, pos.to(torch.int64), big).argsort(dim=-1)[..., :m]
        kvalid = keep.gather(-1, order)
        gk = order[..., None].expand(b, hk, m, d)
        layer.set_kv(keys.gather(2, gk), values.gather(2, gk), torch.where(kvalid, pos.gather(-1, order), -1))
        st.dev_tokens = self._fewest(st, int(keep.sum(-1).min()), row)

    @staticmethod
    def _fewest(st: ShadowKVState, dev: int, row) -> int:
        """The fewest prompt tokens a head keeps on the device (rows one at a time: over all rows)."""
        return min(dev, st.dev_tokens) if row is not None and row[0] > 0 else dev

    # ---- decode: score, select, rebuild keys, fetch values ----------------------------------------
    def plan(self, run, layer, query, ctx):
        if ctx.decoding and layer.layer_idx == 0:  # decode steps, counted on the device
            if run.steps is None:
                run.steps = torch.zeros(1, dtype=torch.int64, device=query.device)
            run.steps.add_(1)
        st: ShadowKVState | None = layer.state.get(self.name)
        store = st.store if st is not None else None
        if store is None or store.n == 0:
            return None
        b, hk, n = store.b, store.hk, store.n
        budget = run.tokens if self.sparse_budget else run.tokens - st.dev_tokens
        if not ctx.decoding or budget >= store.max_tokens:  # prefill over a reused context, or every chunk fits
            idx = torch.arange(n, device=query.device).expand(b, hk, n)
        else:
            k = min(n, budget // store.L)
            if k <= 0:
                return None  # the budget holds the device tokens only
            mean = store.mean[:, :, :n]
            empty = store.lens[:, :, :n] == 0                                  # a head's outliers
            if self.score == "softmax_max":
                scores = softmax_max_scores(query[:, :, -1], mean, empty)
            else:
                scores = chunk_scores(query[:, :, -1].to(mean.dtype), mean, "mean")
            idx = topk_select(scores.masked_fill(empty, float("-inf")), k, torch.int64)
        _, values, pos = store.fetch(idx, run.fetch if ctx.decoding else None)
        keys = st.keys(idx, pos, ctx.rope, layer.layer_idx)
        slots = torch.where(pos >= 0, torch.arange(pos.shape[-1], device=pos.device, dtype=torch.int32), -1)
        return Selection(extra=SlotSource(keys, values, pos, slots))

    def stats(self, run) -> dict[str, Any]:
        f = run.fetch
        if f.value("calls") == 0:
            return {}
        steps = max(1, int(run.steps.item()) if run.steps is not None else 0)
        return {"chunks_selected_per_head": f.value("chunks") / max(1, f.value("head_calls")),
                "fetch_mib_per_step": f.value("copied_bytes") / steps / 2**20,
                "fetch_ms_per_step": 1000.0 * f.fetch_s / steps}
