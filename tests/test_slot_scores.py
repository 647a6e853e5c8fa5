"""slot_scores (kvsift/kernels/slot_scores.py), the exact ``q . k`` at given slots reduced over a
GQA group (Quest's ``refine`` stage): the reference against a naive float64 loop (groups of 4, 3
and 1, ``max``, ``mean`` and per-head softmax ``votes``, slots that are negative, past the buffer
or at padding), bad arguments, the dispatcher on the CPU, and the Triton kernels against the
reference through the CPU interpreter and on CUDA (bf16 keys, strided buffers, votes merged over
several programs per row). Candidates given as page indices (``page > 1``) score exactly as their
expanded slots, and ``pick_slots`` maps a top-k over the candidates back to slots (with the page
being filled appended) as the gather, mask and concatenation it replaces."""

from __future__ import annotations

import pytest
import torch

from kvsift.kernels import dispatch
from kvsift.kernels import slot_scores as ss
from tests.conftest import needs_cuda_triton, run_in_triton_interpreter


def naive(q, k, pos, slots, reduce):
    b, hq, d = q.shape
    hk, cap = k.shape[1], k.shape[2]
    g = hq // hk
    out = torch.full(slots.shape, float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for h in range(hk):
            valid = [(j, s) for j, s in enumerate(slots[bi, h].tolist()) if 0 <= s < cap and int(pos[bi, h, s]) >= 0]
            dots = torch.tensor([[float(q[bi, h * g + i].double() @ k[bi, h, s].double()) for i in range(g)]
                                 for _, s in valid], dtype=torch.float64).reshape(len(valid), g)
            if reduce == "votes":   # each head's softmax over the row's valid slots, summed over the group
                red = torch.softmax(dots * d ** -0.5, dim=0).sum(1) if valid else dots.sum(1)
            else:
                red = dots.amax(1) if reduce == "max" else dots.mean(1)
            for (j, _), v in zip(valid, red.tolist()):
                out[bi, h, j] = v
    return out


def make_case(seed, b=3, hq=8, hk=2, cap=40, n=23, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, cap, d, generator=g).to(dtype)
    pos = torch.arange(cap).expand(b, hk, cap).clone()
    pos[torch.rand(b, hk, cap, generator=g) < 0.2] = -1       # holes and padding
    slots = torch.randint(-3, cap + 4, (b, hk, n), generator=g)  # negative and past the buffer too
    slots[0, 0, :4] = torch.tensor([-1, cap, cap + 7, 0])
    return q, k, pos, slots


@pytest.mark.parametrize("reduce", ["max", "mean", "votes"])
@pytest.mark.parametrize("hq,hk", [(8, 2), (6, 2), (2, 2)])
def test_reference_matches_a_naive_loop(reduce, hq, hk):
    q, k, pos, slots = make_case(hq, hq=hq, hk=hk)
    got = ss.slot_scores_ref(q, k, pos, slots, reduce)
    want = naive(q, k, pos, slots, reduce)
    assert got.dtype == torch.float32 and got.shape == slots.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    assert fin.sum() > slots.numel() // 2                      # most slots are scored
    torch.testing.assert_close(got[fin].double(), want[fin], atol=1e-5, rtol=1e-5)
    assert bool(torch.isinf(got[0, 0, :3]).all()) and torch.isfinite(got[0, 0, 3]) == (int(pos[0, 0, 0]) >= 0)


def test_bf16_keys_are_scored_in_float32():
    q, k, pos, slots = make_case(7, dtype=torch.bfloat16)
    got = ss.slot_scores_ref(q, k, pos, slots, "mean")
    want = naive(q.float(), k.float(), pos, slots, "mean")
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin].double(), want[fin], atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_rejected():
    q, k, pos, slots = make_case(0)
    with pytest.raises(ValueError, match="reduce"):
        ss.slot_scores_ref(q, k, pos, slots, "sum")
    with pytest.raises(ValueError, match="multiple"):
        ss.slot_scores_ref(q[:, :3], k, pos, slots)
    with pytest.raises(ValueError, match="key_pos"):
        ss.slot_scores_ref(q, k, pos.float(), slots)
    with pytest.raises(ValueError, match="slots"):
        ss.slot_scores_ref(q, k, pos, slots[:, :1])
    with pytest.raises(ValueError, match="slots"):
        ss.slot_scores_ref(q, k, pos, slots.float())
    with pytest.raises(ValueError, match="disagree"):
        ss.slot_scores_ref(q[:2], k, pos, slots)


