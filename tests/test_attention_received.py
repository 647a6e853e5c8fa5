"""attention_received (kvsift/kernels/attention_received.py): the PyTorch reference against a naive
float64 loop per (row, q head, query) (GQA, padding keys and queries, unsorted positions with holes,
a sliding window, queries that see nothing, every reduction, n_out), equal to H2O's and KVzip's
former scoring; the Triton kernels against the reference through the CPU interpreter and on CUDA."""

from __future__ import annotations

import pytest
import torch

from kvsift.kernels import attention_received as ar
from kvsift.kernels import dispatch
from kvsift.kernels._triton import HAS_TRITON
from tests.conftest import run_in_triton_interpreter


def naive(q, k, kpos, qpos, scale, window=None, reduce="sum", head_reduce="mean", n_out=None):
    """One softmax per (row, q head, query) over the keys it sees, in float64: ``(b, hk, n_out)``."""
    b, hq, L, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    g = hq // hk
    n_out = n if n_out is None else n_out
    per_head = torch.zeros(b, hq, n, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(L):
                qp = int(qpos[bi, i])
                if qp < 0:
                    continue
                kp = kpos[bi, h // g].long()
                vis = (kp >= 0) & (kp <= qp)
                if window:
                    vis &= kp > qp - window
                if not vis.any():
                    continue
                logits = (k[bi, h // g].double() @ q[bi, h, i].double()) * scale
                w = torch.zeros(n, dtype=torch.float64)
                w[vis] = torch.softmax(logits[vis], 0)
                if reduce == "sum":
                    per_head[bi, h] += w
                else:
                    per_head[bi, h] = torch.maximum(per_head[bi, h], w)
    per_head = per_head.view(b, hk, g, n)[..., :n_out]
    return per_head.mean(2) if head_reduce == "mean" else per_head.amax(2)


def make_case(seed, b=2, hq=8, hk=2, L=7, n=23, d=16, dtype=torch.float32):
    """Random queries and keys; key positions a shuffled sample with holes, padding slots, one head
    of one row all padding; padding queries and a query before every key."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, L, d, generator=g).to(dtype)
    k = torch.randn(b, hk, n, d, generator=g).to(dtype)
    kpos = torch.stack([torch.stack([torch.randperm(2 * n, generator=g)[:n] for _ in range(hk)]) for _ in range(b)])
    kpos[kpos % 5 == 0] = -1                                         # padding / empty slots
    if b > 1 and hk > 1:
        kpos[1, 1] = -1                                              # a head that holds nothing
    qpos = torch.randint(n // 2, 2 * n, (b, L), generator=g)
    if b * L > 1:
        qpos[0, 0] = -1                                              # a padding query
    if L > 2:
        qpos[-1, 1] = int(kpos[kpos >= 0].min()) - 1                 # a query before every key: sees none
    return q, k, kpos, qpos


MODES = [("sum", "mean"), ("sum", "max"), ("max", "mean"), ("max", "max")]


@pytest.mark.parametrize("reduce,head_reduce", MODES)
@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("n_out", [None, 15])
def test_reference_matches_naive_loop(reduce, head_reduce, window, n_out):
    q, k, kpos, qpos = make_case(1 + (window or 0) + (n_out or 0))
    scale = 0.3
    want = naive(q, k, kpos, qpos, scale, window, reduce, head_reduce, n_out)
    # blocks of 2 queries, and one block of all of them
    for mb in (2 * 2 * 8 * 23 * 4, None):
        got = ar.attention_received_ref(q, k, kpos, qpos, scale, window, reduce, head_reduce, n_out, max_bytes=mb)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert want.abs().max() > 0.05                                   # the case is not all zeros
    assert got[1, 1].abs().max() == 0                                # a head of padding receives nothing
    pad = kpos[..., : got.shape[-1]] < 0
    assert (got[pad] == 0).all()


def test_reference_gqa_groups_and_no_visible_key():
    q, k, kpos, qpos = make_case(5, b=1, hq=6, hk=3, L=4, n=11)
    qpos[:] = -1                                                     # nothing gives: zeros, no NaN
    got = ar.attention_received_ref(q, k, kpos, qpos, 0.5)
    assert torch.equal(got, torch.zeros(1, 3, 11))
    q, k, kpos, qpos = make_case(6, b=1, hq=6, hk=3, L=4, n=11)
    for reduce, head_reduce in MODES:
        got = ar.attention_received_ref(q, k, kpos, qpos, 0.5, None, reduce, head_reduce)
        torch.testing.assert_close(got.double(), naive(q, k, kpos, qpos, 0.5, None, reduce, head_reduce),
                                   rtol=1e-5, atol=1e-6)
    # every query sees every key once a query's softmax runs over them: sum/mean of a group adds to
    # (queries with a visible key) per row
    kpos = torch.arange(11).expand(1, 3, 11).clone()
    qpos = torch.tensor([[20, 21, -1, 30]])
    got = ar.attention_received_ref(q, k, kpos, qpos, 0.5)
    torch.testing.assert_close(got.sum(-1), torch.full((1, 3), 3.0))


def test_reference_equals_former_h2o_and_kvzip_scoring():
    from kvsift.methods.base import attention_blocks
    from kvsift.methods.h2o import attention_received
    from kvsift.methods.kvzip import reconstruction_scores

    q, k, kpos, qpos = make_case(7, L=9, n=30)
    for window in (None, 12):
        former = torch.zeros(2, 2, 30)
        for _, attn in attention_blocks(q, k, kpos, qpos, 0.25, window, 2 * 8 * 30 * 4 * 3):
            former += attn.sum(3).mean(2)
        assert torch.equal(attention_received(q, k, kpos, qpos, 0.25, window, max_bytes=2 * 8 * 30 * 4 * 3), former)
        assert torch.equal(dispatch.attention_received(q, k, kpos, qpos, 0.25, window, max_bytes=2 * 8 * 30 * 4 * 3),
                           former)
    # KVzip: the prompt's n_ctx slots, then the pass's own tokens (causal); the soft-capped path (a
    # cap so large that it changes nothing) is the former code, the uncapped one the new call
    g = torch.Generator().manual_seed(8)
    n_ctx, L, d = 40, 9, 16
    q = torch.randn(2, 8, L, d, generator=g)
    k = torch.randn(2, 2, n_ctx + L, d, generator=g)
    pos = torch.arange(n_ctx + L).expand(2, 2, -1).clone()
    pos[1, :, :4] = -1
    pos[0, 1, 7] = -1
    qpos = torch.arange(n_ctx, n_ctx + L).expand(2, L)
    for window in (None, 20):
        for local in (None, (4, 10, 25)):
            new = reconstruction_scores(q, k, pos, qpos, n_ctx, 0.25, window, None, local)
            old = reconstruction_scores(q, k, pos, qpos, n_ctx, 0.25, window, 1e30, local)
            assert new.shape == (2, 2, n_ctx)
            torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-7)
            assert new.abs().max() > 0.05


def test_dispatch_runs_the_reference_on_cpu_and_checks_arguments():
    q, k, kpos, qpos = make_case(9)
    for reduce, head_reduce in MODES:
        assert torch.equal(dispatch.attention_received(q, k, kpos, qpos, 0.3, 5, reduce, head_reduce, 10),
                           ar.attention_received_ref(q, k, kpos, qpos, 0.3, 5, reduce, head_reduce, 10))
    with pytest.raises(ValueError, match="reduce"):
        ar.attention_received_ref(q, k, kpos, qpos, 0.3, reduce="mean")
    with pytest.raises(ValueError, match="head_reduce"):
        ar.attention_received_ref(q, k, kpos, qpos, 0.3, head_reduce="sum")
    with pytest.raises(ValueError, match="n_out"):
        ar.attention_received_ref(q, k, kpos, qpos, 0.3, n_out=24)
    with pytest.raises(ValueError, match="query_pos"):
        ar.attention_received_ref(q, k, kpos, qpos[:, 1:], 0.3)
    with pytest.raises(TypeError, match="integer"):
        ar.attention_received_ref(q, k, kpos.float(), qpos, 0.3)
    empty = ar.attention_received_ref(q[:, :, :0], k, kpos, qpos[:, :0], 0.3)
    assert torch.equal(empty, torch.zeros(2, 2, 23))


def test_plan_splits_covers_the_keys():
    saved = dict(ar.TUNING)
    try:
        for forced, n, bn in ((None, 1000, 64), (3, 1000, 64), (7, 100, 64), (2, 1, 16), (None, 0, 64)):
            ar.TUNING["splits"] = forced
            s, per = ar.plan_splits(4, n, bn, torch.device("cpu"))
            assert per % bn == 0 and s >= 1 and (s - 1) * per < max(n, 1) <= s * per, (forced, n, s, per)
            if forced:
                assert s <= forced
    finally:
        ar.TUNING.update(saved)


# ---- Triton through the CPU interpreter -----------------------------------------------------------

_INTERP = """
import torch
from kvsift.kernels import attention_received as ar
from tests.test_attention_received import make_case
torch.manual_seed(0)

def rel(a, b):
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if b.norm() > 0 else a.norm().item()

MODES = [("sum", "mean"), ("sum", "max"), ("max", "mean"), ("max", "max")]
checked = 0
# small blocks (many row and key blocks on small shapes, splits forced) and the default blocks
for tuning in (dict(lse_block_m=16, lse_block_n=16, recv_block_m=16, recv_block_n=32, splits=3), {}):
    saved = dict(ar.TUNING)
    ar.TUNING.update(tuning)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-3)):
        # (b, hq, hk, L, n, d): GQA, shapes off the block sizes, a decode query, a prompt chunk
        for i, (b, hq, hk, L, n, d) in enumerate(((2, 8, 2, 13, 45, 16), (1, 4, 4, 1, 37, 32),
                                                  (2, 6, 2, 1, 70, 48), (1, 4, 2, 64, 200, 64))):
            q, k, kpos, qpos = make_case(i, b, hq, hk, L, n, d, dt)
            if L == 64:   # a prefill chunk: the prompt's slots in order, then the chunk's own keys
                kpos = torch.arange(n).expand(b, hk, n).clone()
                kpos[:, :, 3] = -1
                qpos = torch.arange(n - L, n).expand(b, L).clone()
            big = torch.randn(b, hk, n + 5, d + 8).to(dt)
            big[:, :, :n, :d] = k
            kv = big[:, :, :n, :d]                                   # a strided view of a larger buffer
            qt = q.transpose(1, 2).contiguous().transpose(1, 2)      # (b, L, hq, d) memory, as the model's
            for j, (red, hr) in enumerate(MODES):
                win = (None, 9, 30)[j % 3]
                n_out = None if j % 2 == 0 else n - min(L, n // 3)
                ref = ar.attention_received_ref(q, k, kpos, qpos, d ** -0.5, win, red, hr, n_out)
                got = ar.attention_received(qt, kv, kpos.to(torch.int32), qpos, d ** -0.5, win, red, hr, n_out)
                assert got.shape == ref.shape and got.dtype == torch.float32, (got.shape, ref.shape)
                e = rel(got, ref)
                assert e < tol, ("attention_received", tuning, dt, b, hq, hk, L, n, d, red, hr, win, n_out, e)
                assert ref.abs().max() > 0, ("empty case", b, hq, hk, L, n, d, red, hr, win, n_out)
                pad = kpos[..., : got.shape[-1]] < 0
                assert (got[pad] == 0).all()
                checked += 1
    # no query sees anything: zeros, no NaN
    q, k, kpos, qpos = make_case(3, 1, 4, 2, 5, 20, 16)
    qpos[:] = -1
    assert torch.equal(ar.attention_received(q, k, kpos, qpos, 0.25), torch.zeros(1, 2, 20))
    ar.TUNING.clear()
    ar.TUNING.update(saved)
assert checked == 64, checked
print("INTERP_OK")
"""


def test_kernel_matches_reference_in_interpreter():
    run_in_triton_interpreter(_INTERP)


# ---- Triton on CUDA -------------------------------------------------------------------------------

cuda_triton = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@cuda_triton
@pytest.mark.parametrize("reduce,head_reduce", [("sum", "mean"), ("max", "max"), ("sum", "max")])
def test_cuda_kernel_matches_reference_at_a_prefill_shape(reduce, head_reduce):
    b, hq, hk, d, L, n = 2, 12, 2, 128, 2048, 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, L, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, hk, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kpos = torch.arange(n, device="cuda").expand(b, hk, n).clone()
    kpos[1, :, :100] = -1                                            # a left-padded row
    qpos = torch.arange(n - L, n, device="cuda").expand(b, L).contiguous()
    ref = ar.attention_received_ref(q, k, kpos, qpos, d ** -0.5, None, reduce, head_reduce)
    got = dispatch.attention_received(q, k, kpos, qpos, d ** -0.5, None, reduce, head_reduce)
    assert not torch.isnan(got).any()
    assert _rel(got, ref) < 2e-3, (reduce, head_reduce, _rel(got, ref))
    assert got[1, :, :100].abs().max() == 0
    # a sliding window, unsorted positions with holes, n_out (KVzip's prompt slots)
    perm = torch.randperm(n, device="cuda")
    kp = kpos[:, :, perm].contiguous()
    kp[:, :, ::11] = -1
    ref = ar.attention_received_ref(q, k, kp, qpos, d ** -0.5, 1500, reduce, head_reduce, n - L)
    got = dispatch.attention_received(q, k, kp, qpos, d ** -0.5, 1500, reduce, head_reduce, n - L)
    assert got.shape == (b, hk, n - L) and _rel(got, ref) < 2e-3, (reduce, head_reduce, _rel(got, ref))


@cuda_triton
def test_cuda_kernel_matches_reference_for_decode_queries():
    b, hq, hk, d, n = 3, 12, 2, 128, 5000
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, hk, n, d, device="cuda", dtype=torch.bfloat16)
    kpos = torch.arange(n, device="cuda").expand(b, hk, n).clone()
    kpos[2, :, 4000:] = -1
    qpos = torch.full((b, 1), n, device="cuda")
    qpos[1] = -1
    for reduce, head_reduce in MODES:
        ref = ar.attention_received_ref(q, k, kpos, qpos, d ** -0.5, None, reduce, head_reduce)
        got = dispatch.attention_received(q, k, kpos, qpos, d ** -0.5, None, reduce, head_reduce)
        assert _rel(got, ref) < 2e-3 and got[1].abs().max() == 0, (reduce, head_reduce)


@pytest.mark.skipif(torch.cuda.is_available() and HAS_TRITON, reason="CUDA present: the bench times instead")
def test_bench_exits_2_without_cuda(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "attention_received.py"
    spec = importlib.util.spec_from_file_location("bench_attention_received", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--ns", "64", "--L", "16"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
