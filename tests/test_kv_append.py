"""A static decode step's KV write (``kvsift/kernels/kv_append.py``): the reference against plain
indexing on the CPU, the one-launch Triton kernel against the reference in Triton's interpreter and
on CUDA (under a CUDA graph, whose replays write at the slot the device holds)."""

import pytest
import torch

from kvsift.kernels import dispatch
from kvsift.kernels import kv_append as kva
from tests.conftest import needs_cuda_triton, run_in_triton_interpreter


def make_case(b=3, h=2, cap=20, d=8, slot=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_buf = torch.randn(b, h, cap, d, generator=g).to(dtype)
    v_buf = torch.randn(b, h, cap, d, generator=g).to(dtype)
    pos_buf = torch.randint(-1, 100, (b, h, cap), generator=g, dtype=torch.int32)
    # the new states as a projection gives them: (b, 1, h, d) transposed, not contiguous
    key = torch.randn(b, 1, h, d, generator=g).to(dtype).transpose(1, 2)
    value = torch.randn(b, 1, h, d, generator=g).to(dtype).transpose(1, 2)
    positions = torch.randint(0, 1000, (b, 1), generator=g, dtype=torch.int32)
    return k_buf, v_buf, pos_buf, torch.tensor([slot]), key, value, positions


def test_reference_writes_the_slot_and_advances_it():
    k_buf, v_buf, pos_buf, slot, key, value, positions = make_case()
    want_k, want_v, want_p = k_buf.clone(), v_buf.clone(), pos_buf.clone()
    want_k[:, :, 5], want_v[:, :, 5] = key[:, :, 0], value[:, :, 0]
    want_p[:, :, 5] = positions
    kva.kv_append_ref(k_buf, v_buf, pos_buf, slot, key, value, positions)
    assert torch.equal(k_buf, want_k) and torch.equal(v_buf, want_v) and torch.equal(pos_buf, want_p)
    assert slot.tolist() == [6]
    dispatch.kv_append(k_buf, v_buf, pos_buf, slot, key, value, positions)   # the CPU: the reference
    assert torch.equal(k_buf[:, :, 6], key[:, :, 0]) and slot.tolist() == [7]


def test_bad_arguments():
    k_buf, v_buf, pos_buf, slot, key, value, positions = make_case()
    with pytest.raises(ValueError, match="slot"):
        kva.kv_append_ref(k_buf, v_buf, pos_buf, slot.int(), key, value, positions)
    with pytest.raises(ValueError, match="key / value"):
        kva.kv_append_ref(k_buf, v_buf, pos_buf, slot, key[:, :1], value, positions)
    with pytest.raises(ValueError, match="positions"):
        kva.kv_append_ref(k_buf, v_buf, pos_buf, slot, key, value, positions[:, 0])
    with pytest.raises(ValueError, match="pos_buf"):
        kva.kv_append_ref(k_buf, v_buf, pos_buf[:, :, :3], slot, key, value, positions)


_INTERP = r"""
import torch
from kvsift.kernels import kv_append as kva
from tests.test_kv_append import make_case
# rows of several loop iterations (b * h = 24 rows > 8192 // 512), a slot at the buffer's end, bf16
for b, h, cap, d, slot, dt in ((3, 2, 20, 8, 5, torch.float32), (4, 6, 9, 512, 8, torch.float32),
                               (1, 8, 33, 64, 0, torch.bfloat16), (2, 3, 7, 24, 6, torch.float16)):
    a = make_case(b, h, cap, d, slot, dt, seed=slot)
    r = [t.clone() for t in a]
    kva.kv_append(*a)
    kva.kv_append_ref(*r)
    for x, y in zip(a, r):
        assert torch.equal(x, y), (b, h, cap, d, slot, dt)
    kva.kv_append(*a)                      # the slot it advanced: the next write goes after it
    assert a[3].item() == slot + 2
a = make_case(2, 2, 6, 8, 6)               # past the buffer: nothing written, the slot still advances
before = [t.clone() for t in a[:3]]
kva.kv_append(*a)
assert all(torch.equal(x, y) for x, y in zip(a[:3], before)) and a[3].item() == 7
print("INTERP_OK")
"""


def test_kernel_matches_reference_in_the_interpreter():
    run_in_triton_interpreter(_INTERP)


@needs_cuda_triton()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_matches_reference_and_replays_in_a_graph(dtype):
    a = [t.cuda() for t in make_case(8, 8, 64, 128, 3, dtype)]
    r = [t.clone() for t in a]
    dispatch.kv_append(*a)
    kva.kv_append_ref(*r)
    assert all(torch.equal(x, y) for x, y in zip(a, r))
    # under a CUDA graph: each replay writes the (new) states at the slot the device holds now
    k_buf, v_buf, pos_buf, slot, key, value, positions = a
    key, value, positions = key.clone(), value.clone(), positions.clone()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        dispatch.kv_append(k_buf, v_buf, pos_buf, slot, key, value, positions)   # warm-up (compile)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dispatch.kv_append(k_buf, v_buf, pos_buf, slot, key, value, positions)
    start = slot.item()
    for i in range(3):
        key.normal_()
        positions.fill_(500 + i)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_buf[:, :, start + i], key[:, :, 0]), i
        assert bool((pos_buf[:, :, start + i] == 500 + i).all()), i
    assert slot.item() == start + 3
