"""Decode attention on a GPU: selected (score + top-k + sparse attention) vs dense SDPA.

Llama-3.1-8B attention shape: 32 q heads, 8 kv heads, head_dim 128, bf16. For each batch and
context length it times, per layer:

* ``dense_gqa``: ``F.scaled_dot_product_attention(q (b,32,1,d), k, v, enable_gqa=True)``;
* ``dense_grp``: SDPA with the group folded into the query length, ``q (b,8,4,d)`` (what
  kvsift's engine does), no KV repeat;
* ``ours_all``: our sparse kernel with every slot selected (a flash-decoding kernel through an
  index table: how close it gets to the HBM roofline);
* ``sel/<summary>/<budget>``: chunk scores (Triton) + top-k (torch) + slot expansion + sparse
  attention (Triton), pages of ``--page`` tokens; summaries ``quest`` (min/max bounds),
  ``quest8`` (the same bounds as int8 codes, ``quest``'s ``bounds="int8"``) and ``mean`` (mean
  keys); plus the parts alone (``score``, ``topk``, ``attn``);
* ``sel/tokens/<budget>``: TokenSelect's step (soft votes over every key, ``dispatch.token_votes``,
  top-k tokens, sparse attention); with its selection cache, ``sel/tokens_cache_new`` (a step that
  selects anew: the decision's launch, ``dispatch.query_reuse``, then the long-row top-k in its
  blocked form, which can skip rows, written in place into the kept selection) and
  ``sel/tokens_cache_reused`` (every row reuses its last selection: the vote and top-k kernels
  return at once). A run at reuse rate ``r`` costs about ``r * reused + (1 - r) * new`` per step.
  ``topk_tokens`` times the dispatch's top-k of a long row alone (its blocked form since
  2026-12-04), beside ``topk_tokens_sort`` (``torch.topk`` and the ascending sort, its path before),
  ``topk_tokens_pad64`` (the same votes and 64 unselectable slots more, as the engine's static
  buffer holds its decode slots: a second level of blocks since 2026-12-05, ``torch.topk`` and a
  sort before), ``topk_tokens_torch`` (``torch.topk`` alone, unsorted) and ``topk_tokens_radix<B>`` (the radix
  select of ``kvsift/kernels/topk_radix.py`` over blocks of ``B``); ``sel/tokens_radix`` the step
  with it (end to end: a system ``<spec>@radix``);
* ``topk_one`` / ``topk_blocked<blk>`` and ``sel/quest_one`` / ``sel/quest_blocked<blk>``: Quest's
  page top-k alone and in its step, one program per row or in blocks of ``blk`` pages
  (``topk_select.TUNING["block_from"]``; ``topk`` and ``sel/quest`` are the dispatch's default);
  ``topk_pad_one`` / ``topk_pad_blocked1024`` the same over the rows the engine makes, the pages of
  a 1,024-slot decode reserve after the prompt's (just past a power of two).
* ``sel/quest_refine<N>/<budget>``: Quest with ``refine=N`` (``--refine``): page scores, the best
  ``N * budget // page`` pages, the exact ``q . k`` at their slots (``dispatch.slot_scores``), the
  best ``budget`` tokens (``topk_select``), sparse attention; ``sel/quest_refine<N>_torch`` the
  same stage as PyTorch (a gather, an einsum in the keys' dtype, ``torch.topk``, a sort: the
  method's path before 2026-12-05) and ``slot_scores<N>`` the exact scores alone (the candidate
  pages as the top-k gives them, ``page`` > 1: no expansion), ``topk_cand<N>`` the top-k of the
  budget over them, ``pick_slots<N>`` its picks mapped back to slots;
  ``sel/quest_refine<N>_votes`` and ``slot_votes<N>``: the same with ``refine_rank="votes"``
  (TokenSelect's per-head softmax votes over the candidates: two kernels, since 2026-12-05).
* ``<name>_pdl`` (``sel/quest_pdl``, ``sel/quest8_pdl``, ``sel/mean_pdl``, ``sel/tokens_pdl``,
  ``sel/quest_refine<N>_pdl``): the same chain with every kernel that takes it launched with
  programmatic dependent launch (``kvsift.kernels._triton.pdl``; where the GPU and Triton support
  it, ``--no-pdl``: none), and the check ``sel_quest_pdl_vs_plain`` (must be 0). End to end, a
  system ``<spec>@pdl`` runs with it.
* ``kv_append`` / ``kv_append_torch``: a static decode step's KV write (key, value, position at the
  device slot, the slot advanced; ``kvsift/kernels/kv_append.py``) in one launch and as its
  reference's four. End to end, a system ``<spec>@kvref`` writes through the reference.

Each is timed over ``L`` layers of distinct KV buffers (about ``--rotate-bytes`` of KV, so the L2
cache does not hold the data or the summaries), both as CUDA-graph replays (GPU time) and eagerly
(what a Python decode loop pays): CUDA events around 10 back-to-back calls, median of ``--reps``. The HBM roofline uses a device-to-device copy measured here.

An optional end-to-end section (``--e2e``) times decode ms/token of a random-weight
Llama-3.1-8B-shaped model (``--e2e-layers`` layers) at long context: HF ``model.generate`` dense
vs kvsift's engine (``--e2e-methods``, e.g. ``full`` and ``sentencekv:2048``).

    PYTHONPATH=. python3 bench/gpu_decode.py --out bench/out/gpu_decode.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # bench._systems, kvsift

from kvsift.kernels import dispatch  # noqa: E402
from kvsift.kernels import kv_append as kva
from kvsift.kernels import token_votes as tv
from kvsift.kernels import topk_radix
from kvsift.kernels import topk_select as tk
from kvsift.kernels._triton import pdl, pdl_supported
from kvsift.kernels.chunk_scores import chunks_to_slots, int8_bounds, page_summaries, select_chunks
from kvsift.kernels.slot_scores import slot_scores_ref
from kvsift.kernels.sparse_decode_attention import sparse_decode_attention_ref
from kvsift.methods.quest import refine_slots


@contextlib.contextmanager
def tuned(table: dict, **settings):
    """A kernel module's ``TUNING`` with ``settings`` inside the block (a graph captured there keeps
    what it launched), restored after."""
    saved = dict(table)
    table.update(settings)
    try:
        yield
    finally:
        table.clear()
        table.update(saved)

HQ, HK, D = 32, 8, 128


# ---- timing -------------------------------------------------------------------------------------

def time_cuda(fn, reps: int, graph: bool, warmup: int = 3, inner: int = 10) -> float:
    """Median over ``reps`` samples of the mean milliseconds of ``inner`` back-to-back ``fn()``
    calls (CUDA events), optionally captured in a CUDA graph."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
        for _ in range(warmup):
            run()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):  # back to back, as decode steps run: the GPU never idles in between
            run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def time_cpu(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure_bandwidth(device, gib: float = 2.0, reps: int = 20) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n // 2, device=device, dtype=torch.float32).view(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), reps, graph=False, inner=1)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / (ms * 1e-3) / 1e9


# page summaries timed: Quest's float bounds, its int8 bounds (``bounds="int8"``), SentenceKV-style mean keys
SUMMARIES = (("quest", "max"), ("quest8", "max"), ("mean", "mean"))


# ---- one layer's decode attention variants ------------------------------------------------------

def dense_gqa(q, k, v, scale):
    return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)[:, :, 0]


