"""Kernels: references against naive dense computations (CPU, always), Triton against the
references through the CPU interpreter (when triton is installed) and on CUDA (when present)."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from kvsift.kernels import chunk_scores as cs_mod
from kvsift.kernels import dispatch
from kvsift.kernels import topk_select as tk_mod
from kvsift.kernels._triton import HAS_TRITON
from kvsift.kernels.chunk_scores import (chunk_scores_ref, chunks_to_slots, page_summaries, select_chunks)
from kvsift.kernels.sparse_decode_attention import sparse_decode_attention_ref
from kvsift.kernels.budget_select import budget_select_ref
from kvsift.kernels.topk_select import topk_select_ref
from tests.conftest import run_in_triton_interpreter



def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "NaN in output"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _naive_scores(q, lo, hi, reduce):
    """Per-head python loop: the definition, no broadcasting tricks."""
    b, hq, d = q.shape
    hk, n = lo.shape[1], lo.shape[2]
    g = hq // hk
    out = torch.empty(b, hk, n, dtype=torch.float64)
    for bi in range(b):
        for h in range(hk):
            per_head = []
            for j in range(g):
                qv = q[bi, h * g + j].double()
                if hi is None:
                    per_head.append(lo[bi, h].double() @ qv)
                else:
                    per_head.append(torch.maximum(qv * lo[bi, h].double(), qv * hi[bi, h].double()).sum(-1))
            st = torch.stack(per_head)
            out[bi, h] = st.max(0).values if reduce == "max" else st.mean(0)
    return out


# ---- chunk scores -----------------------------------------------------------------------------

@pytest.mark.parametrize("quest", [False, True])
@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("shape", [(1, 4, 4, 1, 16), (2, 8, 2, 37, 64), (1, 32, 8, 5, 128)])
def test_chunk_scores_ref_matches_naive(quest, reduce, shape):
    b, hq, hk, n, d = shape
    q = torch.randn(b, hq, d)
    lo = torch.randn(b, hk, n, d)
    hi = lo + torch.rand_like(lo) if quest else None
    got = chunk_scores_ref(q, (lo, hi) if quest else lo, reduce)
    assert got.shape == (b, hk, n) and got.dtype == torch.float32
    assert _rel(got, _naive_scores(q, lo, hi, reduce)) < 1e-5


def test_quest_bound_is_an_upper_bound_of_every_key_in_the_page():
    torch.manual_seed(1)
    b, hq, hk, page, n_pages, d = 2, 8, 2, 16, 6, 32
    q = torch.randn(b, hq, d)
    keys = torch.randn(b, hk, page * n_pages, d)
    bound = chunk_scores_ref(q, page_summaries(keys, page, "minmax"), "max")
    qk = torch.einsum("bhgd,bhnd->bhgn", q.reshape(b, hk, hq // hk, d), keys)
    true_max = qk.reshape(b, hk, hq // hk, n_pages, page).amax(dim=(2, 4))
    assert (bound >= true_max - 1e-4).all()


def test_chunk_scores_mean_summaries_equal_mean_attention_logit():
    b, hq, hk, page, d = 1, 4, 2, 8, 16
    q = torch.randn(b, hq, d)
    keys = torch.randn(b, hk, 4 * page, d)
    s = chunk_scores_ref(q, page_summaries(keys, page, "mean"), "mean")
    qk = torch.einsum("bhgd,bhnd->bhgn", q.reshape(b, hk, 2, d), keys)
    assert torch.allclose(s, qk.reshape(b, hk, 2, 4, page).mean(dim=(2, 4)), atol=1e-5)


def test_chunk_scores_rejects_bad_input():
    q = torch.randn(1, 6, 16)
    with pytest.raises(ValueError, match="multiple"):
        chunk_scores_ref(q, torch.randn(1, 4, 3, 16))
    with pytest.raises(ValueError, match="reduce"):
        chunk_scores_ref(torch.randn(1, 4, 16), torch.randn(1, 2, 3, 16), "sum")
    with pytest.raises(ValueError, match="same shape"):
        chunk_scores_ref(torch.randn(1, 4, 16), (torch.randn(1, 2, 3, 16), torch.randn(1, 2, 4, 16)))
    with pytest.raises(ValueError, match="head_dim"):
        chunk_scores_ref(torch.randn(1, 4, 8), torch.randn(1, 2, 3, 16))


# ---- selection helpers ------------------------------------------------------------------------

def test_topk_select_ref_matches_sorted_ranking_and_skips_unselectable():
    torch.manual_seed(2)
    s = torch.randn(2, 3, 40)
    s[0, 0, ::2] = float("-inf")                # 20 selectable
    s[0, 1, 5] = float("nan")
    s[1, 2] = float("-inf")                     # none selectable
    got = topk_select_ref(s, 25)
    assert got.shape == (2, 3, 25) and got.dtype == torch.int32
    for b in range(2):
        for h in range(3):
            row = s[b, h]
            ok = [i for i in range(40) if row[i] == row[i] and row[i] > float("-inf")]
            best = sorted(sorted(ok, key=lambda i: -row[i].item())[:25])
            assert got[b, h].tolist() == best + [-1] * (25 - len(best))
    assert topk_select_ref(s, 0).shape == (2, 3, 0)


def test_topk_select_ref_keeps_the_lowest_indices_among_ties_whatever_the_row_length():
    """Equal scores at the threshold: the lowest indices win, so a row selects the same whether it
    stands alone or is padded with unselectable entries (a shorter row in a batch)."""
    row = torch.tensor([3.0, 7.0, 7.0, 1.0, 7.0, 7.0, 5.0, 7.0, 2.0])
    assert topk_select_ref(row.view(1, 1, -1), 3).tolist() == [[[1, 2, 4]]]
    assert topk_select_ref(row.view(1, 1, -1), 6).tolist() == [[[1, 2, 4, 5, 6, 7]]]
    g = torch.Generator().manual_seed(4)
    for n in (5, 40, 300):
        s = torch.randint(0, 4, (2, 3, n), generator=g).float()           # many ties
        s[s == 0] = float("-inf")
        for k in (1, 3, n // 2, n + 2):
            want = topk_select_ref(s, k)
            padded = torch.cat([s, torch.full((2, 3, 37), float("-inf"))], dim=-1)
            assert torch.equal(topk_select_ref(padded, k), want)
            for b in range(2):
                for h in range(3):
                    r = s[b, h]
                    ok = [i for i in range(n) if r[i] > float("-inf")]
                    best = sorted(sorted(ok, key=lambda i: (-r[i].item(), i))[:k])   # stable: low index first
                    assert want[b, h].tolist() == best + [-1] * (k - len(best))


def test_select_chunks_uniform_pages_is_topk_and_skips_masked():
    s = torch.randn(2, 3, 20)
    s[0, 0, :18] = float("-inf")               # only 2 selectable pages there
    idx = select_chunks(s, 4, budget=16)       # 4 pages of 4 tokens
    assert idx.shape == (2, 3, 4) and idx.dtype == torch.int64
    assert torch.equal(idx[1], s.topk(4, -1).indices.sort(-1).values[1])
    assert idx[0, 0].tolist() == [18, 19, -1, -1]


def test_budget_select_ref_pads_to_the_width_and_rejects_bad_input():
    s = torch.tensor([[[0.5, 2.0, 1.0, -1.0]]])
    ln = torch.tensor([[[3, 4, 0, 2]]])                 # chunk 2 is empty: never selected
    assert budget_select_ref(s, ln, 7, 4).tolist() == [[[0, 1, -1, -1]]]
    assert budget_select_ref(s, ln, 3, 2).tolist() == [[[-1, -1]]]  # the best chunk (4 tokens) overflows: stop
    with pytest.raises(ValueError, match="budget"):
        budget_select_ref(s, ln, 0, 2)
    with pytest.raises(TypeError, match="integer"):
        budget_select_ref(s, ln.float(), 4, 2)


def test_select_chunks_variable_lengths_respects_budget_as_ranked_prefix():
    torch.manual_seed(3)
    b, h, n, budget = 2, 2, 30, 40
    s = torch.randn(b, h, n)
    lens = torch.randint(0, 9, (b, h, n))
    idx = select_chunks(s, lens, budget)
    for bi in range(b):
        for hi in range(h):
            chosen = [c for c in idx[bi, hi].tolist() if c >= 0]
            assert chosen == sorted(chosen)
            assert sum(lens[bi, hi, c].item() for c in chosen) <= budget
            order = [c for c in s[bi, hi].argsort(descending=True).tolist() if lens[bi, hi, c] > 0]
            expect, tot = [], 0
            for c in order:                    # walk the ranking until a chunk overflows
                if tot + lens[bi, hi, c].item() > budget:
                    break
                expect.append(c)
                tot += lens[bi, hi, c].item()
            assert chosen == sorted(expect)


def test_chunks_to_slots_uniform_and_variable():
    idx = torch.tensor([[[2, -1, 0]]])
    assert chunks_to_slots(idx, None, 3).tolist() == [[[6, 7, 8, -1, -1, -1, 0, 1, 2]]]
    starts = torch.tensor([0, 2, 7])
    lens = torch.tensor([2, 5, 1])
    out = chunks_to_slots(torch.tensor([[[1, 2, -1]]]), starts, lens, max_len=5)
    assert out.tolist() == [[[2, 3, 4, 5, 6, 7, -1, -1, -1, -1, -1, -1, -1, -1, -1]]]
    with pytest.raises(ValueError, match="max_len"):
        chunks_to_slots(idx, starts, lens)


# ---- sparse decode attention ------------------------------------------------------------------

def _sdpa(q, k, v, scale):
    """Dense decode through SDPA: q (b, hq, d), k/v (b, hk, n, d) -> (b, hq, d)."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q[:, :, None].float(), k.float(), v.float(), scale=scale)[:, :, 0]


