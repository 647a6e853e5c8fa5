"""minference: the index builders against their definitions, the sparse prefill attention (reference
vs masked dense attention, Triton vs reference in the CPU interpreter and on CUDA), exactness at a
full selection through the engine (alone and before snapkv), options and pattern-file errors, and
the pattern search command."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvsift import LLM, SamplingParams, build_method
from kvsift.errors import MethodOptionError
from kvsift.kernels import dispatch
from kvsift.kernels._triton import HAS_TRITON
from kvsift.kernels.sparse_prefill_attention import selected_mask, sparse_prefill_attention_ref
from kvsift.methods.minference import (PATTERNS, MInference, _top_lines, a_shape_blocks, block_sparse_blocks,
                                       blocks_to_index, estimate_rows, load_patterns, vertical_slash_index)
from tests.conftest import random_prompt, run_in_triton_interpreter

ROOT = Path(__file__).resolve().parents[1]
# max_density=1: every chunk of these tiny random models goes sparse, however many keys it lists
SPARSE = {"min_len": 0, "vertical": 16, "slash": 2, "block": 16, "top_blocks": 3, "local": 32, "max_density": 1.0}
EVERYTHING = {"min_len": 0, "vertical": 10 ** 6, "slash": 4, "block": 16, "max_density": 1.0}


def _causal(L, n):
    return torch.arange(n)[None, :] <= (n - L + torch.arange(L))[:, None]


def _masked_dense(q, k, v, mask, scale):
    """Attention with a dense boolean mask ``(batch, q_heads, L, n)`` (the definition)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).float(), v.repeat_interleave(g, 1).float()
    w = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    return torch.softmax(w.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0) @ v


