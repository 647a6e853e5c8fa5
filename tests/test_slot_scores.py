"""slot_scores (kvsift/kernels/slot_scores.py), the exact ``q . k`` at given slots reduced over a
GQA group (Quest's ``refine`` stage): the reference against a naive float64 loop (groups of 4, 3
and 1, ``max``, ``mean`` and per-head softmax ``votes``, slots that are negative, past the buffer
or at padding), bad arguments, the dispatcher on the CPU, and the Triton kernels against the
reference through the CPU interpreter and on CUDA (bf16 keys, strided buffers, votes merged over
several programs per row)."""

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