SHAPES = [(1, 4, 4, 33, 16), (2, 8, 2, 100, 64), (1, 32, 8, 70, 128)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_ref_all_slots_equals_sdpa(shape, dtype):
    b, hq, hk, n, d = shape
    q, k, v = (torch.randn(b, hq, d, dtype=dtype), torch.randn(b, hk, n, d, dtype=dtype),
               torch.randn(b, hk, n, d, dtype=dtype))
    idx = torch.arange(n, dtype=torch.int32).expand(b, hk, n)
    scale = d ** -0.5
    out = sparse_decode_attention_ref(q, k, v, idx, scale)
    assert out.shape == (b, hq, d) and out.dtype == dtype
    assert _rel(out, _sdpa(q, k, v, scale)) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_ref_subset_equals_sdpa_over_gathered_keys(shape):
    b, hq, hk, n, d = shape
    cap = n + 17                                  # capacity beyond the used slots
    q, k, v = torch.randn(b, hq, d), torch.randn(b, hk, cap, d), torch.randn(b, hk, cap, d)
    n_sel = max(1, n // 3)
    idx = torch.stack([torch.stack([torch.randperm(n)[:n_sel] for _ in range(hk)]) for _ in range(b)])
    padded = torch.cat([idx, torch.full((b, hk, 5), -1)], dim=-1)[..., torch.randperm(n_sel + 5)]
    scale = 0.3
    out = sparse_decode_attention_ref(q, k, v, padded, scale)
    gi = idx[..., None].expand(b, hk, n_sel, d)
    ref = _sdpa(q, k.gather(2, gi), v.gather(2, gi), scale)
    assert _rel(out, ref) < 1e-5


def test_sparse_ref_page_indices_equal_expanded_slot_indices():
    b, hq, hk, d, page = 2, 8, 2, 32, 8
    q, k, v = torch.randn(b, hq, d), torch.randn(b, hk, 10 * page, d), torch.randn(b, hk, 10 * page, d)
    pages = torch.tensor([[[3, -1, 0], [9, 9, 2]], [[-1, -1, -1], [1, 4, 7]]], dtype=torch.int32)
    slots = chunks_to_slots(pages, None, page)
    out = sparse_decode_attention_ref(q, k, v, pages, 0.2, page=page)
    assert torch.equal(out, sparse_decode_attention_ref(q, k, v, slots, 0.2))
    with pytest.raises(IndexError, match="capacity"):
        sparse_decode_attention_ref(q, k, v, pages + 1, 0.2, page=page)


def test_sparse_ref_empty_selection_gives_zeros_and_bad_input_errors():
    q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 10, 16)
    idx = torch.tensor([[[1, 2], [-1, -1]]])
    out = sparse_decode_attention_ref(q, k, k, idx, 0.25)
    assert torch.equal(out[0, 2:], torch.zeros(2, 16)) and out[0, :2].abs().sum() > 0
    with pytest.raises(TypeError, match="int32 or int64"):
        sparse_decode_attention_ref(q, k, k, idx.float(), 0.25)
    with pytest.raises(ValueError, match="slot_idx"):
        sparse_decode_attention_ref(q, k, k, idx[:, :1], 0.25)
    with pytest.raises(IndexError, match="capacity"):
        sparse_decode_attention_ref(q, k, k, torch.tensor([[[1, 10], [0, 0]]]), 0.25)
    with pytest.raises(ValueError, match="scale"):
        sparse_decode_attention_ref(q, k, k, idx, -1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_attention_of_disjoint_sets_equals_attention_over_their_union(dtype):
    torch.manual_seed(3)
    b, hq, hk, n, d = 2, 8, 2, 50, 16
    q = torch.randn(b, hq, d, dtype=dtype)
    k = torch.randn(b, hk, n, d, dtype=dtype)
    v = torch.randn(b, hk, n, d, dtype=dtype)
    perm = torch.randperm(n)
    a, c = perm[:20].expand(b, hk, 20).clone(), perm[20:].expand(b, hk, n - 20).clone()
    a[1, 0] = -1                                          # one head: everything in the second set
    c[1, 0, : 20] = perm[:20]
    c[1, 0, 20:] = -1
    c[0, 1] = -1                                          # one head: everything in the first set
    union = torch.arange(n).expand(b, hk, n).clone()      # every other head: both sets = all slots
    union[1, 0] = union[0, 1] = torch.cat([perm[:20], torch.full((n - 20,), -1)])
    out_a, lse_a = sparse_decode_attention_ref(q, k, v, a, 0.3, return_lse=True)
    out_c, lse_c = sparse_decode_attention_ref(q, k, v, c, 0.3, return_lse=True)
    assert lse_a.shape == (b, hq) and lse_a.dtype == torch.float32
    assert torch.isinf(lse_a[1, :4]).all() and torch.isfinite(lse_a[0]).all()
    merged = dispatch.merge_attention([(out_a, lse_a), (out_c, lse_c)])
    ref = sparse_decode_attention_ref(q, k, v, union, 0.3)
    assert merged.dtype == dtype
    assert _rel(merged.float(), ref.float()) < (1e-5 if dtype == torch.float32 else 2e-2)
    # nothing valid anywhere: zeros, no NaN
    none = torch.full((b, hk, 3), -1)
    empty = dispatch.merge_attention([sparse_decode_attention_ref(q, k, v, none, 0.3, return_lse=True)] * 2)
    assert torch.equal(empty, torch.zeros_like(empty))


def test_reference_masks_by_position_like_a_premasked_table():
    """key_pos/query_pos/window in the reference equal the same attention over a table whose
    masked slots (padding, future, out of window, past the capacity) were set to -1 by hand."""
    torch.manual_seed(5)
    b, hq, hk, n, d = 2, 8, 2, 40, 16
    q, k, v = torch.randn(b, hq, d), torch.randn(b, hk, n, d), torch.randn(b, hk, n, d)
    kp = torch.randint(-1, 60, (b, hk, n), dtype=torch.int32)
    qp = torch.tensor([30, 55])
    for sel in (None, torch.randint(-2, n + 5, (b, hk, 25))):
        for win in (None, 9):
            idx = torch.arange(n).expand(b, hk, n) if sel is None else sel
            safe = torch.where((idx >= 0) & (idx < n), idx, 0)
            pos = kp.gather(2, safe).long()
            ok = (idx >= 0) & (idx < n) & (pos >= 0) & (pos <= qp[:, None, None])
            if win is not None:
                ok &= pos > qp[:, None, None] - win
            want = sparse_decode_attention_ref(q, k, v, torch.where(ok, idx, -1), 0.3, return_lse=True)
            got = sparse_decode_attention_ref(q, k, v, sel, 0.3, return_lse=True, key_pos=kp, query_pos=qp, window=win)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="go together"):
        sparse_decode_attention_ref(q, k, v, None, 0.3, key_pos=kp)
    with pytest.raises(ValueError, match="window"):
        sparse_decode_attention_ref(q, k, v, None, 0.3, key_pos=kp, query_pos=qp, window=0)


def test_dispatch_on_cpu_uses_the_reference():
    q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 32, 16)
    idx = torch.randint(0, 32, (1, 2, 8))
    assert not dispatch.use_triton(q, k)
    assert torch.equal(dispatch.sparse_decode_attention(q, k, k, idx, 0.25),
                       sparse_decode_attention_ref(q, k, k, idx, 0.25))
    lo, hi = page_summaries(k, 4)
    assert torch.equal(dispatch.chunk_scores(q, (lo, hi), "max"), chunk_scores_ref(q, (lo, hi), "max"))
    assert torch.equal(dispatch.topk_select(s := torch.randn(1, 2, 9), 3), topk_select_ref(s, 3))
    out = dispatch.selected_decode_attention(q, k, k, (lo, hi), page=4, budget=32, scale=0.25)
    assert _rel(out, _sdpa(q, k, k, 0.25)) < 1e-5          # budget covers every page: dense result
    part = dispatch.selected_decode_attention(q, k, k, (lo, hi), page=4, budget=8, scale=0.25)
    pages = dispatch.select_chunks(chunk_scores_ref(q, (lo, hi), "max"), 4, 8)
    gi = chunks_to_slots(pages, None, 4).long()[..., None].expand(1, 2, 8, 16)
    assert _rel(part, _sdpa(q, k.gather(2, gi), k.gather(2, gi), 0.25)) < 1e-5