def dense_grouped(q, k, v, scale):
    b, hq, d = q.shape
    hk = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(b, hk, hq // hk, d), k, v, scale=scale)
    return out.reshape(b, hq, d)


def selected(q, k, v, summ, page, budget, scale, reduce, summ_scale=None):
    scores = dispatch.chunk_scores(q, summ, reduce, summ_scale)
    pages = dispatch.select_chunks(scores, page, budget)
    return dispatch.sparse_decode_attention(q, k, v, pages, scale, page=page)


def with_tk(f, **settings):
    """``f`` run with ``topk_select.TUNING`` updated by ``settings`` (the dispatch reads them when
    ``f`` runs, i.e. when a CUDA graph records it)."""
    def run(L):
        with tuned(tk.TUNING, **settings):
            return f(L)
    return run


def with_block(f, blk: int | None):
    """``f`` run with the top-k's blocked form in blocks of ``blk`` for rows of at least ``2 * blk``
    scores, whatever ``block_min_n`` says (None: one program per row)."""
    return with_tk(f, block_from=blk, block_min_n=0)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("nan")
    return ((a - b).norm() / b.norm()).item()


# ---- kernel section ----------------------------------------------------------------------------

def run_kernels(args, device, bw_gbs, log, checks_out: list | None = None) -> list[dict]:
    """Time every variant per (batch, ctx); correctness checks on the bench shapes go to ``checks_out``."""
    rows = []
    dtype = torch.bfloat16
    scale = D ** -0.5
    on_gpu = device.type == "cuda"
    for batch in args.batches:
        for ctx in args.contexts:
            layer_bytes = 2 * batch * HK * ctx * D * 2
            if on_gpu:
                free = torch.cuda.mem_get_info()[0]
                if layer_bytes * 1.6 > free:
                    log(f"skip batch={batch} ctx={ctx}: {layer_bytes / 2**30:.1f} GiB per layer does not fit")
                    continue
            n_layers = max(1, min(args.max_layers, math.ceil(args.rotate_bytes / layer_bytes)))
            if on_gpu:
                n_layers = max(1, min(n_layers, int(0.6 * torch.cuda.mem_get_info()[0] // (layer_bytes * 1.2))))
            g = torch.Generator(device=device).manual_seed(ctx + batch)
            layers = []
            for _ in range(n_layers):
                k = torch.randn(batch, HK, ctx, D, device=device, dtype=dtype, generator=g)
                v = torch.randn(batch, HK, ctx, D, device=device, dtype=dtype, generator=g)
                q = torch.randn(batch, HQ, D, device=device, dtype=dtype, generator=g)
                mm = page_summaries(k, args.page, "minmax")
                lo8, hi8, sc8, _ = int8_bounds(*mm)
                layers.append({"q": q, "k": k, "v": v, "quest": mm, "quest8": (lo8, hi8), "quest8_scale": sc8,
                               "mean": page_summaries(k, args.page, "mean")})
            base = {"batch": batch, "ctx": ctx, "layers_rotated": n_layers, "kv_bytes_per_layer": layer_bytes}

            # correctness on the bench shapes (first layer): kernels vs float32 references
            L0 = layers[0]
            full_idx = torch.arange(ctx, device=device, dtype=torch.int32).expand(batch, HK, ctx)
            ref_dense = dense_grouped(L0["q"].float(), L0["k"].float(), L0["v"].float(), scale)
            checks = {"ours_all_vs_sdpa_fp32": rel_err(dispatch.sparse_decode_attention(L0["q"], L0["k"], L0["v"], full_idx, scale), ref_dense),
                      "dense_grp_bf16_vs_fp32": rel_err(dense_grouped(L0["q"], L0["k"], L0["v"], scale), ref_dense)}
            for summary, reduce in SUMMARIES:
                sc = dispatch.chunk_scores(L0["q"], L0[summary], reduce, L0.get(summary + "_scale"))
                pages = dispatch.select_chunks(sc, args.page, args.budgets[0])
                checks[f"sel_{summary}_pages_vs_torch"] = float(not torch.equal(pages, select_chunks(sc, args.page, args.budgets[0])))
                slots = chunks_to_slots(pages, None, args.page)
                got = selected(L0["q"], L0["k"], L0["v"], L0[summary], args.page, args.budgets[0], scale, reduce,
                               L0.get(summary + "_scale"))
                checks[f"sel_{summary}_attn_vs_ref"] = rel_err(got, sparse_decode_attention_ref(
                    L0["q"].float(), L0["k"].float(), L0["v"].float(), slots, scale))
            del ref_dense
            # PDL rows (``<name>_pdl``) where the device and Triton support it: the same kernels, each
            # launched with programmatic dependent launch; their results must not change
            with_pdl = args.pdl and pdl_supported(device)
            if with_pdl:
                want = selected(L0["q"], L0["k"], L0["v"], L0["quest"], args.page, args.budgets[0], scale, "max")
                with pdl(True):
                    got = selected(L0["q"], L0["k"], L0["v"], L0["quest"], args.page, args.budgets[0], scale, "max")
                checks["sel_quest_pdl_vs_plain"] = float((got.float() - want.float()).abs().max())
            if checks_out is not None:
                checks_out.append(dict(batch=batch, ctx=ctx, **checks))
            log(f"batch={batch} ctx={ctx} layers={n_layers} checks " + " ".join(f"{k}={v:.2e}" for k, v in checks.items()))

            def over_layers(f):
                def run():
                    for L in layers:
                        f(L)
                return run

            def timed(name, f, extra=None, eager=True, kv_read=None, pdl_on=None):
                row = dict(base, name=name)
                if pdl_on is not None:
                    row["pdl"] = pdl_on
                try:   # pdl_on: the kernels that take it launched with PDL or not (graphs captured so)
                    with pdl(pdl_on) if pdl_on is not None else contextlib.nullcontext():
                        if on_gpu:
                            row["graph_ms"] = time_cuda(over_layers(f), args.reps, graph=True) / n_layers
                            if eager:
                                row["eager_ms"] = time_cuda(over_layers(f), args.reps, graph=False) / n_layers
                        else:
                            row["eager_ms"] = time_cpu(over_layers(f), max(1, args.reps // 10)) / n_layers
                except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                if kv_read is not None and bw_gbs:
                    row["bytes"] = kv_read
                    row["roofline_ms"] = kv_read / (bw_gbs * 1e9) * 1e3
                if extra:
                    row.update(extra)
                rows.append(row)
                t = row.get("graph_ms", row.get("eager_ms"))
                log(f"  {name:<22} " + (f"{t:8.4f} ms" if t is not None else row.get("error", "")))
                return row

            timed("dense_gqa", lambda L: dense_gqa(L["q"], L["k"], L["v"], scale), kv_read=layer_bytes)
            timed("dense_grp", lambda L: dense_grouped(L["q"], L["k"], L["v"], scale), kv_read=layer_bytes)
            if on_gpu:
                timed("ours_all", lambda L: dispatch.sparse_decode_attention(L["q"], L["k"], L["v"], full_idx, scale),
                      kv_read=layer_bytes + full_idx.numel() * 4)
            for summary, reduce in SUMMARIES:
                n_pages = ctx // args.page
                summ_bytes = {"quest": 4, "quest8": 2, "mean": 2}[summary] * batch * HK * n_pages * D
                timed(f"score/{summary}", lambda L, s=summary, r=reduce: dispatch.chunk_scores(L["q"], L[s], r, L.get(s + "_scale")),
                      kv_read=summ_bytes, eager=False)
                for budget in args.budgets:
                    if budget > ctx:
                        continue
                    sel_bytes = 2 * batch * HK * budget * D * 2

                    def sel_step(L, s=summary, r=reduce, bu=budget):
                        return selected(L["q"], L["k"], L["v"], L[s], args.page, bu, scale, r, L.get(s + "_scale"))

                    timed(f"sel/{summary}/{budget}", sel_step, extra={"budget": budget, "summary": summary},
                          kv_read=summ_bytes + sel_bytes)
                    if with_pdl:   # the same chain, each kernel launched with PDL (kvsift.kernels._triton)
                        timed(f"sel/{summary}_pdl/{budget}", sel_step, extra={"budget": budget, "summary": summary},
                              kv_read=summ_bytes + sel_bytes, eager=False, pdl_on=True)
            # tokenselect: soft votes over every token (reads all keys), top-k tokens, sparse attention
            def token_votes(q, k, _cand, skip=None):   # every slot a candidate (the method's local window aside)
                b_, hk_, n_ = k.shape[:3]
                pos_ = torch.arange(n_, device=k.device, dtype=torch.int32).expand(b_, hk_, n_)
                return dispatch.token_votes(q, k, pos_, torch.full((b_,), n_, device=k.device), "group", float("-inf"),
                                            skip)

            no_rows = torch.zeros(batch, dtype=torch.bool, device=device)
            all_rows = torch.ones(batch, dtype=torch.bool, device=device)
            for budget in args.budgets:
                if budget > ctx:
                    continue

                def tokens_step(L, bu=budget, skip=None):   # as the method does it: dispatch.topk_select
                    if skip is None:
                        idx = dispatch.topk_select(token_votes(L["q"], L["k"], None), bu, torch.int64)
                    else:   # the selection cache, as TokenSelect runs it: the decision's launch (its flag
                        # set aside for the fixed ``skip``), then the new selections written in place
                        # into the kept one, whose skipped rows stay
                        if "_last_q" not in L:   # the first (warm-up) call's selection stands for the cached one
                            L["_last_q"], L["_counts"] = L["q"].clone(), torch.zeros(2, dtype=torch.int64, device=device)
                            L["_last"] = {}
                        if bu not in L["_last"]:
                            L["_last"][bu] = dispatch.topk_select(token_votes(L["q"], L["k"], None), bu, torch.int64)
                        dispatch.query_reuse(L["q"], L["_last_q"], 0.9, L["_counts"])
                        idx = dispatch.topk_select(token_votes(L["q"], L["k"], None, skip), bu, torch.int64, skip,
                                                   out=L["_last"][bu])
                    return dispatch.sparse_decode_attention(L["q"], L["k"], L["v"], idx, scale)

                timed(f"sel/tokens/{budget}", tokens_step, extra={"budget": budget, "summary": "tokens"},
                      kv_read=layer_bytes // 2 + 2 * batch * HK * budget * D * 2)

                def radix_step(L, bu=budget):   # the same step, its top-k the radix select
                    with tuned(tk.TUNING, radix_min_n=1 << 15):
                        return tokens_step(L, bu)

                timed(f"sel/tokens_radix/{budget}", radix_step, extra={"budget": budget, "summary": "tokens"},
                      kv_read=layer_bytes // 2 + 2 * batch * HK * budget * D * 2, eager=False)
                if with_pdl:
                    timed(f"sel/tokens_pdl/{budget}", tokens_step, extra={"budget": budget, "summary": "tokens"},
                          kv_read=layer_bytes // 2 + 2 * batch * HK * budget * D * 2, eager=False, pdl_on=True)
                # with the selection cache (reuse_threshold): a step that selects anew (its top-k the
                # blocked form, which can skip) and a step every row of which reuses its selection
                timed(f"sel/tokens_cache_new/{budget}", lambda L, bu=budget: tokens_step(L, bu, no_rows),
                      extra={"budget": budget, "summary": "tokens"}, eager=False,
                      kv_read=layer_bytes // 2 + 2 * batch * HK * budget * D * 2)
                timed(f"sel/tokens_cache_reused/{budget}", lambda L, bu=budget: tokens_step(L, bu, all_rows),
                      extra={"budget": budget, "summary": "tokens"}, eager=False,
                      kv_read=2 * batch * HK * budget * D * 2)
            # Quest with `refine=N` (its token-level second stage, kvsift.methods.quest.refine_slots):
            # the pages' scores, the best N * budget // page pages, the exact q . k at their slots,
            # the best budget tokens, sparse attention; beside it the stage as PyTorch ran it before
            # 2026-12-05 (a gather, an einsum in bf16, torch.topk, a sort), and the exact scores alone
            pos_all = torch.arange(ctx, device=device, dtype=torch.int32).expand(batch, HK, ctx)

            def refine_candidates(L, bu, n_ref):   # the best n_ref * bu // page pages
                return dispatch.topk_select(dispatch.chunk_scores(L["q"], L["quest"], "max"),
                                            n_ref * (bu // args.page), torch.int64)

            def refine_step(L, bu, n_ref, path="kernel", rank="max"):
                kc = bu // args.page
                pages = refine_candidates(L, bu, n_ref)
                if path != "kernel":   # "torch": as _refined ran it (a gather, an einsum in the keys' dtype);
                    cand = chunks_to_slots(pages, None, args.page, dtype=torch.int64)
                    b_, h_, n_ = cand.shape   # "ref": the float32 reference scores, then the same top-k and sort
                    if path == "ref":
                        s_ = slot_scores_ref(L["q"], L["k"], pos_all, cand, rank)
                    else:
                        ck = L["k"].gather(2, cand.clamp_min(0)[..., None].expand(b_, h_, n_, D))
                        s_ = torch.einsum("bhgd,bhnd->bhgn", L["q"].view(b_, h_, HQ // HK, D), ck).float().amax(2)
                        s_ = s_.masked_fill(cand < 0, float("-inf"))
                    top, at = s_.topk(min(cand.shape[-1], kc * args.page), dim=-1)
                    slots = torch.where(top > float("-inf"), cand.gather(2, at), -1).sort(dim=-1).values
                else:   # as Quest.plan runs it: the candidate pages straight from their top-k
                    slots = refine_slots(L["q"], L["k"], pos_all, pages, kc * args.page, rank, args.page)
                return dispatch.sparse_decode_attention(L["q"], L["k"], L["v"], slots, scale)

            if args.refine and args.refine[-1] * args.budgets[0] <= ctx:   # the kernel path attends what the
                # float32 reference path does (the bf16 einsum of the former path can pick other tokens at near-ties)
                err = rel_err(refine_step(L0, args.budgets[0], args.refine[-1]),
                              refine_step(L0, args.budgets[0], args.refine[-1], path="ref"))
                err_v = rel_err(refine_step(L0, args.budgets[0], args.refine[-1], rank="votes"),
                                refine_step(L0, args.budgets[0], args.refine[-1], path="ref", rank="votes"))
                if checks_out is not None:
                    checks_out[-1]["sel_quest_refine_vs_ref"] = err
                    checks_out[-1]["sel_quest_refine_votes_vs_ref"] = err_v
                log(f"  check sel_quest_refine_vs_ref={err:.2e} sel_quest_refine_votes_vs_ref={err_v:.2e}")
            for budget in args.budgets:
                if budget > ctx:
                    continue
                for n_ref in args.refine:
                    if n_ref * budget > ctx:
                        continue
                    cand_bytes = 2 * batch * HK * n_ref * budget * D   # the candidates' keys, read once more
                    sel_bytes = 2 * batch * HK * budget * D * 2
                    n_pages = ctx // args.page
                    qbytes = 4 * batch * HK * n_pages * D
                    def refine_kernel_step(L, bu=budget, r=n_ref):
                        return refine_step(L, bu, r)

                    timed(f"sel/quest_refine{n_ref}/{budget}", refine_kernel_step,
                          extra={"budget": budget, "summary": "quest", "refine": n_ref},
                          kv_read=qbytes + cand_bytes + sel_bytes)
                    timed(f"sel/quest_refine{n_ref}_torch/{budget}",
                          lambda L, bu=budget, r=n_ref: refine_step(L, bu, r, path="torch"),
                          extra={"budget": budget, "summary": "quest", "refine": n_ref}, eager=False,
                          kv_read=qbytes + cand_bytes + sel_bytes)
                    if with_pdl:
                        timed(f"sel/quest_refine{n_ref}_pdl/{budget}", refine_kernel_step,
                              extra={"budget": budget, "summary": "quest", "refine": n_ref},
                              eager=False, kv_read=qbytes + cand_bytes + sel_bytes, pdl_on=True)
                    timed(f"sel/quest_refine{n_ref}_votes/{budget}",
                          lambda L, bu=budget, r=n_ref: refine_step(L, bu, r, rank="votes"),
                          extra={"budget": budget, "summary": "quest", "refine": n_ref, "refine_rank": "votes"},
                          eager=False, kv_read=qbytes + cand_bytes + sel_bytes)
                    for L in layers:
                        L[f"_cand{n_ref}"] = refine_candidates(L, budget, n_ref)
                        L[f"_cs{n_ref}"] = dispatch.slot_scores(L["q"], L["k"], pos_all, L[f"_cand{n_ref}"], "max",
                                                                args.page)
                    timed(f"slot_scores{n_ref}/{budget}",
                          lambda L, r=n_ref: dispatch.slot_scores(L["q"], L["k"], pos_all, L[f"_cand{r}"], "max",
                                                                  args.page),
                          eager=False, kv_read=cand_bytes)
                    timed(f"slot_votes{n_ref}/{budget}",
                          lambda L, r=n_ref: dispatch.slot_scores(L["q"], L["k"], pos_all, L[f"_cand{r}"], "votes",
                                                                  args.page),
                          eager=False, kv_read=cand_bytes)
                    # the top-k over the candidates' exact scores alone (budget of n_ref * budget: one
                    # program per row), and the picks mapped back to slots
                    timed(f"topk_cand{n_ref}/{budget}",
                          lambda L, bu=budget, r=n_ref: dispatch.topk_select(L[f"_cs{r}"], bu, torch.int64),
                          eager=False)
                    timed(f"topk_cand{n_ref}_radix/{budget}",
                          lambda L, bu=budget, r=n_ref: topk_radix.topk_select_radix(L[f"_cs{r}"], bu, torch.int64,
                                                                                     block=1024),
                          eager=False)
                    for L in layers:
                        L[f"_at{n_ref}"] = dispatch.topk_select(L[f"_cs{n_ref}"], budget, torch.int64)
                    timed(f"pick_slots{n_ref}/{budget}",
                          lambda L, r=n_ref: dispatch.pick_slots(L[f"_at{r}"], L[f"_cand{r}"], args.page),
                          eager=False)
                    for L in layers:
                        for key in (f"_cand{n_ref}", f"_cs{n_ref}", f"_at{n_ref}"):
                            del L[key]
            # parts alone (quest, middle budget) to explain where the time goes
            budget = args.budgets[min(1, len(args.budgets) - 1)]
            if budget <= ctx:
                for L in layers:
                    L["_sc"] = dispatch.chunk_scores(L["q"], L["quest"], "max")
                    L["_pages"] = dispatch.select_chunks(L["_sc"], args.page, budget)
                    L["_slots"] = chunks_to_slots(L["_pages"], None, args.page)
                timed(f"topk/{budget}", lambda L, bu=budget: dispatch.select_chunks(L["_sc"], args.page, bu), eager=False)
                timed(f"topk_torch/{budget}", lambda L, bu=budget: L["_sc"].topk(bu // args.page, dim=-1), eager=False)
                # the pages' top-k in one program per row ("one") or spread over more programs per
                # row (blocks of `blk` pages, then the candidates: topk_select.TUNING["block_from"]),
                # alone and in Quest's step; `topk` / `sel/quest` above are the dispatch's default
                n_pages = layers[0]["_sc"].shape[-1]
                for blk in (None, 512, 1024, 2048):
                    if blk is None or (2 * blk <= n_pages <= tk.MAX_N
                                       and tk.blocked_fits(n_pages, budget // args.page, blk)):
                        name = "one" if blk is None else f"blocked{blk}"
                        timed(f"topk_{name}/{budget}", with_block(
                            lambda L, bu=budget: dispatch.select_chunks(L["_sc"], args.page, bu), blk), eager=False)
                        timed(f"sel/quest_{name}/{budget}", with_block(
                            lambda L, bu=budget: selected(L["q"], L["k"], L["v"], L["quest"], args.page, bu,
                                                          scale, "max"), blk),
                            extra={"budget": budget, "summary": "quest"}, eager=False)
                # the rows the engine makes: the prompt's pages and those of its decode reserve (1,024
                # slots, unselectable here), just past a power of two: one program or blocks of 1,024
                for L in layers:
                    L["_sc_pad"] = F.pad(L["_sc"], (0, 1024 // args.page), value=float("-inf"))
                for blk in (None, 1024):
                    if blk is None or tk.blocked_fits(n_pages + 1024 // args.page, budget // args.page, blk):
                        timed(f"topk_pad_{'one' if blk is None else f'blocked{blk}'}/{budget}", with_block(
                            lambda L, bu=budget: dispatch.select_chunks(L["_sc_pad"], args.page, bu), blk), eager=False)
                # tokenselect's top-k over every token's votes: dispatch (past the Triton selector's
                # MAX_N, its blocked form when the candidates fit), torch.topk with the ascending sort
                # the contract needs (the dispatch's path before 2026-12-04), torch.topk alone
                for L in layers:
                    L["_votes"] = token_votes(L["q"], L["k"], None)
                timed(f"topk_tokens/{budget}", lambda L, bu=budget: dispatch.topk_select(L["_votes"], bu, torch.int64),
                      eager=False)
                # the engine's static buffer is a little longer than the prompt (its decode slots): the
                # same votes with 64 unselectable slots more take a second level of blocks
                for L in layers:
                    L["_votes_pad"] = F.pad(L["_votes"], (0, 64), value=float("-inf"))
                timed(f"topk_tokens_pad64/{budget}",
                      lambda L, bu=budget: dispatch.topk_select(L["_votes_pad"], bu, torch.int64), eager=False)
                timed(f"topk_tokens_sort/{budget}",
                      lambda L, bu=budget: tk.topk_select_long(L["_votes"], bu, torch.int64), eager=False)
                timed(f"topk_tokens_torch/{budget}", lambda L, bu=budget: L["_votes"].topk(bu, dim=-1), eager=False)
                for rb in (2048, 4096, 8192):   # the radix select over blocks of rb votes
                    timed(f"topk_tokens_radix{rb}/{budget}",
                          lambda L, bu=budget, rb=rb: topk_radix.topk_select_radix(L["_votes"], bu, torch.int64, block=rb),
                          eager=False)
                timed(f"attn_pages/{budget}", lambda L: dispatch.sparse_decode_attention(L["q"], L["k"], L["v"], L["_pages"], scale, page=args.page),
                      eager=False, kv_read=2 * batch * HK * budget * D * 2)
                timed(f"attn_slots/{budget}", lambda L: dispatch.sparse_decode_attention(L["q"], L["k"], L["v"], L["_slots"], scale),
                      eager=False, kv_read=2 * batch * HK * budget * D * 2)
            # the static decode step's KV write (every method, every layer): the one-launch kernel
            # against its reference's four (three index_copy_ and the slot's add_)
            for L in layers:
                L["_pos"] = torch.full(L["k"].shape[:3], -1, dtype=torch.int32, device=device)
                L["_slot"] = torch.tensor([ctx // 2], device=device)   # replays walk on from the middle
                L["_new"] = [torch.randn(batch, 1, HK, D, device=device, dtype=torch.bfloat16).transpose(1, 2)
                             for _ in range(2)]
                L["_newp"] = torch.zeros(batch, 1, dtype=torch.int32, device=device)
            for name, on in (("kv_append", True), ("kv_append_torch", False)):
                def append(L, on=on):
                    with tuned(kva.TUNING, triton=on):
                        dispatch.kv_append(L["k"], L["v"], L["_pos"], L["_slot"], *L["_new"], L["_newp"])
                timed(name, append, eager=False)
            for L in layers:
                del L["_pos"], L["_slot"], L["_new"], L["_newp"]
            del layers, full_idx
            if on_gpu:
                torch.cuda.empty_cache()
    return rows


def run_tune(args, device, log) -> list[dict]:
    """Sweep the kernels' launch settings at one shape (per-kernel GPU time, CUDA graphs)."""
    from kvsift.kernels import chunk_scores as cs_mod
    from kvsift.kernels import sparse_decode_attention as sda_mod

    rows = []
    ctx, budget, page, scale = args.tune_ctx, 2048, args.page, D ** -0.5
    for batch in args.batches:
        layer_bytes = 2 * batch * HK * ctx * D * 2
        n_layers = max(1, min(args.max_layers, math.ceil(args.rotate_bytes / layer_bytes)))
        g = torch.Generator(device=device).manual_seed(7)
        layers = []
        for _ in range(n_layers):
            k = torch.randn(batch, HK, ctx, D, device=device, dtype=torch.bfloat16, generator=g)
            v = torch.randn(batch, HK, ctx, D, device=device, dtype=torch.bfloat16, generator=g)
            q = torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16, generator=g)
            L = {"q": q, "k": k, "v": v, "quest": page_summaries(k, page, "minmax"), "mean": page_summaries(k, page, "mean")}
            lo8, hi8, L["quest8_scale"], _ = int8_bounds(*L["quest"])
            L["quest8"] = (lo8, hi8)
            L["sc"] = dispatch.chunk_scores(q, L["quest"], "max")
            L["pages"] = dispatch.select_chunks(L["sc"], page, budget)
            layers.append(L)

        def t(f):
            def run():
                for L in layers:
                    f(L)
            return time_cuda(run, args.reps, graph=True) / n_layers

        def rec(kernel, setting, ms):
            rows.append({"batch": batch, "ctx": ctx, "kernel": kernel, "setting": setting, "graph_ms": ms})
            log(f"tune batch={batch} ctx={ctx} {kernel:<14} {json.dumps(setting):<70} {ms * 1e3:8.1f} us")

        # each sweep inside tuned(table): the module's settings restored after it, whatever happens
        with tuned(cs_mod.TUNING):
            for dot in ((True, False) if "score" in args.tune_kernels else ()):
                for block_n in (32, 64, 128, 256):
                    for nw in (4, 8):
                        cs_mod.TUNING.update(dot=dot, block_n=block_n, block_n_int8=block_n, num_warps=nw)
                        for summary, reduce in (("quest", "max"), ("quest8", "max"), ("mean", "mean")):
                            rec(f"score/{summary}", dict(cs_mod.TUNING),
                                t(lambda L, s=summary, r=reduce: dispatch.chunk_scores(L["q"], L[s], r,
                                                                                       L.get(s + "_scale"))))
        with tuned(tk.TUNING):
            for impl in (("packed64", "int32") if "topk" in args.tune_kernels else ()):
                for nw in (4, 8, 16):
                    tk.TUNING.update(num_warps=nw, impl=impl)
                    rec("topk", dict(tk.TUNING), t(lambda L: dispatch.select_chunks(L["sc"], page, budget)))
        rec("topk_torch", {}, t(lambda L: L["sc"].topk(budget // page, dim=-1)))
        with tuned(sda_mod.TUNING):
            for bs, nw, st, sp in (((64, 4, 2, 2), (32, 4, 2, 2), (32, 4, 2, 4), (64, 4, 2, 4), (64, 8, 2, 2),
                                    (128, 8, 2, 2), (64, 4, 3, 1), (32, 2, 2, 4)) if "attn" in args.tune_kernels else ()):
                sda_mod.TUNING.update(block_s=bs, num_warps=nw, num_stages=st, splits_per_sm=sp)
                rec("attn_pages", dict(sda_mod.TUNING),
                    t(lambda L: dispatch.sparse_decode_attention(L["q"], L["k"], L["v"], L["pages"], scale, page=page)))
        # TokenSelect's two costs: the soft votes over every key and the top-k over every token
        pos = torch.arange(ctx, device=device, dtype=torch.int32).expand(batch, HK, ctx)
        lim = torch.full((batch,), ctx, device=device, dtype=torch.int64)
        with tuned(tv.TUNING):
            for block_n, max_prog, nw, stages in (
                    [(bn, mp, nw, None) for bn, mp, nw in itertools.product((32, 64, 128), (64, 128, 256), (4, 8))]
                    + [(bn, 64, 4, st) for bn, st in itertools.product((64, 128), (2, 3, 4, 5))]
                    if "votes" in args.tune_kernels else ()):
                tv.TUNING.update(block_n=block_n, max_programs=max_prog, num_warps=nw, num_stages=stages)
                rec("votes", dict(tv.TUNING),
                    t(lambda L: dispatch.token_votes(L["q"], L["k"], pos, lim, "group", float("-inf"))))
        if "radix" in args.tune_kernels:
            for L in layers:
                L["_votes"] = dispatch.token_votes(L["q"], L["k"], pos, lim, "group", float("-inf"))
            rec("topk_tokens", dict(tk.TUNING), t(lambda L: dispatch.topk_select(L["_votes"], budget, torch.int64)))
            with tuned(topk_radix.TUNING):
                for block, nw in itertools.product((1024, 2048, 4096, 8192, 16384), (4, 8)):
                    topk_radix.TUNING.update(block=block, num_warps=nw)
                    rec("topk_radix", dict(topk_radix.TUNING),
                        t(lambda L: topk_radix.topk_select_radix(L["_votes"], budget, torch.int64)))
        del layers
        torch.cuda.empty_cache()
    return rows


def tuned_settings(rows: list[dict], batch: int = 1) -> dict:
    """From ``run_tune``'s rows at ``batch``: ``{"votes": the fastest token_votes.TUNING, "radix":
    topk_radix.TUNING's fastest block and warps, or {} where the dispatcher's own top-k (row
    ``topk_tokens``) was faster}``."""
    def fastest(kernel):
        rs = [r for r in rows if r["kernel"] == kernel and r["batch"] == batch]
        return min(rs, key=lambda r: r["graph_ms"]) if rs else None

    out = {"votes": {}, "radix": {}}
    if (v := fastest("votes")) is not None:
        out["votes"] = {k: v["setting"][k] for k in ("block_n", "max_programs", "num_warps", "num_stages")
                        if k in v["setting"]}
    rx, base = fastest("topk_radix"), fastest("topk_tokens")
    if rx is not None and base is not None and rx["graph_ms"] < base["graph_ms"]:
        out["radix"] = {"block": rx["setting"]["block"], "num_warps": rx["setting"]["num_warps"]}
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Speedups of each selected row against the faster dense SDPA of its (batch, ctx)."""
    out = []
    key = "graph_ms" if any("graph_ms" in r for r in rows) else "eager_ms"
    groups = {}
    for r in rows:
        groups.setdefault((r["batch"], r["ctx"]), []).append(r)
    for (batch, ctx), rs in groups.items():
        dense = [r for r in rs if r["name"].startswith("dense") and key in r]
        if not dense:
            continue
        best = min(dense, key=lambda r: r[key])
        best_eager = min((r["eager_ms"] for r in dense if "eager_ms" in r), default=None)
        for r in rs:
            if not r["name"].startswith("sel/") or key not in r:
                continue
            s = {"batch": batch, "ctx": ctx, "name": r["name"], "dense": best["name"], "dense_ms": best[key],
                 "sel_ms": r[key], "speedup": best[key] / r[key]}
            if best_eager and "eager_ms" in r:
                s["speedup_eager"] = best_eager / r["eager_ms"]
            out.append(s)
    return out


def print_table(rows, summary, bw_gbs, log):
    log("")
    log(f"HBM copy bandwidth: {bw_gbs:.0f} GB/s" if bw_gbs else "no bandwidth measured")
    log(f"{'batch':>5} {'ctx':>7} {'variant':<22} {'graph ms':>9} {'eager ms':>9} {'roof ms':>8} {'x roof':>6}")
    for r in rows:
        g = r.get("graph_ms")
        e = r.get("eager_ms")
        rf = r.get("roofline_ms")
        t = g if g is not None else e
        ratio = f"{t / rf:6.2f}" if (rf and t) else "     -"
        log(f"{r['batch']:>5} {r['ctx']:>7} {r['name']:<22} "
            f"{(f'{g:9.4f}' if g is not None else '        -')} {(f'{e:9.4f}' if e is not None else '        -')} "
            f"{(f'{rf:8.4f}' if rf else '       -')} {ratio}" + (f"  ERROR {r['error']}" if "error" in r else ""))
    log("")
    log(f"{'batch':>5} {'ctx':>7} {'selected':<18} {'ms':>8} {'dense':<10} {'ms':>8} {'speedup':>8} {'eager x':>8}")
    for s in summary:
        se = s.get("speedup_eager")
        log(f"{s['batch']:>5} {s['ctx']:>7} {s['name']:<18} {s['sel_ms']:8.4f} {s['dense']:<10} {s['dense_ms']:8.4f} "
            f"{s['speedup']:8.2f} {(f'{se:8.2f}' if se else '       -')}")


# ---- end-to-end section ------------------------------------------------------------------------

def run_e2e(args, device, log, bw_gbs: float | None = None, on_row=None) -> list[dict]:
    """Decode of a random-weight Llama-3.1-8B-shaped model (all 32 layers unless ``--e2e-layers``):
    HF ``generate`` dense, kvsift ``full`` and the ``--e2e-methods`` (e.g. ``sentencekv:2048``),
    at each context of ``--e2e-contexts`` and each batch of ``--e2e-batches`` (``max``: the largest
    batch that fits, found by trying from an estimate downwards). One row per (context, system,
    batch): ms/token, tokens/s, GPU memory peak, KV bytes on the device and on the host, the
    decode mode, and the HBM roofline of a dense step (weights + KV bytes over ``bw_gbs``).
    ``on_row(rows)``: called after each row (the caller saves them, so a run cut short by a
    timeout keeps what it measured)."""
    if args.e2e_model:
        return _run_e2e_real(args, device, log, bw_gbs, on_row)
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256)
    if args.e2e_tiny:  # harness smoke test on a CPU
        shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    cfg = LlamaConfig(num_hidden_layers=args.e2e_layers, max_position_embeddings=max(args.e2e_contexts) + 4096,
                      rope_theta=500000.0, **shape)
    if device.type == "cuda" and args.e2e_sdpa == "no-cudnn":
        # cuDNN SDPA rebuilds its plan for every new KV length (~6 ms of CPU per call): HF without it
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    log(f"e2e model: {cfg.num_hidden_layers} layers, {weight_bytes / 2**30:.1f} GiB weights, "
        f"{kv_tok / 2**10:.0f} KiB KV per token; sdpa {args.e2e_sdpa}")
    systems = (["hf"] if not args.e2e_no_hf else []) + [m for m in args.e2e_methods]
    warm = torch.randint(0, cfg.vocab_size, (1, 1024), device=device)
    for sys_name in systems:  # compile kernels / warm the allocator once, on a short prompt
        try:
            _e2e_generate(model, sys_name, warm, 3, args)
        except Exception as e:  # noqa: BLE001
            log(f"e2e warm-up {sys_name}: {type(e).__name__}: {e}"[:300])
        _empty_cache()
    rows = []
    for ctx in args.e2e_contexts:
        for sys_name in systems:
            done = set()
            for bspec in args.e2e_batches:
                cand = (_batch_candidates(sys_name, ctx, kv_tok, weight_bytes, device, args) if bspec == "max"
                        else [int(bspec)])
                for bsz in cand:
                    if bsz in done:  # e.g. max = 1: already measured
                        break
                    row = _e2e_row(model, sys_name, ctx, bsz, args, kv_tok, weight_bytes, bw_gbs, log)
                    row["batch_spec"] = bspec
                    rows.append(row)
                    if on_row is not None:
                        on_row(rows)
                    if "error" not in row:
                        done.add(bsz)
                        break
                    if "out of memory" not in row["error"].lower():
                        break
    return rows


def _run_e2e_real(args, device, log, bw_gbs: float | None, on_row=None) -> list[dict]:
    """``--e2e-model``: the same rows on a real model (a registered name or a path ``LLM`` loads)
    and real prompts: the suite's ``niah`` samples at each context, so consecutive decode queries
    are a real model's (a random-weight model's are unrelated: TokenSelect's selection cache never
    holds there). HF ``generate`` runs the same module."""
    from kvsift import LLM
    from kvsift.eval.tasks import TaskBuilder, TaskConfig

    if device.type == "cuda" and args.e2e_sdpa == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    base = LLM(args.e2e_model, device=device.type)
    model, tok = base.model, base.tokenizer
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd * model.dtype.itemsize
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log(f"e2e model: {args.e2e_model}, {cfg.num_hidden_layers} layers, {weight_bytes / 2**30:.2f} GiB weights, "
        f"{kv_tok / 2**10:.0f} KiB KV per token; sdpa {args.e2e_sdpa}")
    systems = (["hf"] if not args.e2e_no_hf else []) + list(args.e2e_methods)
    rows = []
    for ctx in args.e2e_contexts:
        samples = TaskBuilder(tok, TaskConfig(samples=max(int(b) for b in args.e2e_batches if b != "max"))).build(
            "niah", ctx, 0)
        prompts = [list(tok.encode(x.prompt, add_special_tokens=False)) for x in samples]
        n = min(len(p) for p in prompts)   # one length per batch (HF generate without padding)
        for sys_name in systems:
            _e2e_generate(model, sys_name, torch.tensor([prompts[0][:1024]], device=device), 3, args)   # warm-up
            for bspec in args.e2e_batches:
                bsz = int(bspec)
                ids = torch.tensor([p[-n:] for p in prompts[:bsz]], device=device)   # the question stays at the end
                row = _e2e_row(model, sys_name, ctx, bsz, args, kv_tok, weight_bytes, bw_gbs, log, ids=ids)
                row.update(batch_spec=bspec, model=args.e2e_model, prompt_tokens=n)
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
    return rows


def _batch_candidates(sys_name: str, ctx: int, kv_tok: int, weight_bytes: int, device, args) -> list[int]:
    """Batches to try for ``max``, largest first. GPU memory: HF and ``full`` hold every prompt's
    full KV on the device; sentencekv prefills one sequence at a time (``prefill_mode='auto'``),
    so the device holds one prompt's full KV plus, per sequence, the recent window, the chunk
    summaries and the device chunk cache, while the chunks themselves go to host memory, which
    bounds the batch."""
    if device.type != "cuda":
        return [2, 1]
    total = torch.cuda.get_device_properties(device).total_memory
    free = total * 0.92 - weight_bytes - 6 * 2**30
    if "sentencekv" in sys_name:
        per_seq_dev = kv_tok * min(ctx, 8192)  # summaries + chunk cache + window, generously
        est = int((free - 1.15 * kv_tok * ctx) // per_seq_dev)
        try:
            import os

            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
            est = min(est, int(host * 0.8 // (kv_tok * ctx)))
        except (ValueError, OSError):
            pass
    else:
        per_seq = kv_tok * ctx * (2.0 if sys_name == "hf" else 1.15)  # HF: prefill activations + cache growth
        est = int(free // per_seq)
    est = max(1, min(est, args.e2e_max_batch))
    return list(range(est, 0, -1))


def _e2e_generate(model, sys_name: str, ids: torch.Tensor, n: int, args) -> dict:
    """Greedy generation of ``n`` tokens for every row of ``ids (batch, ctx)``; returns decode
    timing (the clock starts after the first generated token, so prefill is out)."""
    if sys_name == "hf":
        from transformers import LogitsProcessor, LogitsProcessorList

        class StepClock(LogitsProcessor):
            def __init__(self):
                self.times: list[float] = []

            def __call__(self, input_ids, scores):
                _sync()
                self.times.append(time.perf_counter())
                return scores

        clock = StepClock()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        t = clock.times
        return {"decode_steps": len(t) - 1, "decode_s": t[-1] - t[0], "decode_mode": "hf-generate"}
    from kvsift import LLM, SamplingParams

    llm = LLM.from_model(model, None, name="llama-8b-shape-random", chunk_size=args.e2e_chunk,
                         decode_mode=args.e2e_decode)
    from bench._systems import parse_system
    from kvsift.kernels._triton import pdl

    # '@pdl' / '@nopdl': the selection chain's kernels launched with programmatic dependent launch
    # (kvsift.kernels._triton.pdl) or without, this system only; neither: the process default (KVSIFT_PDL)
    pdl_on = None
    for suffix, on in (("@pdl", True), ("@nopdl", False)):
        if sys_name.endswith(suffix):
            pdl_on, sys_name = on, sys_name.removesuffix(suffix)

    # the fused RMSNorm / rotary decode kernels: the library's default (KVSIFT_FUSED_DECODE); '@unfused'
    # runs the model's own code, '@fused' (the name measured before it became the default) forces them on
    if sys_name.endswith(("@unfused", "@fused")):
        llm.runner.fused_decode = sys_name.endswith("@fused")
    # '@radix': long rows' top-k (TokenSelect's votes) through the radix select (topk_radix), this
    # system only
    radix = {}
    if sys_name.endswith("@radix"):
        radix["radix_min_n"] = 1 << 15
        sys_name = sys_name.removesuffix("@radix")
    # '@kvref': the static decode step's KV write as its PyTorch reference (four launches per layer)
    # instead of the one-launch kernel (kvsift/kernels/kv_append.py), this system only
    kv_ref = sys_name.endswith("@kvref")
    sys_name = sys_name.removesuffix("@kvref")
    # '@tuned': TokenSelect's soft votes and the radix select with the fastest settings of this run's
    # --tune sweep at batch 1 (tuned_settings), the radix select used where it beat the dispatcher
    votes_tuning, radix_tuning = {}, {}
    if sys_name.endswith("@tuned"):
        best = getattr(args, "tuned_best", None) or {}
        votes_tuning, radix_tuning = best.get("votes", {}), best.get("radix", {})
        radix = {"radix_min_n": 1 << 15} if radix_tuning else {}
        sys_name = sys_name.removesuffix("@tuned")
    # quantized decode kernel settings (quant_decode_attention.TUNING), this system only: '@asm' /
    # '@noasm' the inline-PTX unpack of 4-bit codes on / off (the default since 2026-12-03);
    # '@offset' its planes left offset (fold_offset); '@i32' / '@noi32' 32-bit slot arithmetic (i32,
    # the default since 2026-12-03) on / off
    from kvsift.kernels import quant_decode_attention as qda

    tuning = {}
    for suffix, key, value in (("@asm", "fold_asm", True), ("@noasm", "fold_asm", False),
                               ("@offset", "fold_offset", True), ("@i32", "i32", True), ("@noi32", "i32", False)):
        if sys_name.endswith(suffix):
            tuning[key] = value
            sys_name = sys_name.removesuffix(suffix)
    name, budget_v, kw = parse_system(sys_name.removesuffix("@unfused").removesuffix("@fused"))
    if budget_v is not None and budget_v >= ids.shape[1]:
        budget_v = None if name == "full" else max(1, ids.shape[1] // 2)
    with tuned(qda.TUNING, **tuning), tuned(tk.TUNING, **radix), tuned(topk_radix.TUNING, **radix_tuning), \
            tuned(tv.TUNING, **votes_tuning), tuned(kva.TUNING, **({"triton": False} if kv_ref else {})), \
            pdl(pdl_on) if pdl_on is not None else contextlib.nullcontext():
        outs = llm.generate([r.tolist() for r in ids], SamplingParams(max_tokens=n, ignore_eos=True),
                            method=name, budget=budget_v, method_kwargs=kw or None, progress=False)
    st = outs[0].stats
    # steady state: the one-off warm-up step and CUDA graph recording are reported apart
    return {"decode_steps": st.decode_steps - (st.decode_setup_steps or (1 if st.decode_setup_s else 0)),
            "decode_s": st.decode_s - st.decode_setup_s, "decode_setup_s": st.decode_setup_s,
            "prefill_s": st.prefill_s,
            "decode_mode": st.decode_mode, "kv_device_bytes": st.kv_device_bytes, "kv_host_bytes": st.kv_host_bytes,
            "method_stats": st.method_stats}


def _e2e_row(model, sys_name, ctx, bsz, args, kv_tok, weight_bytes, bw_gbs, log, ids=None) -> dict:
    row = {"ctx": ctx, "system": sys_name, "batch": bsz, "layers": model.config.num_hidden_layers,
           "new_tokens": args.e2e_new_tokens}
    if ids is None:
        ids = torch.randint(0, model.config.vocab_size, (bsz, ctx), device=model.device)
    _empty_cache()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        r = _e2e_generate(model, sys_name, ids, args.e2e_new_tokens + 1, args)
        row.update(r)
        row["ms_per_token"] = 1000.0 * r["decode_s"] / max(1, r["decode_steps"])
        row["tokens_per_s"] = bsz * 1000.0 / row["ms_per_token"]
        if bw_gbs:  # a dense step reads the weights and every KV byte once
            row["dense_roofline_ms"] = (weight_bytes + bsz * ctx * kv_tok) / (bw_gbs * 1e9) * 1e3
    except Exception as e:  # noqa: BLE001 - reported (OOM: a smaller batch is tried)
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    row["wall_s"] = time.perf_counter() - t0
    if torch.cuda.is_available():
        row["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del ids
    _empty_cache()
    if "error" in row:
        log(f"e2e ctx={ctx} {sys_name} batch={bsz}: {row['error'][:160]}")
    else:
        log(f"e2e ctx={ctx:>6} {sys_name:<16} batch={bsz:<2} {row['ms_per_token']:8.2f} ms/token "
            f"{row['tokens_per_s']:8.1f} tok/s  peak {row.get('gpu_peak_gib', 0):6.1f} GiB  "
            f"({row['decode_mode']}, wall {row['wall_s']:.0f}s) {row.get('method_stats', '')}")
    return row


def print_e2e(rows: list[dict], log) -> None:
    """Table: per context and batch, each system's ms/token and its speed-up over HF generate."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    log("")
    log(f"{'ctx':>7} {'batch':>5} {'system':<18} {'mode':<12} {'ms/tok':>8} {'tok/s':>8} {'vs HF':>6} "
        f"{'roofline':>8} {'peak GiB':>8} {'dev KV GiB':>10} {'host GiB':>8}")
    hf = {(r["ctx"], r["batch"]): r for r in ok if r["system"] == "hf"}
    hf_max = {}
    for r in ok:
        if r["system"] == "hf":
            hf_max[r["ctx"]] = max(hf_max.get(r["ctx"], 0), r["tokens_per_s"])
    for r in sorted(ok, key=lambda r: (r["ctx"], r["batch"], r["system"])):
        base = hf.get((r["ctx"], r["batch"]))
        vs = f"{base['ms_per_token'] / r['ms_per_token']:6.2f}" if base else "     -"
        roof = f"{r['dense_roofline_ms']:8.2f}" if r.get("dense_roofline_ms") else "       -"
        log(f"{r['ctx']:>7} {r['batch']:>5} {r['system']:<18} {r['decode_mode']:<12} {r['ms_per_token']:8.2f} "
            f"{r['tokens_per_s']:8.1f} {vs} {roof} {r.get('gpu_peak_gib', 0):8.1f} "
            f"{r.get('kv_device_bytes', 0) / 2**30:10.2f} {r.get('kv_host_bytes', 0) / 2**30:8.2f}")
    for ctx, best in sorted(hf_max.items()):
        for sys_name in sorted({r["system"] for r in ok if r["ctx"] == ctx and r["system"] != "hf"}):
            mine = max(r["tokens_per_s"] for r in ok if r["ctx"] == ctx and r["system"] == sys_name)
            log(f"ctx {ctx}: best tokens/s {sys_name} {mine:.1f} vs HF {best:.1f} = {mine / best:.2f}x")


def _empty_cache():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out/gpu_decode.json")
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 32768, 131072])
    p.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096])
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--no-pdl", dest="pdl", action="store_false",
                   help="no <name>_pdl rows (the selection chains launched with programmatic dependent launch, "
                        "timed where the GPU and Triton support it)")
    p.add_argument("--refine", type=lambda s: [int(x) for x in s.split(",") if x], default=[2, 4],
                   help="Quest's refine=N rows (sel/quest_refine<N>); empty: none")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--rotate-bytes", type=float, default=2 * 2**30, help="KV bytes cycled per timing (beat the L2)")
    p.add_argument("--max-layers", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--tune", action="store_true", help="sweep kernel launch settings at --tune-ctx")
    p.add_argument("--tune-ctx", type=int, default=131072)
    p.add_argument("--tune-kernels", type=lambda s: s.split(","), default=["score", "topk", "attn"],
                   help="which sweeps: score, topk, attn, votes (TokenSelect's soft votes), radix (topk_radix)")
    p.add_argument("--e2e", action="store_true", help="also time a random-weight Llama-8B-shaped model end to end")
    p.add_argument("--e2e-layers", type=int, default=32)
    p.add_argument("--e2e-contexts", type=lambda s: [int(x) for x in s.split(",")], default=[32768, 131072])
    p.add_argument("--e2e-batches", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=["1", "max"],
                   help="batch sizes; 'max' = the largest that fits (tried downwards from an estimate)")
    p.add_argument("--e2e-max-batch", type=int, default=64)
    p.add_argument("--e2e-decode", default="auto", help="kvsift decode mode: auto | eager | static | graph")
    p.add_argument("--e2e-new-tokens", type=int, default=32)
    p.add_argument("--e2e-methods", type=lambda s: [x for x in s.split(",") if x], default=["full", "sentencekv:2048"],
                   help="kvsift methods: 'name', 'name:budget' or 'name:budget:option=value[:...]'; a trailing "
                        "'@unfused' decodes without the fused RMSNorm / rotary kernels (engine/fusion.py; "
                        "on by default)")
    p.add_argument("--e2e-sdpa", choices=["default", "no-cudnn"], default="no-cudnn",
                   help="SDPA backends in the end-to-end section (default: cuDNN SDPA disabled)")
    p.add_argument("--e2e-tiny", action="store_true", help="tiny model instead (smoke test of the harness)")
    p.add_argument("--e2e-model", default=None,
                   help="a real model (registered name or path) and the suite's niah prompts instead of random "
                        "weights and tokens; --e2e-batches must be numbers")
    p.add_argument("--e2e-chunk", type=int, default=1024, help="kvsift prefill chunk size")
    p.add_argument("--e2e-no-hf", action="store_true", help="leave HF generate out (kvsift methods compared alone)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg=""):
        print(msg, flush=True)
        lines.append(msg)

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "triton_used": dispatch.use_triton(torch.empty(1, device=device)), "args": vars(args)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info.update(gpu=prop.name, sms=prop.multi_processor_count, gpu_mem_gib=prop.total_memory / 2**30)
    log(json.dumps({k: v for k, v in info.items() if k != "args"}))
    bw = measure_bandwidth(device) if device.type == "cuda" else None
    info["copy_bandwidth_GBps"] = bw
    result = {"info": info, "checks": [], "kernels": [], "summary": [], "e2e": [], "tune": []}
    if args.tune:
        result["tune"] = run_tune(args, device, log)
        args.tuned_best = tuned_settings(result["tune"])
        log(f"tuned (batch 1, for '@tuned' systems): {json.dumps(args.tuned_best)}")
    if not args.skip_kernels:
        result["kernels"] = run_kernels(args, device, bw, log, result["checks"])
        result["summary"] = summarize(result["kernels"])
        print_table(result["kernels"], result["summary"], bw, log)
    out_path.write_text(json.dumps(result, indent=1))
    if args.e2e:
        def save(rows):
            result["e2e"] = rows
            out_path.write_text(json.dumps(result, indent=1))

        result["e2e"] = run_e2e(args, device, log, bw, save)
        print_e2e(result["e2e"], log)
        out_path.write_text(json.dumps(result, indent=1))
    out_path.with_suffix(".log").write_text("\n".join(lines) + "\n")
    log(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
