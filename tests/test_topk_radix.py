"""topk_radix (kvsift/kernels/topk_radix.py): the radix select over many programs per row gives
``topk_select_ref``'s result exactly (ties at the threshold to the lowest indices, ``-inf`` and NaN
never picked, ``k`` past the selectable entries ``-1``-padded, ``skip`` rows of ``out`` left as they
were, ``tail`` as column ``k``), in Triton's CPU interpreter and on CUDA (TokenSelect's shape, and
under a CUDA graph: its histograms are zeroed at each replay); bad arguments; the dispatcher sends
long rows to it only when ``TUNING["radix_min_n"]`` says so."""

from __future__ import annotations

import pytest
import torch

from kvsift.kernels import dispatch
from kvsift.kernels import topk_radix as tr
from kvsift.kernels import topk_select as tk
from tests.conftest import needs_cuda_triton, run_in_triton_interpreter


def test_bad_arguments_are_rejected_before_any_kernel():
    s = torch.randn(2, 3, 100)
    with pytest.raises(ValueError, match="block"):
        tr.topk_select_radix(s, 5, block=100)
    with pytest.raises(ValueError, match="k must"):
        tr.topk_select_radix(s, -1)
    with pytest.raises(ValueError, match="skip"):
        tr.topk_select_radix(s, 5, skip=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="out"):
        tr.topk_select_radix(s, 5, out=torch.empty(2, 3, 4, dtype=torch.int32))


def test_dispatcher_keeps_the_reference_on_the_cpu_whatever_the_tuning(monkeypatch):
    s = torch.randn(1, 2, 300)
    monkeypatch.setitem(tk.TUNING, "radix_min_n", 16)
    assert torch.equal(dispatch.topk_select(s, 20, torch.int64), tk.topk_select_ref(s, 20, torch.int64))


_INTERP = r"""
import torch
from kvsift.kernels import topk_radix as tr, topk_select as tk
g = torch.Generator().manual_seed(0)
def check(s, k, dtype=torch.int64, skip=None, tail=None, out=None, block=64):
    ref = tk.topk_select_ref(s, k, dtype, skip, tail, None if out is None else out.clone())
    got = tr.topk_select_radix(s, k, dtype, skip, tail, None if out is None else out.clone(), block=block)
    assert torch.equal(got, ref), (k, dtype, block)
s = torch.randn(2, 3, 1000, generator=g)
for k in (1, 7, 64, 300, 999, 1000, 1500):          # k past the row: -1 padding
    check(s, k)
check(s, 300, torch.int32, block=256)
# ties (few distinct values: the lowest indices at the threshold), -inf and NaN, a row of -inf only
t = torch.randint(0, 5, (2, 3, 700), generator=g).float()
t[0, 0, ::3] = float("-inf"); t[1, 2, 5::7] = float("nan"); t[1, 1] = float("-inf")
for k in (1, 10, 250, 600, 700):
    check(t, k)
# skip rows keep what out held, tail as the last column
check(s, 40, skip=torch.tensor([True, False]), tail=torch.tensor([5, 9]),
      out=torch.full((2, 3, 41), 7, dtype=torch.int64))
check(s, 40, tail=torch.tensor([5, 9]))
# strided scores; values that share their high digits; negatives; all equal
u = (1.0 + torch.rand(2, 2, 2000, generator=g) * 1e-3)[..., ::2]
check(u, 100); check(-u, 100); check(u * 0, 37)
# a row longer than one program's, in blocks of 1,024 (the last one partial), k as TokenSelect's
check(torch.rand(1, 2, 20000, generator=g), 2048, block=1024)
# nothing to select: k = 0 (the tail only), an empty row
check(s, 0, tail=torch.tensor([1, 2]))
check(torch.empty(2, 1, 0), 3, tail=torch.tensor([1, 2]))
print("INTERP_OK")
"""


def test_kernel_matches_reference_in_interpreter():
    run_in_triton_interpreter(_INTERP)


cuda = needs_cuda_triton()


@cuda
def test_cuda_radix_matches_reference_at_tokenselects_shape():
    g = torch.Generator(device="cuda").manual_seed(1)
    votes = torch.rand(2, 8, 131072, device="cuda", generator=g)
    votes[1, 3, :100000] = float("-inf")                           # a row of few candidates
    votes[0, 5] = votes[0, 5].round(decimals=2)                    # many ties
    for k in (2048, 40000):
        assert torch.equal(tr.topk_select_radix(votes, k, torch.int64), tk.topk_select_ref(votes, k, torch.int64))
    skip = torch.tensor([False, True], device="cuda")
    out = torch.full((2, 8, 2049), 3, dtype=torch.int32, device="cuda")
    tail = torch.tensor([11, 12], device="cuda")
    want = tk.topk_select_ref(votes, 2048, torch.int32, skip, tail, out.clone())
    assert torch.equal(tr.topk_select_radix(votes, 2048, torch.int32, skip, tail, out), want)


@cuda
def test_cuda_radix_under_a_graph_replays_exactly():
    g = torch.Generator(device="cuda").manual_seed(2)
    votes = torch.rand(1, 8, 131072, device="cuda", generator=g)
    out = torch.empty(1, 8, 2048, dtype=torch.int64, device="cuda")
    tr.topk_select_radix(votes, 2048, torch.int64, out=out)        # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tr.topk_select_radix(votes, 2048, torch.int64, out=out)
    for seed in (3, 4):
        votes.copy_(torch.rand(votes.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        assert torch.equal(out, tk.topk_select_ref(votes, 2048, torch.int64))