# ---- Triton through the CPU interpreter (subprocess: TRITON_INTERPRET must precede the import) ----

_INTERP_SCRIPT = textwrap.dedent("""
    import torch
    from kvsift.kernels import chunk_scores as cs, sparse_decode_attention as sda, topk_select as tk
    torch.manual_seed(0)
    def rel(a, b):
        a, b = a.double(), b.double()
        assert not torch.isnan(a).any()
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if b.norm() > 0 else a.norm().item()
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for (b, hq, hk, n, d) in ((1, 4, 4, 3, 16), (2, 8, 2, 37, 64), (1, 8, 1, 9, 48)):
            q = torch.randn(b, hq, d, dtype=dt)
            lo = torch.randn(b, hk, n + 4, d, dtype=dt)[:, :, :n]        # strided view
            hi = lo + torch.rand_like(lo)
            for summ in (lo, (lo, hi)):
                for red in ("mean", "max"):
                    for dot in (True, False):                           # tensor-core and register paths
                        cs.TUNING["dot"] = dot
                        e = rel(cs.chunk_scores(q, summ, red), cs.chunk_scores_ref(q, summ, red))
                        assert e < 1e-5, ("chunk_scores", dt, b, hq, hk, n, d, red, dot, e)
            lo8, hi8, sc, _ = cs.int8_bounds(lo, hi)                     # int8 bounds with their scale
            for red in ("mean", "max"):
                for dot in (True, False):
                    cs.TUNING["dot"] = dot
                    e = rel(cs.chunk_scores(q, (lo8, hi8), red, sc), cs.chunk_scores_ref(q, (lo8, hi8), red, sc))
                    assert e < 1e-5, ("chunk_scores int8", dt, b, hq, hk, n, d, red, dot, e)
            # candidates masked in the same launch: chunks past a row's limit, chunks not valid
            lim = torch.randint(0, n + 1, (b,))
            val = torch.rand(b, hk, n) < 0.7
            for kw in (dict(limit=lim), dict(valid=val), dict(limit=lim[:1].expand(b), valid=val)):
                got, ref = cs.chunk_scores(q, (lo, hi), "max", **kw), cs.chunk_scores_ref(q, (lo, hi), "max", **kw)
                assert torch.equal(torch.isinf(got), torch.isinf(ref)), ("masks", kw.keys())
                fin = torch.isfinite(ref)
                assert rel(got[fin], ref[fin]) < 1e-5 if fin.any() else True, ("masks", kw.keys())
        # int8 bounds over more pages than one block of TUNING["block_n_int8"] (256), a partial last block
        lo = torch.randn(1, 2, 300, 32)
        lo8, hi8, sc, _ = cs.int8_bounds(lo, lo + torch.rand_like(lo))
        q = torch.randn(1, 4, 32)
        for dot in (True, False):
            cs.TUNING["dot"] = dot
            e = rel(cs.chunk_scores(q, (lo8, hi8), "max", sc), cs.chunk_scores_ref(q, (lo8, hi8), "max", sc))
            assert e < 1e-5, ("chunk_scores int8, 300 pages", dot, e)
        cs.TUNING["dot"] = True
        for (b, hq, hk, cap, s, d, ns, page) in ((1, 4, 4, 40, 33, 16, None, 1), (2, 8, 2, 300, 200, 64, 3, 1),
                                                 (1, 8, 1, 100, 150, 48, 1, 1), (2, 4, 2, 64, 6, 32, 2, 8)):
            q = torch.randn(b, hq, 3, d, dtype=dt)[:, :, -1]                # strided, as query[:, :, -1]
            k = torch.randn(b, hk, cap + 5, d, dtype=dt)[:, :, :cap]       # a view of a larger buffer
            v = torch.randn(b, hk, cap, d, dtype=dt)
            idx = torch.randint(-1, cap // page, (b, hk, s), dtype=torch.int64 if ns == 1 else torch.int32)
            if b * hk > 1:
                idx[-1, -1] = -1                                         # one head selects nothing
            out = sda.sparse_decode_attention(q, k, v, idx, d ** -0.5, page=page, num_splits=ns)
            ref = sda.sparse_decode_attention_ref(q, k, v, idx, d ** -0.5, page=page)
            e = rel(out, ref)
            assert e < tol, ("sparse_decode_attention", dt, b, hq, hk, cap, s, d, ns, page, e)
            out, lse = sda.sparse_decode_attention(q, k, v, idx, d ** -0.5, page=page, num_splits=ns, return_lse=True)
            ref, rlse = sda.sparse_decode_attention_ref(q, k, v, idx, d ** -0.5, page=page, return_lse=True)
            assert rel(out, ref) < tol and torch.equal(torch.isinf(lse), torch.isinf(rlse)), ("lse", dt, b, ns)
            fin = torch.isfinite(rlse)
            assert (lse[fin] - rlse[fin]).abs().max().item() < 1e-3, ("lse", dt, b, ns)
            kp = torch.randint(-1, cap, (b, hk, cap), dtype=torch.int32)
            qpos = torch.randint(cap // 4, cap, (b,))
            for sel in ((idx, None) if page == 1 else (idx,)):
                for win in (None, 11):
                    kw = dict(key_pos=kp, query_pos=qpos, window=win)
                    e = rel(sda.sparse_decode_attention(q, k, v, sel, d ** -0.5, page=page, num_splits=ns, **kw),
                            sda.sparse_decode_attention_ref(q, k, v, sel, d ** -0.5, page=page, **kw))
                    assert e < tol, ("masked", dt, b, ns, page, sel is None, win, e)
    for (n, k, impl) in ((37, 5, "packed64"), (100, 0, "int32"), (1000, 64, "packed64"), (1000, 64, "int32"),
                         (10, 20, "int32"), (300, 300, "int32")):
        tk.TUNING["impl"] = impl
        sc = torch.randn(2, 3, n)
        sc[0, 0, ::2] = float("-inf")
        sc[1, 2] = float("-inf")
        sc[1, 1, 3] = float("nan")
        assert torch.equal(tk.topk_select(sc, k), tk.topk_select_ref(sc, k)), ("topk_select", n, k)
        tied = torch.randint(-3, 4, (2, 3, n)).float()                   # many ties at the threshold
        # both keep the lowest indices among ties at the threshold: equal, ties included
        assert torch.equal(tk.topk_select(tied, k), tk.topk_select_ref(tied, k)), ("ties", n, k)
        # one more column from the same launch: each row's tail entry (an expanded (1,) too)
        for tail in (torch.tensor([7, n]), torch.tensor([5]).expand(2)):
            got = tk.topk_select(sc, k, torch.int64, tail=tail)
            assert torch.equal(got, tk.topk_select_ref(sc, k, torch.int64, tail=tail)), ("tail", n, k)
            assert got.shape[-1] == k + 1 and torch.equal(got[..., -1], tail[:, None].expand(2, 3))
    from kvsift.kernels import budget_select as bs
    for (n, k, budget) in ((37, 10, 40), (300, 40, 256), (5, 8, 1000), (64, 0, 10)):
        sc = torch.randn(2, 3, n)
        ln = torch.randint(0, 9, (2, 3, n), dtype=torch.int32)
        sc[0, 1, ::3] = float("-inf")
        sc[1, 0, 2] = float("nan")
        assert torch.equal(bs.budget_select(sc, ln, budget, k), bs.budget_select_ref(sc, ln, budget, k)), \
            ("budget_select", n, k, budget)
    from kvsift.kernels import page_bounds as pb
    for (b, hk, pages, page, d) in ((1, 1, 3, 16, 16), (2, 3, 5, 4, 48)):
        for dt in (torch.float32, torch.bfloat16):
            kbuf = torch.randn(b, hk, pages * page + 3, d, dtype=dt)
            lo, hi = torch.randn(b, hk, pages, d, dtype=dt), torch.randn(b, hk, pages, d, dtype=dt)
            fl = torch.zeros(b, hk, pages, dtype=torch.bool)
            got = [t.clone() for t in (lo, hi, fl)]
            for s in (0, 1, page - 1, page, pages * page - 1):
                slot = torch.tensor([s])
                pb.page_bounds_append_ref(lo, hi, fl, kbuf, slot, page)
                pb.page_bounds_append(*got, kbuf, slot, page)
                assert all(torch.equal(x, y) for x, y in zip(got, (lo, hi, fl))), ("page_bounds", b, hk, page, d, s)
            lo8, hi8, _, inv = cs.int8_bounds(lo, hi)                     # int8 codes, keys beyond them clamp
            fl = torch.zeros(b, hk, pages, dtype=torch.bool)
            got = [t.clone() for t in (lo8, hi8, fl)]
            for s in (0, 1, page - 1, page, pages * page - 1):
                slot = torch.tensor([s])
                pb.page_bounds_append_ref(lo8, hi8, fl, 3 * kbuf, slot, page, inv)
                pb.page_bounds_append(*got, 3 * kbuf, slot, page, inv)
                assert all(torch.equal(x, y) for x, y in zip(got, (lo8, hi8, fl))), ("page_bounds int8", b, hk, page, d, s)
    print("INTERP_OK")
""")


