"""``minference``: MInference (Jiang et al., 2024, arXiv 2407.02490) - sparse prefill attention.

A prefill stage: it changes only how each prefill chunk attends (the KV is computed and kept as
with ``full``), so it runs alone (sparse prefill, every token kept for decode) or as the first
stage of a spec (``minference+snapkv``, ``minference+sentencekv``: the later stage evicts or
offloads at prefill end as it always does). Decode is untouched.

Each query head has one of three patterns (a per-model JSON chosen offline by
``kvsift minference search``; by default vertical-slash for every head):

* ``a_shape``: the first key block (attention sinks) plus the ``local`` keys before each query
  block (blocks, static);
* ``vertical_slash``: the ``vertical`` key columns and the ``slash`` diagonals (offsets
  ``query - key``) with the most attention from the chunk's last ``last_q`` queries (the paper's
  estimate, made per prefill chunk here; ``sample_q`` adds queries spread through the chunk); the
  diagonals are attended as the key blocks they cross, the columns one by one; the first column
  and the main diagonal are always in; with ``coverage`` a head keeps only as many of them as hold
  that share of the estimated attention;
* ``block_sparse``: for each query block of ``block`` rows, the ``top_blocks`` key blocks with the
  highest mean-pooled ``q . k`` (the diagonal blocks always in).

Every pattern becomes one index form (key blocks + columns per query block) that one kernel
attends (``kvsift/kernels/sparse_prefill_attention.py``: Triton on CUDA, the blockwise PyTorch
reference elsewhere). A chunk is sparse only when the prompt has at least ``dense_below`` tokens and
the engine asks (a fresh, unpadded chunk; reread passes and padded batches attend densely, so a
batch is prefilled row by row under ``prefill_mode='auto'``). With
every column / block selected (``vertical`` >= the prompt, ``top_blocks`` >= its blocks, ``local``
>= it) the output equals dense prefill.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from kvsift.errors import MethodOptionError
from kvsift.methods.base import KVMethod, Run, check_int_options, register

PATTERNS = ("a_shape", "vertical_slash", "block_sparse")
FORMAT = "kvsift-minference-patterns/1"


# ---- pattern files --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatternTable:
    """Per-head patterns of one model: ``layers[i][h]`` is query head ``h``'s pattern in layer ``i``."""

    model: str
    num_layers: int
    num_heads: int
    layers: tuple
    source: str = "built-in"

    def check(self, info) -> None:
        """``MethodOptionError`` unless the table fits the model ``info`` (name, layer and head counts)."""
        got = (info.name, info.num_layers, info.num_heads)
        want = (self.model, self.num_layers, self.num_heads)
        if got != want:
            raise MethodOptionError(
                f"minference patterns {self.source} are for model {self.model!r} ({self.num_layers} layers x "
                f"{self.num_heads} heads), not {info.name!r} ({info.num_layers} x {info.num_heads}); run "
                f"`kvsift minference search --model {info.name}` for this model, or patterns='default'",
                param="patterns")


def default_table(info) -> PatternTable:
    """Vertical-slash for every head (the paper's most common pattern)."""
    return PatternTable(info.name, info.num_layers, info.num_heads,
                        tuple(("vertical_slash",) * info.num_heads for _ in range(info.num_layers)))


def cache_path(model_name: str) -> Path:
    """Where ``kvsift minference search`` writes a model's patterns by default and where the method
    looks for them: ``$KVSIFT_CACHE/minference/<model>.json``."""
    from kvsift.models.registry import cache_root

    return cache_root() / "minference" / (re.sub(r"[^A-Za-z0-9._-]+", "_", model_name) + ".json")