def _random_index(b, hq, L, n, block, kb=3, nc=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-L // block), -(-n // block)
    bm = torch.rand(b, hq, nqb, nkb, generator=g) < kb / nkb
    qb = torch.arange(nqb)
    bm[:, :, qb, (n - L + qb * block) // block] = True                 # every row sees a key
    bi = blocks_to_index(bm)
    cols = torch.randint(-1, n, (b, hq, nqb, nc), generator=g)
    cols = torch.where(bm.gather(3, cols.clamp(min=0) // block) | (cols < 0), -1, cols).to(torch.int32)
    return bi, cols


# ---- index builders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("L,n,block", [(40, 100, 16), (64, 64, 16), (17, 130, 32)])
def test_a_full_selection_is_every_causal_pair(L, n, block):
    torch.manual_seed(0)
    q, k = torch.randn(1, 3, L, 8), torch.randn(1, 1, n, 8)
    causal = _causal(L, n)
    bm, cols = vertical_slash_index(q, k, n, 64, n, 1, block, 0.3)
    assert torch.equal(selected_mask(blocks_to_index(bm), cols, L, n, block)[0, 0], causal)
    bm = block_sparse_blocks(q, k, n, 10 ** 6, block, 0.3)
    assert torch.equal(selected_mask(blocks_to_index(bm), None, L, n, block)[0, 1], causal)
    bm = a_shape_blocks(L, n, block, n, "cpu")[None, None]
    assert torch.equal(selected_mask(blocks_to_index(bm), None, L, n, block)[0, 0], causal)


@pytest.mark.parametrize("L", [48, 45])   # whole query blocks, and a last one that ends early
def test_vertical_slash_index_follows_its_definition(L):
    """Top columns and diagonals of the last queries' attention, by explicit loops."""
    torch.manual_seed(1)
    n, d, block, last_q, nv, ns = 160, 16, 16, 8, 5, 3
    q, k = torch.randn(1, 2, L, d) * 2, torch.randn(1, 1, n, d) * 2
    bm, cols = vertical_slash_index(q, k, n, last_q, nv, ns, block, 0.25)
    for h in range(2):
        vs, ss = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for i in range(last_q):
            qs = n - last_q + i
            a = torch.softmax((k[0, 0, : qs + 1].double() @ q[0, h, L - last_q + i].double()) * 0.25, 0)
            for j in range(qs + 1):
                vs[j] += a[j]
                ss[qs - j] += a[j]
        vs[0] = ss[0] = float("inf")
        top_cols = set(vs.topk(nv).indices.tolist())
        top_offs = ss.topk(ns).indices.tolist()
        want = torch.zeros(L, n, dtype=torch.bool)
        for r in range(L):
            qb0, qb1 = n - L + r // block * block, n - L + min(L, r // block * block + block) - 1
            for o in top_offs:  # a diagonal is attended as the key blocks it crosses in the query block
                for s in (qb0, qb1):
                    if qb1 - o >= 0:
                        kb = max(s - o, 0) // block
                        want[r, kb * block: kb * block + block] = True
            for c in top_cols:
                want[r, c] = True
        want &= _causal(L, n)
        got = selected_mask(blocks_to_index(bm), cols, L, n, block)[0, h]
        assert torch.equal(got, want), h
        # the columns listed are exactly the top ones not already inside a listed block
        listed = cols[0, h][cols[0, h] >= 0]
        assert set(listed.tolist()) <= top_cols


@pytest.mark.parametrize("coverage", [0.3, 0.6, 0.9])
def test_coverage_keeps_the_shortest_top_prefix_reaching_that_share(coverage):
    g = torch.Generator().manual_seed(5)
    mass = torch.rand(2, 3, 50, generator=g) ** 4                  # a few heavy lines, a long light tail
    idx, keep = _top_lines(mass, 40, coverage)
    assert torch.equal(_top_lines(mass, 40, None)[0], idx) and _top_lines(mass, 40, None)[1].all()
    for b in range(2):
        for h in range(3):
            m, i, kp = mass[b, h], idx[b, h].tolist(), keep[b, h]
            assert i[0] == 0 and sorted(m[i[1:]].tolist(), reverse=True) == m[i[1:]].tolist()
            c = int(kp.sum())
            assert kp[:c].all() and not kp[c:].any()               # a prefix of the ranking
            kept = float(m[i[:c]].sum())
            assert kept >= coverage * float(m.sum()) - 1e-5 or c == 40       # reaches the share (or the cap)
            assert float(m[i[:c - 1]].sum()) < coverage * float(m.sum()) + 1e-5   # and no shorter prefix does


def test_coverage_lists_a_subset_that_holds_that_share_of_the_estimating_queries_attention():
    torch.manual_seed(4)
    L = n = 192
    d, block, last_q, scale = 16, 16, 24, 0.5
    q, k = torch.randn(1, 3, L, d) * 2, torch.randn(1, 1, n, d) * 2
    k[0, 0, 37] += 3 * q[0, :, -last_q:].mean((0, 1))              # a column the last queries like
    causal = _causal(L, n)
    w = torch.softmax((q[0].double() @ k[0, 0].double().T * scale).masked_fill(~causal, float("-inf")), -1)
    sel = {}
    for cov in (None, 0.9, 0.6, 0.3):
        bm, cols = vertical_slash_index(q, k, n, last_q, n // 2, n // 2, block, scale, cov)
        sel[cov] = selected_mask(blocks_to_index(bm), cols, L, n, block)[0]          # (heads, L, n)
        recall = (w[:, -last_q:] * sel[cov][:, -last_q:]).sum((1, 2)) / last_q          # per head
        assert (recall >= (cov or 0.0) - 1e-5).all(), (cov, recall)
    for hi, lo in ((None, 0.9), (0.9, 0.6), (0.6, 0.3)):
        assert not (sel[lo] & ~sel[hi]).any()                      # lower coverage: never more keys
    assert sel[0.3].sum() < sel[None].sum()


def test_estimate_rows_are_the_last_queries_and_a_spread_before_them():
    assert estimate_rows(100, 16, 0, "cpu").tolist() == list(range(84, 100))
    rows = estimate_rows(100, 16, 5, "cpu").tolist()
    assert rows == [0, 21, 42, 62, 83] + list(range(84, 100))
    assert estimate_rows(10, 16, 8, "cpu").tolist() == list(range(10))            # the chunk is all last rows
    assert estimate_rows(20, 16, 99, "cpu").tolist() == list(range(20))           # more samples than rows
    rows = estimate_rows(4096, 64, 64, "cpu")
    assert rows.numel() == 128 and torch.equal(rows, rows.unique()) and rows[0] == 0


def test_sample_q_estimates_from_the_spread_rows_too():
    """With ``sample_q`` the listed columns are the top of the attention of the spread rows and the
    last rows summed, so a column only early rows attend gets in (the last rows alone never rank
    it); with ``coverage`` those rows' recall reaches the share."""
    torch.manual_seed(6)
    L = n = 160
    d, block, last_q, scale = 16, 16, 16, 0.5
    q, k = torch.randn(1, 2, L, d), torch.randn(1, 1, n, d)
    q[0, :, :40] += 4 * k[0, 0, 5]                                 # the chunk's first rows look at key 5
    bm0, c0 = vertical_slash_index(q, k, n, last_q, 2, 1, block, scale)
    bm1, c1 = vertical_slash_index(q, k, n, last_q, 2, 1, block, scale, sample_q=16)
    assert not (c0 == 5).any() and (c1 == 5).any()
    rows = estimate_rows(L, last_q, 16, "cpu")
    causal = _causal(L, n)[rows]
    w = torch.softmax((q[0, :, rows] @ k[0, 0].T * scale).masked_fill(~causal, float("-inf")), -1)   # (2, r, n)
    for h in range(2):
        col = w[h].sum(0)
        col[0] = float("inf")
        assert set(c1[0, h][c1[0, h] >= 0].tolist()) <= set(col.topk(2).indices.tolist())
    # coverage with spread rows: those rows' recall reaches the share (the estimate's guarantee)
    for cov in (0.9, 0.6):
        bm, cols = vertical_slash_index(q, k, n, last_q, n // 2, n // 2, block, scale, cov, sample_q=16)
        sel = selected_mask(blocks_to_index(bm), cols, L, n, block)[0][:, rows]   # (heads, r, n)
        recall = (w * sel).sum((1, 2)) / rows.numel()
        assert (recall >= cov - 1e-5).all(), (cov, recall)


def test_block_sparse_picks_the_top_pooled_blocks_and_the_diagonal():
    torch.manual_seed(2)
    L, n, d, block, top = 32, 128, 8, 16, 3
    q, k = torch.randn(1, 1, L, d), torch.randn(1, 1, n, d)
    k[0, 0, 16:32] += 3 * q[0, 0].mean(0)                          # key block 1 matches every query
    bm = block_sparse_blocks(q, k, n, top, block, 1.0)[0, 0]         # (2, 8)
    assert bm.sum(-1).tolist() == [top, top]
    assert bm[:, 1].all() and bm[0, 6] and bm[1, 7]                 # the planted block, the diagonal ones
    pq = q[0, 0].view(2, block, d).mean(1)
    pk = k[0, 0].view(8, block, d).mean(1)
    for i in range(2):
        s = pq[i] @ pk.T
        s[6 + i] = float("inf")
        assert set(torch.nonzero(bm[i]).flatten().tolist()) == set(s.topk(top).indices.tolist())


# ---- attention ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 4, 2, 40, 100, 16, 16), (2, 4, 1, 64, 64, 32, 32), (1, 2, 2, 17, 130, 48, 16)])
def test_reference_is_masked_attention_over_the_selection(shape):
    b, hq, hk, L, n, d, block = shape
    torch.manual_seed(3)
    q, k, v = torch.randn(b, hq, L, d), torch.randn(b, hk, n, d), torch.randn(b, hk, n, d)
    bi, cols = _random_index(b, hq, L, n, block)
    for c in (cols, None):
        mask = selected_mask(bi, c, L, n, block)
        out = sparse_prefill_attention_ref(q, k, v, bi, c, d ** -0.5, block)
        assert torch.allclose(out, _masked_dense(q, k, v, mask, d ** -0.5), atol=1e-5)
    every = blocks_to_index(torch.ones(b, hq, -(-L // block), -(-n // block), dtype=torch.bool))
    out = sparse_prefill_attention_ref(q, k, v, every, None, d ** -0.5, block)
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1),
                                          attn_mask=_causal(L, n), scale=d ** -0.5)
    assert torch.allclose(out, sdpa, atol=1e-5)


def test_slash_blocks_and_blocks_to_index_match_a_direct_marking():
    """Every diagonal marked per query block (the obvious way) against the block-diagonal form,
    over offsets that reach past the chunk's first key and chunks with and without a partial last
    query block; and the index lists each row's blocks ascending, -1 padded."""
    from kvsift.methods.minference import _mark, slash_blocks

    g = torch.Generator().manual_seed(4)
    for L, n, block in ((64, 64, 16), (45, 160, 16), (100, 300, 32), (17, 17, 16), (130, 1000, 64)):
        offs = torch.stack([torch.randperm(n, generator=g)[:7] for _ in range(6)]).view(2, 3, 7)
        offs[0, 0, 0] = 0
        offs[1, 2, 0] = n - 1
        nqb, nkb = -(-L // block), -(-n // block)
        want = torch.zeros(2, 3, nqb, nkb + 1, dtype=torch.bool)
        s0 = n - L + torch.arange(0, L, block)
        s1 = n - L + torch.clamp(torch.arange(0, L, block) + block, max=L) - 1
        lo, hi = s0[None, None, :, None] - offs[:, :, None, :], s1[None, None, :, None] - offs[:, :, None, :]
        _mark(want, lo.clamp(min=0) // block, hi >= 0)
        _mark(want, hi.clamp(min=0) // block, hi >= 0)
        got = slash_blocks(offs, L, n, block)
        assert torch.equal(got, want[..., :nkb]), (L, n, block)
        idx = blocks_to_index(got)
        for b in range(2):
            for h in range(3):
                for i in range(nqb):
                    listed = torch.nonzero(got[b, h, i]).flatten().tolist()
                    assert idx[b, h, i].tolist() == listed + [-1] * (idx.shape[-1] - len(listed))
        assert idx.is_contiguous() and idx.dtype == torch.int32


def test_loop_bounds_count_the_whole_blocks_the_listed_end_and_the_columns():
    from kvsift.kernels.sparse_prefill_attention import loop_bounds

    # L = 32 queries, the last of n = 80 keys, blocks of 16: query block 0 is rows at slots 48..63,
    # block 1 at 64..79; key blocks 0-2 (slots 0..47) are whole for both, block 3 for block 1 only
    bi = torch.tensor([[[[0, 1, 2, 3, -1], [0, 2, 3, 4, -1]]]], dtype=torch.int32)
    cols = torch.tensor([[[[5, -1, 7, -1], [-1, -1, -1, -1]]]], dtype=torch.int32)
    whole, ends, col_ends = loop_bounds(bi, cols, 32, 80, 16)
    assert whole.tolist() == [[[3, 3]]]          # block 3 holds query block 0's own slots (masked)
    assert ends.tolist() == [[[4, 4]]]
    assert col_ends.tolist() == [[[3, 0]]]
    # an unlisted entry stops the unmasked run; an order that is not ascending too
    bi2 = torch.tensor([[[[1, -1, 0, 2]]]], dtype=torch.int32)
    whole, ends, none = loop_bounds(bi2, None, 16, 64, 16)
    assert whole.tolist() == [[[1]]] and ends.tolist() == [[[4]]] and none is None


def test_bad_index_arguments_are_clear_errors():
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 20, 16)
    bi = torch.zeros(1, 4, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="block must be one of"):
        sparse_prefill_attention_ref(q, k, k, bi, None, 0.25, 24)
    with pytest.raises(ValueError, match="block_idx must be"):
        sparse_prefill_attention_ref(q, k, k, bi[:, :2], None, 0.25, 16)
    with pytest.raises(TypeError, match="int32 or int64"):
        sparse_prefill_attention_ref(q, k, k, bi.float(), None, 0.25, 16)
    with pytest.raises(ValueError, match="last of the"):
        sparse_prefill_attention_ref(torch.randn(1, 4, 30, 16), k, k, bi, None, 0.25, 16)


_INTERP_SCRIPT = textwrap.dedent("""
    import torch
    from kvsift.kernels import sparse_prefill_attention as spa
    from kvsift.methods.minference import MInference
    torch.manual_seed(0)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for (b, hq, hk, L, n, d, block) in ((1, 4, 2, 40, 100, 16, 16), (2, 4, 1, 64, 64, 32, 32),
                                            (1, 2, 2, 17, 130, 48, 16)):
            q = torch.randn(b, hq, L + 3, d, dtype=dt)[:, :, 3:]            # a strided view
            k, v = torch.randn(b, hk, n, d, dtype=dt), torch.randn(b, hk, n, d, dtype=dt)
            heads = ("vertical_slash", "block_sparse", "a_shape", "vertical_slash")[:hq]
            m = MInference(min_len=0, vertical=9, slash=3, block=block, top_blocks=2, local=20, patterns="default")
            bi, cols = m.index(q, k, heads, d ** -0.5)
            # the builders list blocks first and in order; any order, with unlisted -1 entries
            # between listed ones, must give the same attention (only the loop bounds change)
            perm = torch.randperm(bi.shape[-1] + 2)
            shuffled = torch.cat([bi, torch.full_like(bi[..., :2], -1)], -1)[..., perm]
            for bi_, c in ((bi, cols), (bi, None), (shuffled, cols)):
                out = spa.sparse_prefill_attention(q, k, v, bi_, c, d ** -0.5, block)
                ref = spa.sparse_prefill_attention_ref(q, k, v, bi_, c, d ** -0.5, block)
                e = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
                assert e < tol, (dt, b, hq, hk, L, n, d, block, c is None, e)
    spa.TUNING["skip_mask"] = False   # every block through the masked loop: the same result
    out = spa.sparse_prefill_attention(q, k, v, bi, cols, d ** -0.5, block)
    assert torch.allclose(out.float(), spa.sparse_prefill_attention_ref(q, k, v, bi, cols, d ** -0.5, block).float(),
                          atol=3e-2)
    print("INTERP_OK")
""")


def test_triton_kernel_matches_reference_in_interpreter():
    run_in_triton_interpreter(_INTERP_SCRIPT)


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 32, 8, 512, 4096, 128, 64), (2, 8, 2, 300, 1000, 64, 32)])
def test_cuda_kernel_matches_reference(dtype, shape):
    b, hq, hk, L, n, d, block = shape
    q = torch.randn(b, hq, L, d, dtype=dtype, device="cuda")
    k, v = torch.randn(b, hk, n, d, dtype=dtype, device="cuda"), torch.randn(b, hk, n, d, dtype=dtype, device="cuda")
    m = MInference(min_len=0, vertical=200, slash=40, block=block, top_blocks=8, local=256, patterns="default")
    heads = [PATTERNS[h % 3] for h in range(hq)]
    bi, cols = m.index(q, k, heads, d ** -0.5)
    out = dispatch.sparse_prefill_attention(q, k, v, bi, cols, d ** -0.5, block)
    ref = sparse_prefill_attention_ref(q, k, v, bi, cols, d ** -0.5, block)
    assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < (1e-5 if dtype == torch.float32 else 1e-2)


# ---- the method through the engine ----------------------------------------------------------------
def _nll(llm, ids, cont, method, **kw):
    return llm.score(ids, cont, method=method, method_kwargs=kw)[0]


def test_full_selection_equals_dense_prefill(tiny_llms, tmp_path):
    ids = random_prompt(300, seed=5)
    cont = random_prompt(6, seed=6)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    for llm in tiny_llms.values():
        full = llm.generate(ids, p)[0]
        out = llm.generate(ids, p, method="minference", method_kwargs=EVERYTHING)[0]
        assert out.token_ids == full.token_ids
        assert out.stats.method_stats["minference_sparse_chunks"] > 0 and out.stats.method_stats[
            "minference_dense_chunks"] == 0
        assert out.stats.kv_kept_bytes == full.stats.kv_kept_bytes
        dense = _nll(llm, ids, cont, "full")
        mixed = _table(tmp_path, model=llm.info.name)   # every pattern, each selecting everything
        for kw in (EVERYTHING, dict(EVERYTHING, patterns=str(mixed), top_blocks=10 ** 6, local=10 ** 6),
                   dict(EVERYTHING, sample_q=32)):
            assert abs(_nll(llm, ids, cont, "minference", **kw) - dense) < 1e-4 * max(1.0, abs(dense))
        # and really sparse: another likelihood, fewer keys listed
        sparse = llm.generate(ids, p, method="minference", method_kwargs=SPARSE)[0]
        assert sparse.stats.method_stats["minference_density"] < 0.5
        assert abs(_nll(llm, ids, cont, "minference", **SPARSE) - dense) > 1e-4


def test_dense_tail_lists_every_causal_block_for_the_last_rows_only():
    """The query blocks holding the prompt's last ``dense_tail`` tokens list every causal key block
    and no column (their attention is dense); the others keep the sparse index; a tail as long as
    the prompt is dense prefill."""
    torch.manual_seed(8)
    L, n, d, block = 100, 160, 16, 16          # a chunk of 100 rows at slots 60..159, prompt of 160
    q, k, v = torch.randn(1, 4, L, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    heads = ("vertical_slash", "block_sparse", "a_shape", "vertical_slash")
    base = dict(min_len=0, vertical=3, slash=2, block=block, top_blocks=2, local=16, patterns="default")
    bi0, c0 = MInference(**base).index(q, k, heads, d ** -0.5, n)
    bi, c = MInference(**base, dense_tail=20).index(q, k, heads, d ** -0.5, n)
    # rows at slots 140..159 are the tail: query blocks 5 (slots 140..155) and 6 (156..159)
    nkb = -(-n // block)
    for h in range(4):
        for i in range(bi.shape[2]):
            s1 = n - L + min(L, (i + 1) * block) - 1
            listed = sorted(x for x in bi[0, h, i].tolist() if x >= 0)
            if i >= 5:
                assert listed == [j for j in range(nkb) if j * block <= s1] and (c[0, h, i] < 0).all()
            else:
                assert listed == sorted(x for x in bi0[0, h, i].tolist() if x >= 0)
                assert torch.equal(c[0, h, i], c0[0, h, i])
    sel = selected_mask(bi, c, L, n, block)[0]
    causal = _causal(L, n)
    assert torch.equal(sel[:, 80:], causal[80:].expand(4, -1, -1))          # the tail rows: every causal key
    every = MInference(**base, dense_tail=n).index(q, k, heads, d ** -0.5, n)
    assert torch.equal(selected_mask(*every, L, n, block)[0], causal.expand(4, -1, -1))
    # without the prompt's length (a caller outside the engine) the index is the sparse one
    assert torch.equal(MInference(**base, dense_tail=20).index(q, k, heads, d ** -0.5)[0], bi0)


def test_dense_tail_through_the_engine_matches_dense_when_it_covers_the_prompt(tiny_llm):
    ids = random_prompt(300, seed=9)
    cont = random_prompt(6, seed=10)
    dense = _nll(tiny_llm, ids, cont, "full")
    sparse = _nll(tiny_llm, ids, cont, "minference", **SPARSE)
    tail = _nll(tiny_llm, ids, cont, "minference", **dict(SPARSE, dense_tail=len(ids)))
    assert abs(tail - dense) < 1e-4 * max(1.0, abs(dense)) and abs(sparse - dense) > 1e-4
    st = tiny_llm.generate(ids, SamplingParams(max_tokens=2, ignore_eos=True), method="minference",
                           method_kwargs=dict(SPARSE, dense_tail=32))[0].stats.method_stats
    assert st["minference_sparse_chunks"] > 0


def test_dense_tail_counts_from_each_rows_own_end_in_a_batch(tiny_llm):
    """Rows of 300 and 200 tokens prefilled row by row: each row's tail ends at its own last token
    (the run's prompt length is the longest row's), so each row answers as it does alone."""
    from types import SimpleNamespace

    from kvsift.methods.minference import prompt_end

    run = SimpleNamespace(prompt_len=300)
    assert prompt_end(run, SimpleNamespace(row=(1, 2), prompt_ids=[[0] * 200])) == 200
    assert prompt_end(run, SimpleNamespace(row=None, prompt_ids=[[0] * 300])) == 300
    long, short = random_prompt(300, seed=11), random_prompt(200, seed=12)
    p = SamplingParams(max_tokens=12, ignore_eos=True)
    kw = dict(SPARSE, dense_tail=120)
    batch = tiny_llm.generate([long, short], p, method="minference", method_kwargs=kw)
    alone = [tiny_llm.generate(x, p, method="minference", method_kwargs=kw)[0] for x in (long, short)]
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
    # the keys listed: the batch's run sums both rows' chunks, so its mean density is the alone
    # runs' densities weighted by their sparse chunk-layers (a tail counted from the longest row's
    # end would list fewer keys for the short row)
    st = [o.stats.method_stats for o in alone]
    n = [x["minference_sparse_chunks"] for x in st]
    want = sum(x["minference_density"] * k for x, k in zip(st, n)) / sum(n)
    got = batch[0].stats.method_stats
    assert got["minference_sparse_chunks"] == sum(n) and abs(got["minference_density"] - want) < 1e-3


def test_as_first_stage_it_changes_only_the_prefill_attention(tiny_llm):
    ids = random_prompt(300, seed=7)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    snap = tiny_llm.generate(ids, p, method="snapkv", budget=64)[0]
    both = tiny_llm.generate(ids, p, method="minference+snapkv", budget=64, method_kwargs=EVERYTHING)[0]
    assert both.token_ids == snap.token_ids and both.stats.kv_device_bytes == snap.stats.kv_device_bytes
    sparse = tiny_llm.generate(ids, p, method="minference+snapkv", budget=64, method_kwargs=SPARSE)[0]
    assert sparse.stats.kv_device_bytes == snap.stats.kv_device_bytes       # snapkv still keeps its budget
    assert sparse.stats.method_stats["minference_sparse_chunks"] > 0
    # a batch goes row by row (no padding: every chunk sparse), as snapkv alone would
    m = build_method("minference+snapkv", 64, **SPARSE)
    assert m.row_prefill_ok()
    outs = tiny_llm.generate([ids, random_prompt(200, seed=8)], p, method=m)
    assert all(o.stats.method_stats["minference_dense_chunks"] == 0 for o in outs)
    sk = tiny_llm.generate([ids, random_prompt(200, seed=8)], p, method="minference+sentencekv", budget=96,
                           method_kwargs=EVERYTHING)
    ref = tiny_llm.generate([ids, random_prompt(200, seed=8)], p, method="sentencekv", budget=96)
    assert [o.token_ids for o in sk] == [o.token_ids for o in ref]
    # a head-wise (compact KV) method composes after it: minference keeps no state
    ada = tiny_llm.generate(ids, p, method="minference+adakv(snapkv)", budget=64, method_kwargs=EVERYTHING)[0]
    assert ada.token_ids == tiny_llm.generate(ids, p, method="adakv(snapkv)", budget=64)[0].token_ids


def test_short_prompts_padding_and_reread_passes_attend_densely(tiny_llm):
    ids = random_prompt(200, seed=9)
    p = SamplingParams(max_tokens=2, ignore_eos=True)
    st = tiny_llm.generate(ids, p, method="minference", method_kwargs=dict(SPARSE, min_len=201))[0].stats.method_stats
    assert st["minference_sparse_chunks"] == 0 and st["minference_dense_chunks"] > 0
    outs = tiny_llm.generate([ids, ids[:150]], p, method="minference", method_kwargs=SPARSE)  # auto: row by row
    assert outs[0].stats.method_stats["minference_dense_chunks"] == 0
    batch = LLM.from_model(tiny_llm.model, tiny_llm.tokenizer, chunk_size=64, prefill_mode="batch")
    outs = batch.generate([ids, ids[:150]], p, method="minference", method_kwargs=SPARSE)  # left-padded batch
    assert outs[0].stats.method_stats["minference_sparse_chunks"] == 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in batch.generate([ids, ids[:150]], p)]
    assert tiny_llm.generate(ids, p, method="minference+kvzip", budget=64, method_kwargs=SPARSE)[0].token_ids


def test_min_len_none_prefills_densely_below_where_the_sizes_alone_reach_max_density(tiny_llm):
    """``min_len=None``: prompts shorter than ``dense_below`` (c = vertical + slash listed keys per row
    reach a mean density of max_density: 2c/n - (c/n)**2) prefill densely without an index."""
    m = MInference()
    c, md = m.vertical + m.slash, m.max_density
    n = m.dense_below
    assert 2 * c / n - (c / n) ** 2 <= md < 2 * c / (n - 1) - (c / (n - 1)) ** 2 and n == 43444
    assert MInference(min_len=5).dense_below == 5 and MInference(max_density=1.0).dense_below == c
    ids = random_prompt(200, seed=9)
    p = SamplingParams(max_tokens=2, ignore_eos=True)
    auto = {k: v for k, v in SPARSE.items() if k != "min_len"}   # vertical 16 + slash 2: 18 tokens at density 1
    assert MInference(**auto).dense_below == 18
    st = tiny_llm.generate(ids, p, method="minference", method_kwargs=auto)[0].stats.method_stats
    assert st["minference_sparse_chunks"] > 0 and st["minference_dense_chunks"] == 0
    low = dict(auto, vertical=100, slash=50, max_density=0.9)   # 150 / (1 - sqrt(0.1)) = 220 > 200 tokens
    assert MInference(**low).dense_below == 220
    st = tiny_llm.generate(ids, p, method="minference", method_kwargs=low)[0].stats.method_stats
    assert st["minference_sparse_chunks"] == st["minference_fallback_chunks"] == 0 and st["minference_dense_chunks"] > 0


@pytest.mark.parametrize("kw,match", [({"block": 24}, "block must be one of"), ({"top_blocks": 1}, "top_blocks"),
                                      ({"last_q": 0}, "last_q"), ({"vertical": "8"}, "vertical"),
                                      ({"min_len": -1}, "min_len"), ({"patterns": 3}, "patterns"),
                                      ({"dense_tail": -1}, "dense_tail"), ({"dense_tail": 1.5}, "dense_tail"),
                                      ({"patterns": "/nonexistent/p.json"}, "not found"),
                                      ({"max_density": 0}, "max_density"), ({"max_density": 1.5}, "max_density"),
                                      ({"max_density": "0.5"}, "max_density"), ({"max_density": True}, "max_density"),
                                      ({"coverage": 0}, "coverage"), ({"coverage": 1.01}, "coverage"),
                                      ({"coverage": True}, "coverage"), ({"coverage": "0.9"}, "coverage"),
                                      ({"sample_q": -1}, "sample_q"), ({"sample_q": 2.5}, "sample_q")])
def test_bad_options_are_method_option_errors(kw, match):
    with pytest.raises(MethodOptionError, match=match):
        build_method("minference", **kw)
    with pytest.raises(MethodOptionError, match=match):
        build_method("minference+snapkv", 64, **kw)


def _table(tmp_path, **over):
    data = {"format": "kvsift-minference-patterns/1", "model": "tiny-llama", "num_layers": 2, "num_heads": 4,
            "layers": [["a_shape", "vertical_slash", "block_sparse", "a_shape"], ["block_sparse"] * 4]}
    data.update(over)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return path


def test_pattern_files_are_checked_against_the_model(tiny_llms, tmp_path):
    ids = random_prompt(200, seed=10)
    p = SamplingParams(max_tokens=2, ignore_eos=True)
    path = _table(tmp_path)
    assert load_patterns(path).layers[0] == ("a_shape", "vertical_slash", "block_sparse", "a_shape")
    out = tiny_llms["llama"].generate(ids, p, method="minference", method_kwargs=dict(SPARSE, patterns=str(path)))
    assert out[0].stats.method_stats["minference_sparse_chunks"] > 0
    with pytest.raises(MethodOptionError, match="for model 'tiny-llama'.*not 'tiny-qwen2'"):
        tiny_llms["qwen2"].generate(ids, p, method="minference", method_kwargs=dict(SPARSE, patterns=str(path)))
    path = _table(tmp_path, model="tiny-qwen2", num_layers=3, layers=[["a_shape"] * 4] * 3)
    with pytest.raises(MethodOptionError, match=r"3 layers x 4 heads"):
        tiny_llms["qwen2"].generate(ids, p, method="minference", method_kwargs=dict(SPARSE, patterns=str(path)))
    for over, match in (({"layers": [["a_shape"] * 4]}, "2 lists of 4"), ({"format": "x"}, "format"),
                        ({"layers": [["diagonal"] * 4] * 2}, "unknown pattern")):
        with pytest.raises(MethodOptionError, match=match):
            build_method("minference", patterns=str(_table(tmp_path, **over)))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MethodOptionError, match="not readable JSON"):
        build_method("minference", patterns=str(tmp_path / "bad.json"))


def test_search_command_writes_a_file_the_method_loads(default_tokenizer, tmp_path, monkeypatch, capsys):
    from kvsift import LLM
    from kvsift.cli import main
    from kvsift.models.tiny import save_tiny_model

    monkeypatch.setenv("KVSIFT_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "tiny", "llama", seed=1, tokenizer=default_tokenizer)
    args = ["minference", "search", "--model", str(model), "--tokens", "256", "--keys", "64", "--block", "16",
            "--chunk-size", "64"]
    assert main(args + ["--out", str(tmp_path / "p.json"), "--margin", "0"]) == 0
    data = json.loads((tmp_path / "p.json").read_text())
    assert (data["model"], data["num_layers"], data["num_heads"]) == ("tiny", 2, 4)
    assert data["search"]["margin"] == 0
    for i, row in enumerate(data["layers"]):  # margin 0: each head's pattern is its best recall
        for h, pat in enumerate(row):
            assert data["recall"][pat][i][h] == max(data["recall"][p][i][h] for p in PATTERNS)
    # picked again from the stored recalls, no model: margin 1 keeps vertical-slash everywhere
    assert main(["minference", "search", "--recall-from", str(tmp_path / "p.json"), "--margin", "1",
                 "--out", str(tmp_path / "vs.json")]) == 0
    vs = json.loads((tmp_path / "vs.json").read_text())
    assert vs["recall"] == data["recall"] and vs["search"]["margin"] == 1
    assert all(p == "vertical_slash" for row in vs["layers"] for p in row)
    assert main(args + ["--out", str(tmp_path / "p.json")]) == 0   # the default margin, the same recalls
    data = json.loads((tmp_path / "p.json").read_text())
    assert main(args) == 0                                           # default: the cache, found by itself
    assert json.loads((tmp_path / "cache" / "minference" / "tiny.json").read_text())["layers"] == data["layers"]
    llm = LLM(str(model), chunk_size=64)
    out = llm.generate(random_prompt(200, seed=11), SamplingParams(max_tokens=2, ignore_eos=True),
                       method="minference", method_kwargs=dict(SPARSE, patterns=str(tmp_path / "p.json")))[0]
    assert out.stats.method_stats["minference_sparse_chunks"] > 0
    capsys.readouterr()
    assert main(["minference", "search", "--model", str(model), "--block", "24"]) == 2
    assert "kvsift: error: minference option block" in capsys.readouterr().err
    assert main(["minference", "search", "--model", str(tmp_path / "missing")]) == 2
    assert main(["minference", "search", "--model", str(model), "--tokens", "256", "--keys", "8"]) == 2
    assert "--keys must be at least 2 blocks" in capsys.readouterr().err


def test_a_head_leaves_vertical_slash_only_for_a_clear_recall_gain(tmp_path, capsys):
    from kvsift.cli import main
    from kvsift.methods._minference_search import MARGIN, choose_patterns

    recall = {"a_shape": [[0.90, 0.50, 0.99]], "vertical_slash": [[0.88, 0.60, 0.80]],
              "block_sparse": [[0.70, 0.95, 0.99]]}
    assert choose_patterns(recall, 0.0) == [["a_shape", "block_sparse", "a_shape"]]   # best wins, first on ties
    assert choose_patterns(recall, MARGIN) == [["vertical_slash", "block_sparse", "a_shape"]]
    assert choose_patterns(recall, 0.36) == [["vertical_slash"] * 3]
    with pytest.raises(ValueError, match="margin"):
        choose_patterns(recall, -0.1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "kvsift-minference-patterns/1", "layers": [["a_shape"]]}))
    capsys.readouterr()
    assert main(["minference", "search", "--recall-from", str(bad)]) == 2   # no recalls stored
    assert "kvsift: error: not a searched pattern file" in capsys.readouterr().err
    assert main(["minference", "search", "--recall-from", str(tmp_path / "none.json")]) == 2
    assert main(["minference", "search", "--recall-from", str(bad), "--margin", "2"]) == 2
    assert "--margin must be in [0, 1]" in capsys.readouterr().err


def test_bench_writes_dense_and_sparse_rows(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import minference_prefill as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    out = tmp_path / "b.json"
    assert bench.main(["--lengths", "256", "--layers", "1", "--chunk", "128", "--reps", "1", "--block", "32",
                       "--sample-q", "16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    layer = {r["pattern"]: r for r in rows if r["kind"] == "layer"}
    assert set(layer) == {"dense", *PATTERNS}
    assert all(0 < layer[p]["density"] <= 1 and layer[p]["attn_ms"] > 0 and layer[p]["sample_q"] == 16
               for p in PATTERNS)
    e2e = {r["method"]: r for r in rows if r["kind"] == "e2e"}
    assert e2e["minference@sparse"]["method_stats"]["minference_sparse_chunks"] == 2  # 1 layer x 2 chunks
    st = e2e["minference"]["method_stats"]   # the default max_density: each chunk sparse or too dense for it
    assert st["minference_sparse_chunks"] + st["minference_fallback_chunks"] == 2
    assert e2e["full"]["prefill_s"] > 0 and e2e["minference"]["speedup"] > 0


def test_bench_on_a_real_model_uses_the_searched_patterns_and_the_default_ones(tiny_llm, tmp_path, monkeypatch):
    """``--model``: the suite's prompts prefilled with the model's searched pattern file and with the
    default table; both sparse paths give rows beside ``full`` (its first token too)."""
    import kvsift
    from kvsift.methods.minference import cache_path

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import minference_prefill as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    monkeypatch.setenv("KVSIFT_CACHE", str(tmp_path / "cache"))
    info = tiny_llm.info
    table = [["a_shape", "vertical_slash", "block_sparse", "vertical_slash"][: info.num_heads]] * info.num_layers
    path = cache_path(info.name)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": "kvsift-minference-patterns/1", "model": info.name,
                                "num_layers": info.num_layers, "num_heads": info.num_heads, "layers": table}))
    asked = []
    monkeypatch.setattr(kvsift, "LLM", lambda model, **kw: asked.append((model, kw)) or tiny_llm)
    out = tmp_path / "r.json"
    assert bench.main(["--model", "some-model", "--lengths", "300", "--tasks", "niah", "--chunk", "128",
                       "--vertical", "16", "--slash", "2", "--block", "16", "--top-blocks", "3", "--local", "32",
                       "--out", str(out)]) == 0
    assert asked[0][0] == "some-model" and asked[0][1]["chunk_size"] == 128
    data = json.loads(out.read_text())
    assert data["meta"]["searched_patterns"] is True and data["meta"]["model_name"] == info.name
    rows = data["rows"]
    assert [(r["method"], r["patterns"]) for r in rows] == [
        ("full", None), ("minference", None), ("minference@sparse", None),
        ("full", "default"), ("minference", "default"), ("minference@sparse", "default")]
    assert all(r["task"] == "niah" and r["length"] > 200 and r["prefill_s"] > 0 and r["first_call_prefill_s"] > 0
               for r in rows)
    for r in rows:
        if r["method"] == "minference@sparse":   # every chunk (the tiny LLM's own size) through the sparse kernel
            assert r["method_stats"]["minference_sparse_chunks"] == info.num_layers * -(-r["length"] // tiny_llm.chunk_size)
            assert 0 < r["method_stats"]["minference_density"] <= 1
        if r["method"] != "full":
            assert isinstance(r["same_first_token"], bool) and r["speedup"] > 0


def test_server_runs_it_and_refuses_a_pattern_file_of_another_model(make_client, tmp_path, monkeypatch):
    from kvsift.methods.minference import cache_path

    monkeypatch.setenv("KVSIFT_CACHE", str(tmp_path / "cache"))
    c = make_client()
    body = {"prompt": random_prompt(200, seed=12), "max_tokens": 2, "ignore_eos": True,
            "kv_method": "minference+snapkv", "kv_budget": 64, "kv_options": SPARSE}
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["kvsift"]["stats"][0]["method_stats"]["minference_sparse_chunks"] > 0
    other = _table(tmp_path, model="another-model")
    r = c.post("/v1/completions", json=dict(body, kv_options=dict(SPARSE, patterns=str(other))))
    assert r.status_code == 400 and "names a file on the server" in r.json()["error"]["message"], r.text
    cached = cache_path("tiny-llama")                        # the server's own file, made for another model
    cached.parent.mkdir(parents=True)
    cached.write_text(other.read_text())
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 400 and "not 'tiny-llama'" in r.json()["error"]["message"], r.text
    r = c.post("/v1/completions", json=dict(body, kv_options=dict(SPARSE, patterns="default")))
    assert r.status_code == 200, r.text


def test_search_compares_patterns_at_one_density():
    from kvsift.methods._minference_search import _recall_at, pattern_recall

    pts = [(0.1, 0.5), (0.3, 0.9), (0.6, 0.95)]
    assert _recall_at(pts, 0.2) == pytest.approx(0.7) and _recall_at(pts, 0.05) == pytest.approx(0.25)
    assert _recall_at(pts, 0.9) == 0.95
    # a head whose queries all look at a few far columns: vertical-slash finds them, A-shape cannot
    torch.manual_seed(4)
    L = n = 256
    d = 16
    q = torch.randn(1, 1, L, d) * 0.1
    k = torch.randn(1, 1, n, d) * 0.1
    q[..., 0] += 3.0
    k[0, 0, [5, 77, 130], 0] = 6.0
    recall, target = pattern_recall(q, k, 1.0, 48, 16, 32)
    assert 0 < target < 1
    assert recall["vertical_slash"][0] > recall["a_shape"][0] + 0.2


def test_search_takes_the_lower_recall_of_all_queries_and_the_last_ones():
    """A head local for every query but the last ``last_q``, which look far back (a question reading
    the document): over all queries A-shape would look good; the last queries' recall rules it out."""
    from kvsift.methods._minference_search import pattern_recall

    torch.manual_seed(5)
    L = n = 256
    k = torch.nn.functional.normalize(torch.randn(1, 1, n, 64), dim=-1)
    q = 8.0 * k.clone()                                   # each query attends to its own key: a diagonal
    q[0, 0, -32:] = 8.0 * k[0, 0, 77]                     # the last 32 read key 77, far back
    recall, _ = pattern_recall(q, k, 1.0, 48, 16, 32)
    assert recall["a_shape"][0] < 0.3                     # its window cannot reach key 77 from the end
    assert recall["vertical_slash"][0] > 0.6 and recall["vertical_slash"][0] > recall["a_shape"][0] + 0.3


def test_the_engine_asks_prefill_attention_only_for_fresh_unpadded_prefill_chunks(tiny_llm):
    """The hook is part of the method contract: asked per layer and prefill chunk (never at decode,
    never for a padded batch), and its answer is the layer's attention output."""
    from dataclasses import dataclass

    from kvsift.methods.base import KVMethod

    calls = []

    @dataclass(frozen=True)
    class Zero(KVMethod):
        needs_budget = False

        def prefill_attention(self, run, layer, query, keys, values, scale, module, ctx):
            calls.append((layer.layer_idx, ctx.decoding, query.shape[2], keys.shape[2]))
            return torch.zeros_like(query)

    ids = random_prompt(150, seed=13)
    p = SamplingParams(max_tokens=3, ignore_eos=True)
    tiny_llm.generate(ids, p, method=Zero())
    assert calls and not any(c[1] for c in calls)
    assert sorted({(c[2], c[3]) for c in calls}) == [(22, 150), (64, 64), (64, 128)]   # chunks of 64
    nll_zero = tiny_llm.score(ids, [5, 6], method=Zero())[0]
    assert abs(nll_zero - tiny_llm.score(ids, [5, 6])[0]) > 1e-3
    calls.clear()
    tiny_llm.generate([ids, ids[:100]], p, method=Zero())
    assert not calls


def test_a_chunk_whose_index_is_too_dense_attends_densely(tiny_llm):
    # every key listed (density 1) is over the default max_density: each chunk falls back to dense
    # attention (exact: the tokens of `full`); at max_density=1 the same chunks go sparse
    ids = random_prompt(300, seed=11)
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    dense_index = dict(EVERYTHING)
    del dense_index["max_density"]
    assert build_method("minference", **dense_index).max_density == 0.3
    out = tiny_llm.generate(ids, p, method="minference", method_kwargs=dense_index)[0]
    st = out.stats.method_stats
    assert st["minference_fallback_chunks"] > 0 and st["minference_sparse_chunks"] == 0, st
    assert out.token_ids == tiny_llm.generate(ids, p)[0].token_ids
    st = tiny_llm.generate(ids, p, method="minference", method_kwargs=EVERYTHING)[0].stats.method_stats
    assert st["minference_sparse_chunks"] > 0 and st["minference_fallback_chunks"] == st["minference_dense_chunks"] == 0
    # a sparse index under the threshold stays sparse
    st = tiny_llm.generate(ids, p, method="minference", method_kwargs=dict(SPARSE, max_density=0.9))[0].stats
    assert st.method_stats["minference_sparse_chunks"] > 0 and st.method_stats["minference_density"] <= 0.9


def test_coverage_through_the_engine_lists_fewer_keys(tiny_llm):
    # (end to end a sparser chunk changes the next chunks' queries, so only the index-level test
    # above can show "never more"; here the option reaches the index and binds)
    ids = random_prompt(300, seed=12)
    p = SamplingParams(max_tokens=4, ignore_eos=True)
    wide = dict(SPARSE, vertical=256)
    dens = {}
    for cov in (None, 0.3):
        out = tiny_llm.generate(ids, p, method="minference", method_kwargs=dict(wide, coverage=cov))[0]
        st = out.stats.method_stats
        assert st["minference_sparse_chunks"] > 0 and len(out.token_ids) == 4
        dens[cov] = st["minference_density"]
    assert build_method("minference", coverage=0.9).coverage == 0.9
    assert dens[0.3] < 0.8 * dens[None], dens