def test_triton_kernels_match_references_in_interpreter():
    run_in_triton_interpreter(_INTERP_SCRIPT)


# ---- Triton on CUDA ---------------------------------------------------------------------------

cuda_triton = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")


@cuda_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 32, 8, 4096, 128), (3, 8, 2, 1000, 64), (2, 14, 2, 300, 64)])
def test_cuda_kernels_match_references(dtype, shape):
    b, hq, hk, n, d = shape
    dev = "cuda"
    q = torch.randn(b, hq, d, dtype=dtype, device=dev)
    k = torch.randn(b, hk, n, d, dtype=dtype, device=dev)
    v = torch.randn(b, hk, n, d, dtype=dtype, device=dev)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    lo, hi = page_summaries(k[:, :, : n // 16 * 16], 16)
    saved = dict(cs_mod.TUNING)
    try:
        for dot in (True, False):
            cs_mod.TUNING["dot"] = dot
            for summ in (lo, (lo, hi)):
                for red in ("mean", "max"):
                    assert _rel(dispatch.chunk_scores(q, summ, red), chunk_scores_ref(q, summ, red)) < 1e-5
    finally:
        cs_mod.TUNING.update(saved)
    for s in (1, 64, 777, n):
        idx = torch.randint(-1, n, (b, hk, s), device=dev, dtype=torch.int32)
        out = dispatch.sparse_decode_attention(q, k, v, idx, d ** -0.5)
        assert _rel(out, sparse_decode_attention_ref(q, k, v, idx, d ** -0.5)) < tol
        pages = torch.randint(-1, n // 16, (b, hk, max(1, s // 16)), device=dev, dtype=torch.int32)
        out = dispatch.sparse_decode_attention(q, k, v, pages, d ** -0.5, page=16)
        assert _rel(out, sparse_decode_attention_ref(q, k, v, pages, d ** -0.5, page=16)) < tol
    saved = dict(tk_mod.TUNING)
    try:
        for impl in ("packed64", "int32"):
            tk_mod.TUNING["impl"] = impl
            for n_sc, kk in ((n // 16, 31), (8192, 128), (100, 200), (40000, 2048), (131072, 64), (132096, 2048)):
                sc = torch.randn(b, hk, n_sc, device=dev)
                sc[0, 0, ::3] = float("-inf")
                assert torch.equal(dispatch.topk_select(sc, kk), topk_select_ref(sc, kk))
                _check_topk_with_ties(dispatch.topk_select, torch.randint(-3, 4, (b, hk, n_sc), device=dev).float(), kk)
    finally:
        tk_mod.TUNING.update(saved)
    lim = torch.randint(0, n // 16 + 1, (b,), device=dev)
    val = torch.rand(b, hk, n // 16, device=dev) < 0.7
    got = dispatch.chunk_scores(q, (lo, hi), "max", limit=lim, valid=val)
    ref = chunk_scores_ref(q, (lo, hi), "max", limit=lim, valid=val)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    if fin.any():
        assert _rel(got[fin], ref[fin]) < 1e-5
    tail = torch.full((b,), 3, device=dev)
    sc = torch.randn(b, hk, 8192, device=dev)
    assert torch.equal(dispatch.topk_select(sc, 128, torch.int64, tail=tail),
                       topk_select_ref(sc, 128, torch.int64, tail=tail))
    for n_ch, budget in ((n // 16, 512), (4096, 2048), (8192, 100)):   # sentencekv's variable-length chunks
        sc = torch.randn(b, hk, n_ch, device=dev)
        ln = torch.randint(0, 33, (b, hk, n_ch), device=dev, dtype=torch.int32)
        sc[0, 0, ::5] = float("-inf")
        kk = min(n_ch, budget)
        assert torch.equal(dispatch.budget_select(sc, ln, budget, kk), budget_select_ref(sc, ln, budget, kk))
    full = torch.arange(n, device=dev, dtype=torch.int64).expand(b, hk, n)
    out = dispatch.sparse_decode_attention(q, k, v, full, d ** -0.5)
    assert _rel(out, _sdpa(q, k, v, d ** -0.5)) < tol
    # masking by position inside the kernel: every slot (slot_idx None) or a table naming slots past
    # the capacity; padding, future and out-of-window positions skipped
    kp = torch.randint(-1, n, (b, hk, n), device=dev, dtype=torch.int32)
    qpos = torch.randint(n // 4, n, (b,), device=dev)
    for sel in (None, torch.randint(-3, n + 40, (b, hk, 300), device=dev)):
        for win in (None, 97):
            for lse in (False, True):
                kw = dict(key_pos=kp, query_pos=qpos, window=win, return_lse=lse)
                got = dispatch.sparse_decode_attention(q, k, v, sel, d ** -0.5, **kw)
                ref = sparse_decode_attention_ref(q, k, v, sel, d ** -0.5, **kw)
                if lse:
                    (got, glse), (ref, rlse) = got, ref
                    assert torch.equal(torch.isfinite(glse), torch.isfinite(rlse))
                assert _rel(got, ref) < tol
    # log-sum-exp output (split and single-program launches) and the merge of two disjoint halves
    for s in (64, n):
        idx = torch.randint(-1, n, (b, hk, s), device=dev, dtype=torch.int32)
        out, lse = dispatch.sparse_decode_attention(q, k, v, idx, d ** -0.5, return_lse=True)
        ref, rlse = sparse_decode_attention_ref(q, k, v, idx, d ** -0.5, return_lse=True)
        fin = torch.isfinite(rlse)
        assert _rel(out, ref) < tol and torch.equal(fin, torch.isfinite(lse))
        assert (lse[fin] - rlse[fin]).abs().max().item() < 1e-2
    half = full[..., : n // 2], full[..., n // 2:]
    merged = dispatch.merge_attention([dispatch.sparse_decode_attention(q, k, v, h, d ** -0.5, return_lse=True)
                                       for h in half])
    assert _rel(merged, _sdpa(q, k, v, d ** -0.5)) < tol


def _check_topk_with_ties(fn, sc, kk):
    """With ties the chosen indices may differ from torch.topk's, but not the chosen values."""
    got, ref = fn(sc, kk), topk_select_ref(sc, kk)
    assert got.shape == ref.shape and torch.equal((got >= 0).sum(-1), (ref >= 0).sum(-1))
    for row_s, row_g, row_r in zip(sc.flatten(0, 1), got.flatten(0, 1), ref.flatten(0, 1)):
        gi, ri = row_g[row_g >= 0].long(), row_r[row_r >= 0].long()
        assert torch.equal(gi, gi.sort().values) and gi.unique().numel() == gi.numel()
        assert torch.equal(row_s[gi].sort().values, row_s[ri].sort().values)


# ---- Quest's page bounds, kept current on append -------------------------------------------------

def test_page_bounds_append_ref_equals_bounds_of_the_written_keys():
    from kvsift.kernels.page_bounds import page_bounds_append_ref

    torch.manual_seed(0)
    b, hk, page, pages, d = 2, 3, 4, 3, 8
    kbuf = torch.randn(b, hk, page * pages, d)
    lo, hi = torch.full((b, hk, pages, d), 9.0), torch.full((b, hk, pages, d), -9.0)   # stale values
    filled = torch.zeros(b, hk, pages, dtype=torch.bool)
    for s in range(page * pages - 2):                                 # the last page: two of four slots
        page_bounds_append_ref(lo, hi, filled, kbuf, torch.tensor([s]), page)
    want = kbuf.view(b, hk, pages, page, d)
    assert torch.equal(lo[:, :, :2], want[:, :, :2].amin(3)) and torch.equal(hi[:, :, :2], want[:, :, :2].amax(3))
    assert torch.equal(lo[:, :, 2], want[:, :, 2, :2].amin(2)) and torch.equal(hi[:, :, 2], want[:, :, 2, :2].amax(2))
    assert filled.all()
    with pytest.raises(ValueError, match="slot"):
        page_bounds_append_ref(lo, hi, filled, kbuf, torch.tensor([1.0]), page)


def test_int8_bounds_are_outward_rounded_powers_of_two_and_still_bound_the_scores():
    from kvsift.kernels.chunk_scores import int8_bounds
    from kvsift.kernels.page_bounds import page_bounds_append_ref

    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 64, 16, generator=g) * torch.logspace(-3, 1, 16)   # channels of other scales
    lo, hi = page_summaries(keys, 16, "minmax")
    lo8, hi8, scale, inv = int8_bounds(lo, hi)
    assert lo8.dtype == hi8.dtype == torch.int8 and scale.shape == (2, 3, 1, 16)
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale) and torch.equal(scale * inv, torch.ones_like(scale))
    assert bool((lo8.float() * scale <= lo).all()) and bool((hi8.float() * scale >= hi).all())   # outward
    assert int(lo8.min()) >= -127 and int(hi8.max()) <= 127
    assert bool(((hi8.float() - lo8.float()) * scale <= hi - lo + 2 * scale).all())               # one step each side
    # the largest magnitude of each channel lands in the top half of the code range
    top = torch.maximum(lo8.abs(), hi8.abs()).amax(2)
    assert bool(((top > 63) & (top <= 127)).all())
    q = torch.randn(2, 12, 16, generator=g)
    bound = chunk_scores_ref(q, (lo8, hi8), "max", scale)
    qg = q.view(2, 3, 4, 16)
    true = torch.einsum("bhgd,bhnd->bhgn", qg, keys).view(2, 3, 4, 4, 16).amax(-1).amax(2)   # (b, h, pages)
    assert bool((bound >= true - 1e-4).all())
    # and are at most one code step per channel looser than the float bounds' scores
    slack = (qg.abs() * scale).sum(-1).amax(2)[..., None]               # (b, h, 1)
    assert bool((bound <= chunk_scores_ref(q, (lo, hi), "max") + slack + 1e-4).all())
    # appended keys enter the codes outward too, clamped at the code range
    fl = torch.zeros(2, 3, 4, dtype=torch.bool)
    kbuf = keys.clone()
    kbuf[:, :, 5] *= 1000.0                                            # beyond the scale: clamps
    a_lo, a_hi = lo8.clone(), hi8.clone()
    for s in range(64):
        page_bounds_append_ref(a_lo, a_hi, fl, kbuf, torch.tensor([s]), 16, inv)
    want_lo = torch.floor(kbuf * inv).clamp(-127, 127).view(2, 3, 4, 16, 16).amin(3)
    want_hi = torch.ceil(kbuf * inv).clamp(-127, 127).view(2, 3, 4, 16, 16).amax(3)
    assert torch.equal(a_lo.float(), want_lo) and torch.equal(a_hi.float(), want_hi) and fl.all()
    untouched = torch.ones(4, dtype=torch.bool)
    untouched[0] = False                                               # the clamped key's page
    assert torch.equal(a_lo[:, :, untouched], lo8[:, :, untouched]) and torch.equal(a_hi[:, :, untouched], hi8[:, :, untouched])
    with pytest.raises(ValueError, match="inverse scale"):
        page_bounds_append_ref(a_lo, a_hi, fl, kbuf, torch.tensor([1]), 16)
    with pytest.raises(TypeError, match="int8"):
        chunk_scores_ref(q, (lo, hi), "max", scale)


@cuda_triton
def test_cuda_int8_bounds_kernels_match_reference():
    from kvsift.kernels import chunk_scores as cs, page_bounds as pb

    b, hk, page, pages, d = 2, 8, 16, 300, 128
    keys = torch.randn(b, hk, page * pages, d, device="cuda", dtype=torch.bfloat16)
    lo, hi = page_summaries(keys, page, "minmax")
    lo8, hi8, scale, inv = cs.int8_bounds(lo, hi)
    q = torch.randn(b, 32, d, device="cuda", dtype=torch.bfloat16)
    for red in ("max", "mean"):
        got, want = cs.chunk_scores(q, (lo8, hi8), red, scale), cs.chunk_scores_ref(q, (lo8, hi8), red, scale)
        torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
    ref = [lo8.clone(), hi8.clone(), torch.zeros(b, hk, pages, dtype=torch.bool, device="cuda")]
    got = [t.clone() for t in ref]
    for s in (0, 1, 15, 16, 17, 300, page * pages - 1):
        slot = torch.tensor([s], device="cuda")
        pb.page_bounds_append_ref(*ref, 2 * keys, slot, page, inv)
        pb.page_bounds_append(*got, 2 * keys, slot, page, inv)
        assert all(torch.equal(x, y) for x, y in zip(got, ref)), s


@cuda_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_page_bounds_append_matches_reference(dtype):
    from kvsift.kernels import page_bounds as pb

    b, hk, page, pages, d = 3, 8, 16, 40, 128
    kbuf = torch.randn(b, hk, page * pages, d, dtype=dtype, device="cuda")
    ref = [torch.randn(b, hk, pages, d, dtype=dtype, device="cuda"), torch.randn(b, hk, pages, d, dtype=dtype,
           device="cuda"), torch.zeros(b, hk, pages, dtype=torch.bool, device="cuda")]
    got = [t.clone() for t in ref]
    for s in (0, 1, 15, 16, 17, 300, page * pages - 1):
        slot = torch.tensor([s], device="cuda")
        pb.page_bounds_append_ref(*ref, kbuf, slot, page)
        pb.page_bounds_append(*got, kbuf, slot, page)
        assert all(torch.equal(x, y) for x, y in zip(got, ref)), s


def test_topk_select_long_equals_the_reference_without_ties():
    """The GPU's path for rows past the kernel's ``MAX_N`` (``torch.topk`` + a sort of the ``k``
    indices) selects what the reference does where no score ties at the threshold."""
    from kvsift.kernels.topk_select import topk_select_long

    g = torch.Generator().manual_seed(7)
    s = torch.randn(2, 3, 500, generator=g)
    s[0, 0, ::2] = float("-inf")
    s[1, 1, 7] = float("nan")
    s[1, 2] = float("-inf")
    for k in (0, 1, 40, 250, 600):
        for dt in (torch.int32, torch.int64):
            assert torch.equal(topk_select_long(s, k, dt), topk_select_ref(s, k, dt)), (k, dt)


def test_every_module_imports_and_runs_without_triton():
    """A machine without Triton (the README's CPU setup) imports every kvsift module and runs the
    references: the shared jit helpers (``_flash``) must exist as names there too. A subprocess, with
    ``import triton`` made to fail, so this holds also where Triton is installed."""
    import pkgutil
    import subprocess
    import sys

    import kvsift

    names = sorted(m.name for m in pkgutil.walk_packages(kvsift.__path__, "kvsift.")
                   if not m.name.endswith("__main__"))
    code = textwrap.dedent(f"""
        import importlib, sys
        sys.modules["triton"] = None          # `import triton` raises ImportError
        sys.modules["triton.language"] = None
        from kvsift.kernels._triton import HAS_TRITON
        assert not HAS_TRITON
        for name in {names!r}:
            importlib.import_module(name)
        import torch
        from kvsift.kernels import dispatch
        q = torch.randn(1, 4, 8); lo = torch.randn(1, 2, 3, 8); hi = lo + 1
        print(tuple(dispatch.chunk_scores(q, (lo, hi)).shape))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(1, 2, 3)"


def _triton_block_names(path) -> tuple[set[str], dict[str, int]]:
    """Names a kernel module binds at its top level outside ``if HAS_TRITON:`` blocks, and the
    names bound inside them (with their line)."""
    import ast

    tree = ast.parse(path.read_text())
    outside: set[str] = set()
    inside: dict[str, int] = {}

    def bound(node) -> list[tuple[str, int]]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return [(node.name, node.lineno)]
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            return [(t.id, node.lineno) for t in targets if isinstance(t, ast.Name)]
        return []

    def is_triton_guard(node) -> bool:
        return isinstance(node, ast.If) and "HAS_TRITON" in ast.unparse(node.test)

    for node in tree.body:
        if is_triton_guard(node):
            for sub in ast.walk(node):
                for name, line in bound(sub):
                    if sub in node.body or sub in node.orelse:
                        inside.setdefault(name, line)
        else:
            outside.update(name for name, _ in bound(node))
    return outside, inside


def test_no_triton_definition_shadows_a_reference_helper():
    """A ``@triton.jit`` helper defined under ``if HAS_TRITON:`` with the name of a module-level
    Python function replaces it on machines with Triton only: the CPU tests pass, and on CUDA the
    reference calls the jit function and fails ("Cannot call @triton.jit'd outside of the scope of
    a kernel"). KIVI's reference did exactly that once (``_unpack``)."""
    from pathlib import Path

    import kvsift.kernels as pkg

    clashes = []
    files = sorted(Path(pkg.__file__).parent.glob("*.py"))
    assert len(files) > 10
    for path in files:
        outside, inside = _triton_block_names(path)
        clashes += [f"{path.name}:{line} {name}" for name, line in inside.items() if name in outside]
    assert not clashes, f"Triton definitions shadow module-level names: {clashes}"


def test_the_shadowing_check_sees_a_clash(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text(textwrap.dedent("""
        HAS_TRITON = True
        def _unpack(x):
            return x
        if HAS_TRITON:
            def _ok(b):
                return b
            def _unpack(b, BITS):
                return b
    """))
    outside, inside = _triton_block_names(src)
    assert "_unpack" in outside and set(inside) == {"_ok", "_unpack"}


@pytest.mark.parametrize("junk", [float("nan"), float("inf"), 7.5])
def test_shared_reference_ignores_any_bits_in_empty_slots(junk):
    """One row (or a shared view) read whole: the CPU reference first reads the values as they are
    and zeroes empty slots (position -1) only when the result is not finite, so whatever an empty
    slot holds, the output (and log-sum-exp) equals that of zeroed empty slots, bit for bit."""
    torch.manual_seed(0)
    b, hq, hk, n, d = 1, 6, 2, 40, 16
    q = torch.randn(b, hq, d)
    k, v = torch.randn(b, hk, n, d), torch.randn(b, hk, n, d)
    pos = torch.arange(n).expand(b, hk, n).clone()
    pos[:, 0, 5:9] = -1
    pos[:, 1, 30:] = -1
    empty = (pos < 0)[..., None]
    clean_k, clean_v = torch.where(empty, 0.0, k), torch.where(empty, 0.0, v)
    dirty_k, dirty_v = torch.where(empty, junk, k), torch.where(empty, junk, v)
    qp = torch.tensor([n])
    want, want_lse = sparse_decode_attention_ref(q, clean_k, clean_v, None, 0.25, return_lse=True, key_pos=pos,
                                                 query_pos=qp)
    got, got_lse = sparse_decode_attention_ref(q, dirty_k, dirty_v, None, 0.25, return_lse=True, key_pos=pos,
                                               query_pos=qp)
    assert torch.equal(got, want) and torch.equal(got_lse, want_lse)