def make_pages(seed, b=3, hk=2, cap=40, m=5, page=4):
    """Page indices of a ``cap``-slot buffer: some negative (none), one past the buffer, one whose
    last slots lie past it (``cap`` not a multiple of ``page`` there)."""
    g = torch.Generator().manual_seed(seed + 100)
    pages = torch.randint(-1, cap // page + 2, (b, hk, m), generator=g)
    pages[0, 0, :3] = torch.tensor([-1, cap // page + 1, (cap - 1) // page])
    return pages


@pytest.mark.parametrize("reduce", ["max", "mean", "votes"])
@pytest.mark.parametrize("page", [2, 4, 16])
def test_page_candidates_score_as_their_slots(reduce, page):
    cap = 37 if page < 16 else 70                               # a last page cut by the buffer's end
    q, k, pos, _ = make_case(page, cap=cap)
    pages = make_pages(page, cap=cap, page=page)
    slots = ss.page_slots(pages, page)
    assert slots.shape == (*pages.shape[:2], pages.shape[2] * page) and slots.dtype == torch.int64
    assert slots[0, 0, :page].tolist() == [-1] * page         # a negative page: none of its slots
    assert slots[0, 0, page:2 * page].min() >= cap            # past the buffer: invalid there
    got = ss.slot_scores_ref(q, k, pos, pages, reduce, page)
    want = ss.slot_scores_ref(q, k, pos, slots, reduce)
    assert torch.equal(got, want)
    torch.testing.assert_close(got.double(), naive(q, k, pos, slots, reduce), atol=1e-5, rtol=1e-5)
    assert torch.equal(dispatch.slot_scores(q, k, pos, pages, reduce, page), got)


def test_pick_slots_reference():
    """The top-k's picks through the candidates (slots or pages), ``-1`` where none; the tail page's
    slots after them, ``-1`` from the buffer's end and for a negative tail."""
    cand = torch.tensor([[[7, 3, -1, 12]]])
    at = torch.tensor([[[0, 3, -1]]])
    assert ss.pick_slots_ref(at, cand).tolist() == [[[7, 12, -1]]]
    pages = torch.tensor([[[5, -1, 2]], [[0, 1, 9]]])           # (2, 1, 3): pages of 4 slots
    at = torch.tensor([[[1, 9, 10, -1]], [[11, 0, -1, -1]]])
    tail = torch.tensor([[[6]], [[-1]]])
    got = ss.pick_slots_ref(at, pages, 4, tail, cap=26)
    assert got.dtype == torch.int64
    assert got.tolist() == [[[21, 9, 10, -1, 24, 25, -1, -1]], [[39, 0, -1, -1, -1, -1, -1, -1]]]
    assert torch.equal(dispatch.pick_slots(at, pages, 4, tail, 26), got)
    with pytest.raises(ValueError, match="cap"):
        ss.pick_slots_ref(at, pages, 4, tail)
    with pytest.raises(ValueError, match="tail"):
        ss.pick_slots_ref(at, pages, 4, tail[..., 0], 26)
    with pytest.raises(ValueError, match="page"):
        ss.pick_slots_ref(at, pages, 0)
    with pytest.raises(ValueError, match="cand"):
        ss.pick_slots_ref(at, pages[:1])
    with pytest.raises(ValueError, match="page"):
        ss.slot_scores_ref(*make_case(0), page=0)


def test_dispatch_on_the_cpu_is_the_reference():
    q, k, pos, slots = make_case(3)
    for reduce in ss.REDUCES:
        assert torch.equal(dispatch.slot_scores(q, k, pos, slots, reduce), ss.slot_scores_ref(q, k, pos, slots, reduce))


# ---- Triton through the CPU interpreter -----------------------------------------------------------

_INTERP = r"""
import torch
from kvsift.kernels import slot_scores as ss
from tests.test_slot_scores import make_case
for seed, hq, hk in ((0, 8, 2), (1, 6, 2), (2, 2, 2)):
    for reduce in ("max", "mean", "votes"):
        q, k, pos, slots = make_case(seed, hq=hq, hk=hk, n=150)      # three blocks of 64, the last partial
        ref = ss.slot_scores_ref(q, k, pos, slots, reduce)
        got = ss.slot_scores(q, k, pos, slots, reduce)
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), (seed, reduce)
        fin = torch.isfinite(ref)
        torch.testing.assert_close(got[fin], ref[fin], atol=1e-5, rtol=1e-5)
# a strided key buffer (a view of a larger one) and int32 slots
q, k, pos, slots = make_case(4, cap=80)
kv = k[:, :, ::2]
for reduce in ("max", "votes"):
    got = ss.slot_scores(q, kv, pos[:, :, ::2], slots.to(torch.int32), reduce)
    ref = ss.slot_scores_ref(q, kv, pos[:, :, ::2], slots, reduce)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], atol=1e-5, rtol=1e-5)
# votes over more slots than one program takes (several programs per row merge their statistics),
# and a row with no valid slot (all -inf, as the reference)
q, k, pos, slots = make_case(6, b=2, cap=300, n=5000)
slots[1, 0] = -1
ref = ss.slot_scores_ref(q, k, pos, slots, "votes")
got = ss.slot_scores(q, k, pos, slots, "votes")
assert torch.equal(torch.isinf(got), torch.isinf(ref)) and bool(torch.isinf(got[1, 0]).all())
torch.testing.assert_close(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], atol=1e-5, rtol=1e-5)
# candidates as page indices (int32 and a strided view too), every reduce; then pick_slots
from tests.test_slot_scores import make_pages
for page, cap in ((4, 37), (16, 70)):
    q, k, pos, _ = make_case(page, cap=cap)
    pages = make_pages(page, cap=cap, page=page, m=9)
    for reduce in ("max", "mean", "votes"):
        for p in (pages, pages.to(torch.int32), torch.cat([pages, pages], -1)[..., ::2]):
            ref = ss.slot_scores_ref(q, k, pos, p, reduce, page)
            got = ss.slot_scores(q, k, pos, p, reduce, page)
            assert got.shape == ref.shape and torch.equal(torch.isinf(got), torch.isinf(ref)), (page, reduce)
            torch.testing.assert_close(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(page)
    n = pages.shape[-1] * page
    at = torch.sort(torch.randint(-1, n, (3, 2, 11), generator=g), dim=-1).values
    tail = torch.randint(-1, cap // page + 1, (3, 2, 1), generator=g)
    for a, t in ((at, tail), (at.to(torch.int32), tail.to(torch.int32)), (at, None)):
        assert torch.equal(ss.pick_slots(a, pages, page, t, cap), ss.pick_slots_ref(a, pages, page, t, cap))
    a5 = torch.where(at < 5, at, -1)                              # slots as candidates (page 1), strided
    assert torch.equal(ss.pick_slots(a5, pages[..., ::2], 1), ss.pick_slots_ref(a5, pages[..., ::2], 1))
# a wide pick (several programs per row)
cand = torch.arange(-5, 3000).expand(2, 2, -1).contiguous()
at = torch.arange(0, 3005, 2).expand(2, 2, -1).contiguous()
assert torch.equal(ss.pick_slots(at, cand, 1, torch.full((2, 2, 1), 3), 3000),
                   ss.pick_slots_ref(at, cand, 1, torch.full((2, 2, 1), 3), 3000))
print("INTERP_OK")
"""


def test_kernel_matches_reference_in_interpreter():
    run_in_triton_interpreter(_INTERP)


# ---- CUDA ------------------------------------------------------------------------------------------

cuda = needs_cuda_triton()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference(dtype):
    q, k, pos, slots = (t.cuda() for t in make_case(5, b=4, hq=32, hk=8, cap=9000, n=8208, d=128, dtype=dtype))
    for reduce in ("max", "mean", "votes"):
        ref = ss.slot_scores_ref(q, k, pos, slots, reduce)
        got = dispatch.slot_scores(q, k, pos, slots, reduce)
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        fin = torch.isfinite(ref)
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        torch.testing.assert_close(got[fin], ref[fin], atol=tol * ref[fin].abs().max().item(), rtol=tol)
    # Quest's refine at 128k: 512 candidate pages of 16 per row, then the picks and the tail page
    pages = torch.sort(torch.randperm(562, device="cuda")[:512]).values.expand(4, 8, -1).contiguous()
    for reduce in ("max", "votes"):
        ref = ss.slot_scores_ref(q, k, pos, pages, reduce, 16)
        got = dispatch.slot_scores(q, k, pos, pages, reduce, 16)
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        fin = torch.isfinite(ref)
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        torch.testing.assert_close(got[fin], ref[fin], atol=tol * ref[fin].abs().max().item(), rtol=tol)
    at = dispatch.topk_select(ref, 2048, torch.int64)
    tail = torch.full((4, 8, 1), 562, device="cuda")
    assert torch.equal(dispatch.pick_slots(at, pages, 16, tail, 9000), ss.pick_slots_ref(at, pages, 16, tail, 9000))