def load_patterns(path: str | Path) -> PatternTable:
    """Read and check a pattern file (``MethodOptionError`` with the reason when it is not one)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MethodOptionError(f"minference patterns file not found: {p}", param="patterns") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MethodOptionError(f"minference patterns file {p} is not readable JSON: {e}", param="patterns") from None
    try:
        if data.get("format") != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}, got {data.get('format')!r}")
        model, nl, nh, layers = data["model"], data["num_layers"], data["num_heads"], data["layers"]
        if not isinstance(model, str) or not isinstance(nl, int) or not isinstance(nh, int):
            raise ValueError("model must be a string, num_layers and num_heads ints")
        if not isinstance(layers, list) or len(layers) != nl or any(
                not isinstance(row, list) or len(row) != nh for row in layers):
            raise ValueError(f"layers must be {nl} lists of {nh} pattern names")
        bad = sorted({x for row in layers for x in row if x not in PATTERNS}, key=str)
        if bad:
            raise ValueError(f"unknown pattern(s) {bad}; patterns: {', '.join(PATTERNS)}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise MethodOptionError(f"minference patterns file {p} is malformed: {e}", param="patterns") from None
    return PatternTable(model, nl, nh, tuple(tuple(row) for row in layers), source=str(p))


_TABLES: dict[tuple, PatternTable] = {}


def resolve_patterns(option: str | None, info) -> PatternTable:
    """The pattern table for ``option`` (a path, ``"default"``, or None: the cached file of the model
    when there is one, else the default) on the model ``info``, checked against it."""
    if option == "default":
        return default_table(info)
    path = Path(option) if option is not None else cache_path(info.name)
    if option is None and not path.is_file():
        return default_table(info)
    key = (str(path), path.stat().st_mtime_ns if path.is_file() else 0)
    table = _TABLES.get(key) or load_patterns(path)
    table.check(info)
    _TABLES[key] = table
    return table


# ---- index builders: (block mask (b, heads, n_qblocks, n_kblocks) bool, cols or None) -------------
def _qblock_slots(L: int, n: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last key slot of each query block's rows ``(n_qblocks,)`` (row r sits at slot n - L + r)."""
    s0 = torch.arange(0, L, block, device=device)
    return n - L + s0, n - L + torch.clamp(s0 + block, max=L) - 1


