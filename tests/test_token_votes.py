"""token_votes (kvsift/kernels/token_votes.py), TokenSelect's soft votes: the reference against a
naive float64 loop (GQA groups and the layer vote, padding slots, a limit per row, a head and a
row without candidates); the Triton kernels against the reference through the CPU interpreter and
on CUDA, rows flagged ``skip`` left out; the top-k's ``skip`` flag, its in-place ``out`` (skipped
rows keep what they held) and its blocked form for long rows (``topk_select_blocked``) against
``topk_select_ref``; the selection cache's decision (``query_reuse``) against its reference and a
plain cosine similarity."""

from __future__ import annotations

import pytest
import torch

from kvsift.kernels import dispatch
from kvsift.kernels import token_votes as tv
from kvsift.kernels import topk_select as tk
from tests.conftest import needs_cuda_triton, run_in_triton_interpreter


def naive(q, k, pos, limit, vote="group", fill=-1.0):
    b, hq, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    g = hq // hk
    per_head = torch.zeros(b, hq, n, dtype=torch.float64)
    cand = torch.zeros(b, hk, n, dtype=torch.bool)
    for bi in range(b):
        for h in range(hk):
            c = (pos[bi, h] >= 0) & (torch.arange(n) < int(limit[bi]))
            cand[bi, h] = c
            for j in range(g):
                if c.any():
                    logits = (k[bi, h].double() @ q[bi, h * g + j].double()) * d ** -0.5
                    per_head[bi, h * g + j, c] = torch.softmax(logits[c], 0)
    votes = per_head.view(b, hk, g, n).sum(2)
    if vote == "layer":
        votes = votes.sum(1, keepdim=True).expand(b, hk, n)
    return torch.where(cand, votes, fill)