def a_shape_blocks(L: int, n: int, block: int, local: int, device) -> torch.Tensor:
    """``(n_qblocks, n_kblocks)`` bool: the first key block and the blocks within ``local`` keys
    before each query block (causal blocks only)."""
    s0, s1 = _qblock_slots(L, n, block, device)
    kb = torch.arange(-(-n // block), device=device)
    first, last = kb * block, kb * block + block - 1
    return (first[None] <= s1[:, None]) & ((kb[None] == 0) | (last[None] >= (s0 - local)[:, None]))


def _mark(mask: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor) -> None:
    """Set ``mask[..., idx]`` where ``ok`` (out-of-range entries go to a spare last column)."""
    mask.scatter_(-1, torch.where(ok, idx, mask.shape[-1] - 1), True)


def estimate_rows(L: int, last_q: int, sample_q: int, device) -> torch.Tensor:
    """The chunk rows whose attention estimates a vertical-slash index ``(r,)``: the last ``last_q``
    rows, and ``sample_q`` more spread evenly over the rows before them (their first included)."""
    lq = min(last_q, L)
    last = torch.arange(L - lq, L, device=device)
    if sample_q <= 0 or L - lq <= 0:
        return last
    spread = torch.linspace(0, L - lq - 1, min(sample_q, L - lq), device=device).round().long().unique()
    return torch.cat([spread, last])


def vertical_slash_index(q: torch.Tensor, k: torch.Tensor, n: int, last_q: int, vertical: int, slash: int,
                         block: int, scale: float, coverage: float | None = None,
                         sample_q: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's vertical-slash estimate for heads that share one KV head.

    q ``(batch, m, L, dim)`` the chunk's queries of ``m`` heads; k ``(batch, 1, n, dim)`` their KV
    head's keys. The last ``last_q`` queries' softmax attention (causal) is summed per key column
    and per diagonal ``offset = query slot - key slot``; the top ``vertical`` columns and top
    ``slash`` offsets are kept (column 0 and offset 0 always). With ``coverage`` (in (0, 1]) each
    head keeps only the shortest prefix of those, in that order, whose summed attention reaches
    ``coverage`` of the total (columns and diagonals each on their own, the sizes as caps; the
    cumulative-attention budget of FlexPrefill, arXiv 2502.20766): a head whose attention is
    concentrated lists few keys, a spread one up to the caps. ``sample_q`` more queries spread
    evenly over the rest of the chunk add their attention to the estimate (each row's softmax
    sums to one, so every estimating row weighs the same; :func:`estimate_rows`). Returns the
    slashes as key blocks ``(batch, m, n_qblocks, n_kblocks)`` bool and the columns not inside
    those blocks, per query block, ``(batch, m, n_qblocks, vertical)`` int32 (-1: none, or not
    causal for the block)."""
    b, m, L, _ = q.shape
    dev = q.device
    rows = estimate_rows(L, last_q, sample_q, dev)                              # (r,)
    r = rows.numel()
    qslot = n - L + rows
    kslot = torch.arange(n, device=dev)
    diag = qslot[:, None] - kslot[None, :]                                      # (r, n)
    causal = diag >= 0
    logits = torch.matmul(q[:, :, rows].float(), k.float().transpose(-1, -2)) * scale   # (b, m, r, n)
    a = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    vs = a.sum(2)                                                              # (b, m, n)
    ss = torch.zeros(b, m, n, device=dev).scatter_add_(
        2, diag.clamp(min=0).flatten().expand(b, m, r * n), (a * causal).flatten(2))
    cols, keep_c = _top_lines(vs, min(vertical, n), coverage)                   # (b, m, nv)
    offs, keep_s = _top_lines(ss, min(slash, n), coverage)                      # (b, m, ns)
    offs = torch.where(keep_s, offs, 0)             # a dropped diagonal becomes the main one (always in)
    cols = torch.where(keep_c, cols, n).sort(dim=-1).values                     # dropped ones last
    s0, s1 = _qblock_slots(L, n, block, dev)
    bm = slash_blocks(offs, L, n, block)
    cq = cols[:, :, None, :].expand(b, m, s0.numel(), cols.shape[-1])
    covered = bm.gather(3, cq.clamp(max=n - 1) // block)
    cq = torch.where(covered | (cq > s1[None, None, :, None]), -1, cq)          # dropped (n): past s1
    return bm, cq.to(torch.int32)


def _top_lines(mass: torch.Tensor, size: int, coverage: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``size`` lines (columns or diagonals) of ``mass (batch, m, n)`` with the most attention,
    line 0 first (always kept), then by mass: ``(indices, keep)``, both ``(batch, m, size)``. ``keep``
    is all True without ``coverage``; with it, True for the shortest prefix whose summed mass
    reaches ``coverage`` of the row's total (a line is kept while the mass before it falls short)."""
    ranked = mass.clone()
    ranked[..., 0] = float("inf")
    idx = ranked.topk(size, dim=-1).indices                                    # sorted by mass, line 0 first
    if coverage is None:
        return idx, torch.ones_like(idx, dtype=torch.bool)
    m = mass.gather(-1, idx)
    before = m.cumsum(-1) - m
    return idx, before < coverage * mass.sum(-1, keepdim=True)


def slash_blocks(offs: torch.Tensor, L: int, n: int, block: int) -> torch.Tensor:
    """The key blocks the diagonals ``offs (batch, m, ns)`` (``query slot - key slot``, in ``[0,
    n)``) cross in each query block of a chunk of ``L`` queries over ``n`` keys: ``(batch, m,
    n_qblocks, n_kblocks)`` bool. A diagonal meets a query block in the key block of its first row
    and in that of its last (each clamped to the first key block, and only where the last row
    reaches it), as MInference's kernel attends it.

    A whole query block ``i`` starts at slot ``n - L + i * block``, so diagonal ``o`` crosses key
    blocks ``i + (n - L - o) // block`` and ``i + (n - L + block - 1 - o) // block``: the same
    block diagonals for every query block. They are marked once per head (``2 * ns`` writes) and
    read back per query block, instead of ``2 * ns`` writes per query block; a last, partial query
    block (``L`` not a multiple of ``block``) is marked directly."""
    b, m, _ = offs.shape
    dev = offs.device
    nqb, nkb = -(-L // block), -(-n // block)
    base = n - L
    dmin = (base - (n - 1)) // block                                            # the lowest block diagonal
    size = (base + block - 1) // block - dmin + 1
    diag = torch.zeros(b, m, size + 1, dtype=torch.bool, device=dev)           # (last: always False)
    for first in (0, block - 1):
        diag.scatter_(-1, torch.div(base + first - offs, block, rounding_mode="floor") - dmin, True)
    rel = torch.arange(nkb, device=dev)[None, :] - torch.arange(nqb, device=dev)[:, None] - dmin   # (nqb, nkb)
    bm = diag[:, :, torch.where((rel >= 0) & (rel < size), rel, size)]        # (b, m, nqb, nkb)
    if L % block:   # the last query block ends early: its last row's blocks differ
        s0, s1 = base + (nqb - 1) * block, n - 1
        row = torch.zeros(b, m, nkb + 1, dtype=torch.bool, device=dev)
        hi = s1 - offs
        _mark(row, (s0 - offs).clamp(min=0) // block, hi >= 0)
        _mark(row, hi.clamp(min=0) // block, hi >= 0)
        bm[:, :, -1] = row[..., :nkb]
    return bm


def block_sparse_blocks(q: torch.Tensor, k: torch.Tensor, n: int, top_blocks: int, block: int,
                        scale: float) -> torch.Tensor:
    """For heads sharing one KV head (q ``(batch, m, L, dim)``, k ``(batch, 1, n, dim)``): each query
    block's ``top_blocks`` causal key blocks by mean-pooled ``q . k`` (the blocks holding the query
    block's own slots always in). Returns ``(batch, m, n_qblocks, n_kblocks)`` bool."""
    b, m, L, d = q.shape
    dev = q.device
    nqb, nkb = -(-L // block), -(-n // block)
    pq = torch.nn.functional.pad(q.float(), (0, 0, 0, nqb * block - L)).view(b, m, nqb, block, d).sum(3)
    pq = pq / torch.clamp(L - torch.arange(nqb, device=dev) * block, max=block)[:, None]
    pk = torch.nn.functional.pad(k.float(), (0, 0, 0, nkb * block - n)).view(b, 1, nkb, block, d).sum(3)
    pk = pk / torch.clamp(n - torch.arange(nkb, device=dev) * block, max=block)[:, None]
    sc = torch.matmul(pq, pk.transpose(-1, -2)) * scale                         # (b, m, nqb, nkb)
    s0, s1 = _qblock_slots(L, n, block, dev)
    kb = torch.arange(nkb, device=dev)
    sc = sc.masked_fill(kb[None] * block > s1[:, None], float("-inf"))
    own = (kb[None] == (s0 // block)[:, None]) | (kb[None] == (s1 // block)[:, None])
    sc = sc.masked_fill(own, float("inf"))
    top = sc.topk(min(top_blocks, nkb), dim=-1)
    bm = torch.zeros(b, m, nqb, nkb + 1, dtype=torch.bool, device=dev)
    _mark(bm, top.indices, top.values > float("-inf"))
    return bm[..., :nkb]


@dataclass
class MInferenceRun(Run):
    """Counters: prefill chunk-layers attended sparsely / densely (``dense``: not asked, e.g. a
    short prompt; ``fallback``: an index too dense to pay), and the summed fraction of the causal
    keys the sparse ones listed (device tensor)."""

    sparse: int = 0
    dense: int = 0
    density: torch.Tensor | None = None
    fallback: int = 0   # chunk-layers whose index listed more than max_density: attended densely


@register("minference")
@dataclass(frozen=True)
class MInference(KVMethod):
    """MInference: sparse prefill attention per head (A-shape, vertical-slash, block-sparse); full KV kept.

    Parameters
    ----------
    budget : None
        Not used (a prefill stage keeps every token; a later stage's budget applies to it).
    last_q : int
        Last queries of each prefill chunk whose attention estimates the vertical-slash index (64 in the paper).
    sample_q : int
        More estimating queries, spread evenly over the chunk's rows before the last ``last_q`` (0,
        the default: the paper's estimate). The last queries see every key of the chunk but attend
        as the chunk's end does; rows spread through it add the columns and diagonals the earlier
        rows attend (the index is one per head for the whole chunk).
    vertical : int
        Key columns (vertical lines) per vertical-slash head.
    slash : int
        Diagonals (slash lines) per vertical-slash head.
    block : int
        Block size of queries and keys (16, 32, 64 or 128).
    top_blocks : int
        Key blocks per query block for block-sparse heads (at least 2: the diagonal blocks are always in).
    local : int
        Local window (keys) of A-shape heads, after the first block of sinks.
    patterns : str | None
        Per-head pattern JSON (``kvsift minference search``); None: the model's file under
        $KVSIFT_CACHE/minference when there is one, else vertical-slash for every head; 'default': that.
    min_len : int | None
        Prompts shorter than this (tokens) run dense prefill, without building an index. None (the
        default): where the sizes alone already list about ``max_density`` of the causal keys, the
        length ``n`` at which ``c = vertical + slash`` keys per row give a mean density
        ``2c/n - (c/n)**2`` equal to it (``dense_below``; 43,444 tokens at the defaults). On the
        real Qwen2.5-Coder-1.5B at 16k-30k the index listed 0.68-0.93 of the keys: every chunk fell
        back to dense after paying for its index (0.57-0.69x ``full``'s prefill, H200).
    dense_tail : int
        The prompt's last this many tokens (where a question usually is) attend every causal key
        densely; the rest of the prompt stays sparse. 0 (the default): the paper's prefill, every
        row sparse. On the real 1.5B at 16k-30k, forced-sparse prefill lost ``qa`` samples to
        ``sentencekv`` and never won one (5 to 0); on the 0.5B at 4k (CPU, four settings) 256
        dense tail tokens turned 10 wrong ``qa`` answers right and none wrong; on the 1.5B at
        16k-30k (H200, vertical-slash everywhere, 10%) 256 took ``minference+sentencekv`` from -1.7
        to -1.1 points of ``sentencekv``, 240 paired samples, neither significant (docs/eval.md).
    coverage : float | None
        Vertical-slash heads keep, of their ``vertical`` columns and ``slash`` diagonals (now caps),
        only the shortest top-ranked prefix whose estimated attention (the estimating queries': the
        last ``last_q`` and the ``sample_q`` spread ones) reaches this fraction of the total,
        columns and diagonals each on their own (FlexPrefill's cumulative-attention budget, arXiv
        2502.20766): concentrated heads list few keys, spread ones up to the caps. None (the
        default): always the caps, as in the paper. It does not move ``dense_below`` (worked out
        from the caps): set ``min_len`` to go sparse on shorter prompts.
    max_density : float
        A chunk whose index lists more than this fraction of its causal keys (mean over heads and
        rows) is attended densely instead (the index is built first; 1.0: always sparse, as in the
        paper). At 128k on an H200 the sparse kernel plus its index cost as much as dense attention
        at about 0.3-0.4 (``bench/minference_prefill.py``); random-weight models list nearly every key.
    """

    needs_budget: ClassVar[bool] = False
    attention_only: ClassVar[bool] = True
    path_options: ClassVar[tuple] = ("patterns",)  # names a local file: the server refuses it from requests
    last_q: int = 64
    sample_q: int = 0
    vertical: int = 1000
    slash: int = 6096
    block: int = 64
    top_blocks: int = 100
    local: int = 4096
    patterns: str | None = None
    min_len: int | None = None
    dense_tail: int = 0
    coverage: float | None = None
    max_density: float = 0.3

    def __post_init__(self):
        super().__post_init__()
        check_int_options(self, {"last_q": 1, "sample_q": 0, "vertical": 1, "slash": 1, "top_blocks": 2, "local": 0,
                                 "dense_tail": 0, **({"min_len": 0} if self.min_len is not None else {})},
                          "minference option ")
        md = self.max_density
        if isinstance(md, bool) or not isinstance(md, (int, float)) or not 0 < md <= 1:
            raise MethodOptionError(f"minference option max_density must be a number in (0, 1], got {md!r}",
                                    param="max_density")
        object.__setattr__(self, "max_density", float(md))
        cv = self.coverage
        if cv is not None:
            if isinstance(cv, bool) or not isinstance(cv, (int, float)) or not 0 < cv <= 1:
                raise MethodOptionError(f"minference option coverage must be a number in (0, 1] or None, got {cv!r}",
                                        param="coverage")
            object.__setattr__(self, "coverage", float(cv))
        from kvsift.kernels.sparse_prefill_attention import BLOCKS

        if isinstance(self.block, bool) or self.block not in BLOCKS:
            raise MethodOptionError(f"minference option block must be one of {BLOCKS}, got {self.block!r}",
                                    param="block")
        if self.patterns is not None:
            if not isinstance(self.patterns, (str, os.PathLike)):
                raise MethodOptionError(f"minference option patterns must be a path or 'default', got "
                                        f"{self.patterns!r}", param="patterns")
            object.__setattr__(self, "patterns", os.fspath(self.patterns))
            if self.patterns != "default":
                load_patterns(self.patterns)  # a missing or malformed file: an error now, not at prefill

    @property
    def dense_below(self) -> int:
        """Prompts shorter than this prefill densely: ``min_len``, or (None) the length ``n`` where
        ``c = vertical + slash`` listed keys per row reach a mean density of ``max_density`` over the
        ``n`` causal rows (``sum_r min(r, c) / sum_r r ~ 2c/n - (c/n)**2``), below which the index
        could hardly go under ``max_density`` and its cost would be spent for a dense fallback."""
        if self.min_len is not None:
            return self.min_len
        return math.ceil((self.vertical + self.slash) / (1.0 - math.sqrt(1.0 - self.max_density)))

    def start(self, prompt_len: int, num_layers: int) -> MInferenceRun:
        run = super().start(prompt_len, num_layers)
        return MInferenceRun(run.tokens, prompt_len, num_layers)

    def check_model(self, info) -> None:
        tp = getattr(info, "tp_size", 1)
        if tp > 1 and self.patterns != "default" and (self.patterns is not None or cache_path(info.name).is_file()):
            from kvsift.errors import TensorParallelError

            # a file lists the model's heads; each rank holds only its own (not mapped yet)
            raise TensorParallelError(f"minference pattern files are not split over tensor-parallel ranks yet: use "
                                      f"patterns='default' with tensor_parallel={tp}", param="patterns")
        resolve_patterns(self.patterns, info)

    def row_prefill_ok(self) -> bool:
        # no state; a batch prefilled row by row has no padded chunk, and only unpadded chunks go sparse
        return True

    def joins_rows(self) -> bool:
        return True  # only the prefill's attention changes; every token is kept and decoded densely

    def prefill_attention(self, run, layer, query, keys, values, scale, module, ctx):
        if run.prompt_len < self.dense_below or ctx.rereading:
            run.dense += 1
            return None
        from kvsift.kernels.dispatch import sparse_prefill_attention

        table = _lookup(self.patterns, ctx.model_name)
        heads = table.layers[layer.layer_idx] if table is not None else ("vertical_slash",) * query.shape[1]
        block_idx, cols = self.index(query, keys, heads, scale, prompt_end(run, ctx))
        d = listed_fraction(block_idx, cols, query.shape[2], keys.shape[2], self.block)
        # (building the index synced the host already: reading d waits only for its own few small kernels)
        if self.max_density < 1.0 and float(d) > self.max_density:
            run.fallback += 1
            return None
        run.sparse += 1
        run.density = d if run.density is None else run.density + d
        return sparse_prefill_attention(query, keys, values, block_idx, cols, scale, self.block)

    def index(self, query: torch.Tensor, keys: torch.Tensor, heads, scale: float, prompt_len: int | None = None):
        """The chunk's index under per-head ``heads`` (one pattern name per query head): query
        ``(batch, q_heads, L, dim)``, keys ``(batch, kv_heads, n, dim)``. Returns ``(block_idx
        (batch, q_heads, n_qblocks, kb) int32, cols (batch, q_heads, n_qblocks, nc) int32 or None)``
        for :func:`~kvsift.kernels.dispatch.sparse_prefill_attention`. With ``dense_tail`` and the
        prompt's length, the query blocks holding any of its last ``dense_tail`` tokens list every
        causal key block (and no columns)."""
        b, hq, L, _ = query.shape
        hk, n = keys.shape[1], keys.shape[2]
        g = hq // hk
        B, dev = self.block, query.device
        nqb, nkb = -(-L // B), -(-n // B)
        bm = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool, device=dev)
        vs = [h for h in range(hq) if heads[h] == "vertical_slash"]
        nv = min(self.vertical, n)
        cols = torch.full((b, hq, nqb, nv), -1, dtype=torch.int32, device=dev) if vs else None
        ash = [h for h in range(hq) if heads[h] == "a_shape"]
        if ash:
            bm[:, ash] = a_shape_blocks(L, n, B, self.local, dev)
        for kh in range(hk):
            group = range(kh * g, kh * g + g)
            for pat in ("vertical_slash", "block_sparse"):
                hs = [h for h in group if heads[h] == pat]
                if not hs:
                    continue
                q, k = query[:, hs], keys[:, kh:kh + 1]
                if pat == "vertical_slash":
                    bm[:, hs], cols[:, hs] = vertical_slash_index(q, k, n, self.last_q, nv, self.slash, B, scale,
                                                                         self.coverage, self.sample_q)
                else:
                    bm[:, hs] = block_sparse_blocks(q, k, n, self.top_blocks, B, scale)
        if self.dense_tail and prompt_len is not None:
            _, s1 = _qblock_slots(L, n, B, dev)                        # the rows' slots are their positions
            tail = s1 >= prompt_len - self.dense_tail                   # (nqb,)
            causal = torch.arange(nkb, device=dev)[None, :] * B <= s1[:, None]   # (nqb, nkb)
            bm |= (tail[:, None] & causal)[None, None]
            if cols is not None:
                cols.masked_fill_(tail[None, None, :, None], -1)
        return blocks_to_index(bm), cols

    def stats(self, run) -> dict:
        out = {"minference_sparse_chunks": run.sparse, "minference_dense_chunks": run.dense,
               "minference_fallback_chunks": run.fallback}
        if run.sparse:
            out["minference_density"] = round(float(run.density) / run.sparse, 4)
        return out


def prompt_end(run: Run, ctx) -> int:
    """The position after the prompt's last token for the row being prefilled: a batch prefilled
    row by row (``ctx.row``) holds one row's ids in ``ctx.prompt_ids``, at positions from 0 (the
    run's ``prompt_len`` is the longest row's); else (one sequence, after a context when there is
    one) the run's ``prompt_len``."""
    if ctx is not None and ctx.row is not None and ctx.prompt_ids:
        return len(ctx.prompt_ids[0])
    return run.prompt_len


def _lookup(option: str | None, model_name: str | None) -> PatternTable | None:
    """The table ``check_model`` resolved for this option and model (None: the built-in default,
    also when the model's name is unknown and no file is given)."""
    if option == "default" or (option is None and model_name is None):
        return None
    path = Path(option) if option is not None else cache_path(model_name)
    if not path.is_file():
        return None
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _TABLES:
        _TABLES[key] = load_patterns(path)
    return _TABLES[key]


def blocks_to_index(bm: torch.Tensor) -> torch.Tensor:
    """``(..., n_kblocks)`` bool -> ``(..., kb)`` int32 sorted block indices, -1 padded (kb: the
    most any row lists). Each listed block goes to its rank among the row's listed ones (a running
    count, one scatter: no sort)."""
    nkb = bm.shape[-1]
    width = max(1, int(bm.sum(-1).max())) if bm.numel() else 1
    ar = torch.arange(nkb, device=bm.device, dtype=torch.int32).expand(bm.shape)
    rank = bm.cumsum(-1, dtype=torch.int32) - 1
    out = torch.full((*bm.shape[:-1], width + 1), -1, dtype=torch.int32, device=bm.device)
    out.scatter_(-1, torch.where(bm, rank, width).long(), ar)      # unlisted blocks: the spare column
    return out[..., :width].contiguous()


def listed_fraction(block_idx: torch.Tensor, cols: torch.Tensor | None, L: int, n: int, block: int) -> torch.Tensor:
    """Keys listed per query (whole blocks + columns, an upper bound of those attended) over the mean
    causal keys per query, averaged over heads and rows: a 0-dim device tensor (no host sync)."""
    listed = (block_idx >= 0).sum(-1).float() * block
    if cols is not None:
        listed = listed + (cols >= 0).sum(-1).float()
    causal = n - L + (L + 1) / 2
    return (listed.mean() / causal).clamp(max=1.0)