def make_case(seed, b=3, hq=8, hk=2, n=37, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, n, d, generator=g).to(dtype)
    pos = torch.arange(n).expand(b, hk, n).clone()
    pos[torch.rand(b, hk, n, generator=g) < 0.2] = -1        # holes and padding
    pos[0, 1] = -1                                            # a head without candidates
    limit = torch.randint(n // 2, n + 1, (b,), generator=g)
    limit[-1] = 0                                             # a row without candidates
    return q, k, pos, limit


@pytest.mark.parametrize("vote", ["group", "layer"])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_a_naive_loop(vote, seed):
    q, k, pos, limit = make_case(seed)
    got = tv.token_votes_ref(q, k, pos, limit, vote)
    want = naive(q, k, pos, limit, vote)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert bool((got[-1] == -1.0).all())                      # no candidate: every slot at fill
    assert bool((got[0, 1] == -1.0).all())


def test_fill_and_checks():
    q, k, pos, limit = make_case(0)
    got = tv.token_votes_ref(q, k, pos, limit, fill=float("-inf"))
    assert torch.equal(torch.isinf(got), tv.token_votes_ref(q, k, pos, limit) == -1.0)
    with pytest.raises(ValueError, match="vote"):
        tv.token_votes_ref(q, k, pos, limit, vote="heads")
    with pytest.raises(ValueError, match="limit"):
        tv.token_votes_ref(q, k, pos, limit[:1])
    with pytest.raises(ValueError, match="skip"):
        tv.token_votes_ref(q, k, pos, limit, skip=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="skip"):
        tk.topk_select_blocked(torch.randn(2, 1, 40), 4, skip=torch.zeros(3, dtype=torch.bool))


def test_dispatch_runs_the_reference_on_the_cpu():
    q, k, pos, limit = make_case(2)
    assert torch.equal(dispatch.token_votes(q, k, pos, limit, "group", -1.0, torch.ones(3, dtype=torch.bool)),
                       tv.token_votes_ref(q, k, pos, limit))       # the reference computes skipped rows too


def test_blocked_top_k_needs_room_for_its_candidates():
    assert tk.block_levels(131072, 2048) == [tk.MAX_N]             # 8 blocks x 2,048 = 16,384
    # a static buffer a little longer than 128k: 9 x 2,048 candidates, then 2 x 2,048
    assert tk.block_levels(131072 + 64, 2048) == [tk.MAX_N, tk.MAX_N]
    assert tk.block_levels(131072, 4096) == [tk.MAX_N, tk.MAX_N]   # 32,768 candidates, then 8,192
    assert tk.block_levels(1 << 20, 2048) == [tk.MAX_N, tk.MAX_N]  # a million: 131,072, then 16,384
    assert tk.block_levels(8192, 128, 1024) == [1024]
    for n in (131072 + 1024, 262144 + 1024, (1 << 20) + 1024):      # the engine's buffers: prompt + reserve
        for k in (1024, 2048, 4096):                               # TokenSelect's budgets: all on Triton
            assert tk.blocked_fits(n, k), (n, k)
    assert not tk.blocked_fits(262144 + 1024, 8192)                # half of each block kept: too many levels
    assert not tk.blocked_fits(131072, 9000)                       # k too large to shrink 4 levels in
    assert not tk.blocked_fits(131072, tk.MAX_N)                   # a level of one candidate list per block
    assert not tk.blocked_fits(10, tk.MAX_N + 1)
    assert tk.blocked_fits(8192, 128, 1024) and not tk.blocked_fits(8192, 2048, 1024)   # k > block
    assert not tk.blocked_fits(8192, 128, 2 * tk.MAX_N)


def test_top_k_out_keeps_the_skipped_rows():
    """Every path of ``dispatch.topk_select`` writes into ``out`` but its ``skip`` rows, as the
    kernels do (the reference here, on the CPU): TokenSelect keeps its cached selection there."""
    s = torch.randn(3, 2, 50, generator=torch.Generator().manual_seed(1))
    skip = torch.tensor([False, True, False])
    out = torch.full((3, 2, 4), 7, dtype=torch.int64)
    got = dispatch.topk_select(s, 4, torch.int64, skip, out=out)
    ref = tk.topk_select_ref(s, 4, torch.int64)
    assert got is out and torch.equal(out[~skip], ref[~skip]) and bool((out[1] == 7).all())
    assert torch.equal(dispatch.topk_select(s, 4, torch.int64, out=out), ref)          # no skip: every row
    with pytest.raises(ValueError, match="out must be"):
        dispatch.topk_select(s, 4, torch.int32, skip, out=out)


def test_query_reuse_reference():
    """The decision is the mean over heads of each head's cosine similarity against the
    threshold; ``last_q`` becomes ``q`` and the counters add the rows decided and reused."""
    g = torch.Generator().manual_seed(0)
    last = torch.randn(3, 4, 8, generator=g)
    q = last.clone()
    q[1] = torch.randn(4, 8, generator=g)                     # a new direction
    q[2] = -last[2]                                           # the opposite one
    counts = torch.zeros(2, dtype=torch.int64)
    want = torch.nn.functional.cosine_similarity(q, last, dim=-1).mean(-1) >= 0.9
    kept = last.clone()
    flag = tv.query_reuse_ref(q, last, 0.9, counts)
    assert torch.equal(flag, want) and flag.tolist() == [True, False, False]
    assert torch.equal(last, q) and counts.tolist() == [3, 1]
    assert tv.query_reuse_ref(q, kept, -1.0, counts).all() and counts.tolist() == [6, 4]
    with pytest.raises(ValueError, match="counts"):
        tv.query_reuse_ref(q, last, 0.9, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="last_q"):
        tv.query_reuse_ref(q, last[:2], 0.9, counts)

# ---- Triton through the CPU interpreter -----------------------------------------------------------

_INTERP = r"""
import torch
from kvsift.kernels import token_votes as tv, topk_select as tk
from tests.test_token_votes import make_case
for seed, hq, hk in ((0, 8, 2), (1, 8, 2), (2, 6, 2), (3, 2, 2)):    # groups of 4, 3 and 1
    for vote in ("group", "layer"):
        q, k, pos, limit = make_case(seed, hq=hq, hk=hk, n=150)
        ref = tv.token_votes_ref(q, k, pos, limit, vote, -1.0)
        got = tv.token_votes(q, k, pos, limit, vote, -1.0)
        assert torch.equal(got == -1.0, ref == -1.0), (seed, vote)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
        skip = torch.tensor([False, True, False])
        got = tv.token_votes(q, k, pos, limit, vote, float("-inf"), skip)
        torch.testing.assert_close(got[~skip], tv.token_votes_ref(q, k, pos, limit, vote, float("-inf"))[~skip],
                                   atol=1e-6, rtol=1e-5)
# top-k: the skip flag, and the blocked form of long rows (blocks of 64 here); both searches of the
# one-program kernel (TUNING['impl'])
for impl in ("int32", "packed64"):
    tk.TUNING["impl"] = impl
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 2, 300, generator=g)
    s[0, 0, 5:40] = 0.5                                   # ties across a block boundary
    s[1, 1, ::3] = float("-inf")
    s[2, 0] = float("-inf")                               # nothing selectable
    s[2, 1, 7] = float("nan")
    skip = torch.tensor([False, True, False])
    for k in (1, 5, 12):
        ref = tk.topk_select_ref(s[..., :60], k, torch.int64)
        assert torch.equal(tk.topk_select(s[..., :60], k, torch.int64, skip)[~skip], ref[~skip]), k
    tk.MAX_N = 64
    for k in (1, 5, 12, 20):   # 20: 5 blocks x 20 = 100 candidates, more than MAX_N: a second level (2 x 20)
        ref = tk.topk_select_ref(s, k, torch.int64)
        assert torch.equal(tk.topk_select_blocked(s, k, torch.int64, torch.zeros(3, dtype=torch.bool)), ref), k
        assert torch.equal(tk.topk_select_blocked(s, k, torch.int64, skip)[~skip], ref[~skip]), k
        assert torch.equal(tk.topk_select_blocked(s[..., :250], k, torch.int32, skip)[~skip],
                           tk.topk_select_ref(s[..., :250], k, torch.int32)[~skip]), k
        out = torch.full((3, 2, k), 9, dtype=torch.int64)    # in place: the skipped row keeps its old selection
        assert tk.topk_select_blocked(s, k, torch.int64, skip, out) is out
        assert torch.equal(out[~skip], ref[~skip]) and bool((out[1] == 9).all()), k
        out = torch.full((3, 2, k), 9, dtype=torch.int64)
        assert torch.equal(tk.topk_select(s[..., :60], k, torch.int64, skip, out=out)[~skip],
                           tk.topk_select_ref(s[..., :60], k, torch.int64)[~skip]) and bool((out[1] == 9).all()), k
        # smaller blocks over a row that fits one program (more programs per row), a tail column
        tail = torch.tensor([3, -1, 41])
        for blk in (b_ for b_ in (16, 32) if b_ >= k):
            want = tk.topk_select_ref(s[..., :60], k, torch.int32, tail=tail)
            assert torch.equal(tk.topk_select_blocked(s[..., :60], k, torch.int32, block=blk, tail=tail), want), (k, blk)
            out = torch.full((3, 2, k + 1), 9, dtype=torch.int32)
            tk.topk_select_blocked(s[..., :60], k, torch.int32, skip, out, blk, tail)
            assert torch.equal(out[~skip], want[~skip]) and bool((out[1] == 9).all()), (k, blk)
    tk.MAX_N = 16384
tk.TUNING["impl"] = "hist"    # removed (timed on the H200, it lost): every Triton path refuses it
for call in (lambda: tk.topk_select(s[..., :60], 5), lambda: tk.topk_select_blocked(s[..., :60], 5, block=16)):
    try:
        call()
        raise AssertionError("an unknown impl ran")
    except ValueError as e:
        assert "must be one of" in str(e), e
tk.TUNING["impl"] = "int32"
# the selection cache's decision: well away from the threshold the kernel decides as the reference
g = torch.Generator().manual_seed(4)
last = torch.randn(4, 6, 20, generator=g)
q = last + 0.05 * torch.randn(4, 6, 20, generator=g)
q[1] = torch.randn(6, 20, generator=g)
q[3] = -last[3]
for dt in (torch.float32, torch.bfloat16):
    qq, l1 = q.to(dt), last.clone().to(dt)    # (the reference overwrites its last_q)
    l2, c1, c2 = l1.clone(), torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    want = tv.query_reuse_ref(qq, l1, 0.8, c1)
    got = tv.query_reuse(qq[:, :, :], l2, 0.8, c2)
    assert torch.equal(got, want) and want.tolist() == [True, False, True, False], (dt, want)
    assert torch.equal(l2, qq) and torch.equal(c2, c1) and c1.tolist() == [4, 2]
    strided = torch.randn(4, 6, 2, 20).to(dt)[:, :, 1]    # a query that is a slice (the engine's q[:, :, -1])
    l3 = strided.clone()
    assert bool(tv.query_reuse(strided, l3, 0.99, c2).all()) and c2.tolist() == [8, 6]
print("INTERP_OK")
"""


def test_kernels_match_reference_in_interpreter():
    run_in_triton_interpreter(_INTERP)


# ---- CUDA ------------------------------------------------------------------------------------------

cuda = needs_cuda_triton()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_reference(dtype, monkeypatch):
    def no_fallback(*a, **kw):   # every shape below has a Triton path: torch.topk must not run
        raise AssertionError("dispatch fell back to topk_select_long")

    monkeypatch.setattr(tk, "topk_select_long", no_fallback)
    q, k, pos, limit = (t.cuda() for t in make_case(5, b=4, hq=32, hk=8, n=5000, d=128, dtype=dtype))
    skip = torch.tensor([False, True, False, False], device="cuda")
    for vote in ("group", "layer"):
        ref = tv.token_votes_ref(q.float(), k.float(), pos, limit, vote, -1.0)
        got = dispatch.token_votes(q, k, pos, limit, vote, -1.0, skip)
        m = ~skip
        assert torch.equal(got[m] == -1.0, ref[m] == -1.0)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[m], ref[m], atol=tol * ref[m].abs().max().item(), rtol=tol)
    votes = torch.randn(4, 8, 40000, device="cuda")
    votes[0, 0, 100:300] = 1.0
    ref = tk.topk_select_ref(votes, 2048, torch.int64)
    got = dispatch.topk_select(votes, 2048, torch.int64, skip)     # the blocked form: it can skip
    assert torch.equal(got[~skip], ref[~skip])
    assert torch.equal(dispatch.topk_select(votes, 2048, torch.int64), ref)   # and without a skip flag
    out = torch.full((4, 8, 2048), 5, dtype=torch.int64, device="cuda")
    assert dispatch.topk_select(votes, 2048, torch.int64, skip, out=out) is out   # in place, skipped row kept
    assert torch.equal(out[~skip], ref[~skip]) and bool((out[1] == 5).all())
    # a static buffer a little past 128k: nine blocks' candidates, a second level of blocks
    long = torch.randn(2, 8, 131072 + 64, device="cuda")
    long[1, 2, 5000:40000] = 3.0                                    # ties across blocks and levels
    long[0, :, -64:] = float("-inf")
    assert tk.block_levels(long.shape[-1], 2048) == [tk.MAX_N, tk.MAX_N]
    want = tk.topk_select_ref(long, 2048, torch.int64)
    assert torch.equal(dispatch.topk_select(long, 2048, torch.int64), want)
    out = torch.full((2, 8, 2048), 5, dtype=torch.int64, device="cuda")
    dispatch.topk_select(long, 2048, torch.int64, skip[:2], out=out)
    assert torch.equal(out[0], want[0]) and bool((out[1] == 5).all())
    # Quest's page rows in blocks (dispatch's block_from), with the tail column
    pages = torch.randn(4, 8, 8192, device="cuda")
    pages[2, 3, 1000:1400] = 2.0                                   # ties across blocks
    tail = torch.tensor([8191, 5, 0, 77], device="cuda")
    want = tk.topk_select_ref(pages, 128, torch.int32, tail=tail)
    saved = dict(tk.TUNING)
    try:
        for blk in (512, 1024, 2048, None):
            tk.TUNING["block_from"] = blk
            assert torch.equal(dispatch.topk_select(pages, 128, torch.int32, tail=tail), want), blk
        tk.TUNING.update(block_from=1024, block_min_n=16384)   # 8,192 scores: one program per row again
        assert torch.equal(dispatch.topk_select(pages, 128, torch.int32, tail=tail), want)
    finally:
        tk.TUNING.update(saved)
    # the selection cache's decision, one launch, as the reference
    last = torch.randn(4, 32, 128, device="cuda", dtype=dtype)
    qn = last.clone()
    qn[1] = torch.randn(32, 128, device="cuda", dtype=dtype)
    c1, c2 = (torch.zeros(2, dtype=torch.int64, device="cuda") for _ in range(2))
    l1, l2 = last.clone(), last.clone()
    want = tv.query_reuse_ref(qn, l1, 0.9, c1)
    assert torch.equal(dispatch.query_reuse(qn, l2, 0.9, c2), want) and want.tolist() == [True, False, True, True]
    assert torch.equal(l2, qn) and torch.equal(c2, c1)
