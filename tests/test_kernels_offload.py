"""Chunk copy from host memory into a device chunk cache (kvsift/kernels/chunk_fetch.py): the
reference against a per-token loop (CPU), the UVA Triton kernel against the reference and the
ChunkStore's device path against its host path (CUDA only)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from kvsift.kernels._triton import HAS_TRITON
from kvsift.kernels.chunk_fetch import copy_chunks, copy_chunks_ref
from kvsift.methods._offload import ChunkStore, FetchStats

CUDA = torch.cuda.is_available() and HAS_TRITON


def _case(device_cache: str, dtype=torch.float32, pin=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    R, d, C, L, M = 200, 8, 12, 5, 9
    hk = torch.randn(R, d, generator=g).to(dtype)
    hv = torch.randn(R, d, generator=g).to(dtype)
    hp = torch.arange(R, dtype=torch.int32)
    if pin:
        hk, hv, hp = hk.pin_memory(), hv.pin_memory(), hp.pin_memory()
    src = torch.randint(0, R - L, (M,), generator=g)
    ln = torch.randint(0, L + 1, (M,), generator=g)
    ln[2] = -1  # skipped
    ln[5] = 0   # written as padding only
    dst = torch.randperm(C, generator=g)[:M]
    ck = torch.full((C, L, d), 7.0, dtype=dtype, device=device_cache)
    cv = torch.full((C, L, d), 7.0, dtype=dtype, device=device_cache)
    cp = torch.full((C, L), 99, dtype=torch.int32, device=device_cache)
    return hk, hv, hp, src, ln, ck, cv, cp, dst


def test_copy_chunks_ref_matches_loop():
    hk, hv, hp, src, ln, ck, cv, cp, dst = _case("cpu")
    want_k, want_v, want_p = ck.clone(), cv.clone(), cp.clone()
    for m in range(src.numel()):
        n = int(ln[m])
        if n < 0:
            continue
        r = int(dst[m])
        want_k[r], want_v[r], want_p[r] = 0, 0, -1
        for j in range(n):
            want_k[r, j] = hk[int(src[m]) + j]
            want_v[r, j] = hv[int(src[m]) + j]
            want_p[r, j] = hp[int(src[m]) + j]
    copy_chunks_ref(hk, hv, hp, src, ln, ck, cv, cp, dst)
    assert torch.equal(ck, want_k) and torch.equal(cv, want_v) and torch.equal(cp, want_p)
    assert torch.equal(ck[int(dst[2])], torch.full_like(ck[0], 7.0))  # the skipped entry's row is untouched


def test_copy_chunks_bad_input():
    hk, hv, hp, src, ln, ck, cv, cp, dst = _case("cpu")
    with pytest.raises(ValueError, match="must be"):
        copy_chunks_ref(hk, hv, hp, src[:3], ln, ck, cv, cp, dst)
    with pytest.raises(TypeError, match="int32"):
        copy_chunks_ref(hk, hv, hp.long(), src, ln, ck, cv, cp, dst)
    with pytest.raises(ValueError, match="longer"):
        copy_chunks_ref(hk, hv, hp, src, torch.full_like(ln, 9), ck, cv, cp, dst)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_chunks_uva_matches_ref(dtype):
    a = _case("cuda", dtype, pin=True, seed=1)
    b = [t.clone() if t.is_cuda else t for t in a]
    for t in a[:3]:
        assert t.is_pinned()
    copy_chunks(*[t.cuda() if i >= 3 and not t.is_cuda else t for i, t in enumerate(a)])
    copy_chunks_ref(*b)
    for x, y in zip(a[5:8], b[5:8]):
        assert torch.equal(x, y)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("cache_chunks", [0, 3])
def test_chunk_store_uva_matches_host_path(cache_chunks, monkeypatch):
    g = torch.Generator().manual_seed(2)
    b, hk, L, d, n_chunks = 1, 2, 4, 8, 10
    lens = torch.randint(1, L + 1, (b, hk, n_chunks), generator=g)
    toks = [(bi * hk + h, c, r) for bi in range(b) for h in range(hk) for c in range(n_chunks)
            for r in range(int(lens[bi, h, c]))]
    bh, ch, rk = (torch.tensor(x, device="cuda") for x in zip(*toks))
    keys = torch.randn(len(toks), d, generator=g).cuda()
    stores = []
    for uva in (True, False):
        s = ChunkStore(b, hk, L, d, torch.float32, "cuda", cache_chunks=cache_chunks)
        s.append(keys, -keys, (ch * 10 + rk).int(), bh, ch, rk, n_chunks)
        s._uva = uva
        stores.append(s)
    for _ in range(5):
        idx = torch.stack([torch.randperm(n_chunks, generator=g)[:3] for _ in range(b * hk)]).view(b, hk, 3).cuda()
        idx[0, 1, 2] = -1
        sa, sb = FetchStats(), FetchStats()
        ra, rb = stores[0].fetch(idx, sa), stores[1].fetch(idx, sb)
        assert stores[0]._uva, "the UVA kernel was refused"
        for x, y in zip(ra, rb):
            assert torch.equal(x, y)
        assert sa.value("copied_chunks") == sb.value("copied_chunks")


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
def test_registered_host_store_rows_written_async_match_the_host_path():
    """A store large enough for registered (exact-size) page-locked memory, rows written one at a
    time with asynchronous device -> host copies: the UVA fetch equals the host path's."""
    from kvsift.methods._offload import pinned_empty

    t = pinned_empty((3, 1 << 18), torch.float32)                  # 3 MiB: registered, not rounded to 4
    assert t.is_pinned() and t.numel() == 3 << 18
    g = torch.Generator().manual_seed(3)
    b, hk, L, d, n_chunks = 3, 2, 8, 128, 100
    stores = []
    for uva in (True, False):
        s = ChunkStore(b, hk, L, d, torch.float32, "cuda", cache_chunks=8, capacity=n_chunks * L)
        s._uva = uva
        stores.append(s)
    for bi in (1, 0, 2):
        lens = torch.randint(1, L + 1, (hk, n_chunks - 10 * bi), generator=g)
        toks = [(h, c, r) for h in range(hk) for c in range(lens.shape[1]) for r in range(int(lens[h, c]))]
        h, ch, rk = (torch.tensor(x, device="cuda") for x in zip(*toks))
        keys = torch.randn(len(toks), d, generator=g).cuda()
        for s in stores:
            s.append(keys, -keys, (bi * 10000 + ch * 10 + rk).int(), bi * hk + h, ch, rk, lens.shape[1], row=bi)
    assert stores[0].k.is_pinned() and stores[0].k.shape[0] == b * hk * n_chunks * L + 1
    for _ in range(4):
        idx = torch.stack([torch.randperm(n_chunks - 20, generator=g)[:5] for _ in range(b * hk)]).view(b, hk, 5)
        ra, rb = stores[0].fetch(idx.cuda(), FetchStats()), stores[1].fetch(idx.cuda(), FetchStats())
        assert stores[0]._uva, "the UVA kernel was refused"
        for x, y in zip(ra, rb):
            assert torch.equal(x, y)
        assert int((ra[2] >= 0).sum()) > 0


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
def test_cuda_rows_prefill_gives_the_batch_tokens_under_graphs():
    from kvsift import LLM, SamplingParams
    from kvsift.models import tiny_model
    from tests.conftest import random_prompt

    m = tiny_model("llama", seed=1).to("cuda")
    ids = [random_prompt(300, seed=8), random_prompt(170, seed=9), random_prompt(240, seed=10)]
    p = SamplingParams(max_tokens=10, ignore_eos=True)
    outs = {}
    for mode in ("batch", "rows"):
        llm = LLM.from_model(m, None, chunk_size=64, decode_mode="graph", prefill_mode=mode)
        outs[mode] = llm.generate(ids, p, method="sentencekv", budget=96)
    assert outs["rows"][0].stats.decode_mode == "graph"
    assert [x.token_ids for x in outs["batch"]] == [y.token_ids for y in outs["rows"]]


# ---- sentencekv's reselect_every (kept selections skip scoring and fetching) -------------------

def test_reselect_every_exact_at_full_budget_and_fetches_less():
    from kvsift import SamplingParams
    from kvsift.methods.sentencekv import SentenceKV
    from tests.logit_recorder import prompt, recording_llm, run

    llm = recording_llm()
    ids = prompt(320, seed=8)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    ref, ref_logits = run(llm, ids, params=params)
    out, logits = run(llm, ids, "sentencekv", 1.0, params=params, max_chunk=16, reselect_every=3)
    assert out[0].token_ids == ref[0].token_ids
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    every, _ = run(llm, ids, "sentencekv", 100, params=params, max_chunk=16)
    kept, kept_logits = run(llm, ids, "sentencekv", 100, params=params, max_chunk=16, reselect_every=3)
    a, b = every[0].stats.method_stats, kept[0].stats.method_stats
    assert b["chunks_copied_per_step"] < a["chunks_copied_per_step"]
    assert torch.isfinite(kept_logits).all()
    with pytest.raises(ValueError, match="reselect_every"):
        SentenceKV(budget=8, reselect_every=0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
def test_uva_path_exact_on_cuda_with_context_reuse():
    """A tiny fp32 model on CUDA: sentencekv through the UVA copy at full budget == full, also when
    a reused context grows the host store (the host tensors are replaced while kernels may be queued)."""
    from kvsift import LLM, SamplingParams
    from kvsift.models.tiny import tiny_model
    from tests.logit_recorder import VOCAB, prompt

    llm = LLM.from_model(tiny_model("llama", seed=0, vocab_size=VOCAB).cuda(), None, "tiny", chunk_size=64)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    doc, question = prompt(300, seed=6), prompt(40, seed=7)
    ref = llm.generate(doc + question, params, method="full")[0].token_ids
    kw = {"max_chunk": 16, "cache_chunks": 4}
    out = llm.generate(doc + question, params, method="sentencekv", budget=1.0, method_kwargs=kw)[0]
    assert out.token_ids == ref
    ctx = llm.prefill_context(doc, method="sentencekv", budget=1.0, method_kwargs=kw)
    again = llm.generate(question, params, method="sentencekv", budget=1.0, method_kwargs=kw, context=ctx)[0]
    assert again.token_ids == ref


# ---- the device chunk cache's LRU bookkeeping (kvsift/kernels/chunk_cache.py) -------------------

def _lru_state(R, S, n, device="cpu"):
    return {"slot_of": torch.full((R, n + 1), -1, dtype=torch.int64, device=device),
            "owner": torch.full((R, S + 1), -1, dtype=torch.int64, device=device),
            "last": torch.full((R, S + 1), -1, dtype=torch.int64, device=device),
            "counts": torch.zeros(2, dtype=torch.int64, device=device)}


def test_lru_plan_ref_evicts_the_least_recently_used_chunk():
    from kvsift.kernels.chunk_cache import lru_plan_ref

    S, n, L, T = 3, 6, 4, 100
    st = _lru_state(1, S, n)
    starts = torch.arange(n).view(1, n) * L
    lens = torch.tensor([[4, 3, 4, 2, 4, 1]], dtype=torch.int32)

    def step(ids):
        tab = torch.empty(1, len(ids) * L, dtype=torch.int32)
        out = lru_plan_ref(torch.tensor([ids]), st["slot_of"], st["owner"], st["last"], starts, lens, T,
                           st["counts"], L, tab)
        return out, tab

    (src, ln, dst, final), tab = step([0, 1, 2])                      # three misses fill the empty slots
    assert final.tolist() == [[0, 1, 2]] and ln.tolist() == [4, 3, 4] and src.tolist() == [0, 4, 8]
    assert tab[0, 4:8].tolist() == [4, 5, 6, -1]                       # chunk 1 (3 tokens) in slot 1
    (src, ln, dst, final), tab = step([0, 3, -1])                     # 0 hits; 3 evicts the LRU slot 1
    assert final.tolist() == [[0, 1, 3]] and ln.tolist() == [-1, 2, -1] and dst.tolist() == [0, 1, 3]
    assert st["slot_of"][0, :n].tolist() == [0, -1, 2, 1, -1, -1] and st["owner"][0, :S].tolist() == [0, 3, 2]
    assert tab[0, 8:].tolist() == [-1] * 4
    (src, ln, dst, final), _ = step([4, 5, 0])                         # 4 -> slot 2 (oldest), 5 -> slot 1
    assert final.tolist() == [[2, 1, 0]] and st["owner"][0, :S].tolist() == [0, 5, 4]
    assert st["counts"].tolist() == [8, 6]                             # lookups, misses


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("R,n,k,L,T,sizes,pool,steps", [
    (16, 300, 40, 32, 10000, (40, 80, 100), 60, 12),
    # the suite cell whose (chunks x slots) tile passed Triton's largest block: 30k tokens kept at
    # 25%, about 1,000 chunks selected per row over 2,048 cache slots
    (4, 3000, 1000, 16, 50000, (2048,), 1500, 4)])
def test_lru_plan_kernel_matches_reference_over_steps(R, n, k, L, T, sizes, pool, steps):
    from kvsift.kernels.chunk_cache import lru_plan, lru_plan_ref

    g = torch.Generator().manual_seed(5)
    for S in sizes:
        states = [_lru_state(R, S, n, "cuda") for _ in range(2)]
        starts = torch.randint(0, T - L, (R, n), generator=g).cuda()
        lens = torch.randint(0, L + 1, (R, n), generator=g, dtype=torch.int32).cuda()
        for _ in range(steps):
            idx = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(R)]).cuda()  # overlapping steps
            idx[0, -5:] = -1
            tabs = [torch.empty(R, k * L, dtype=torch.int32, device="cuda") for _ in range(2)]
            outs = [fn(idx, s["slot_of"], s["owner"], s["last"], starts, lens, T, s["counts"], L, tab)
                    for fn, s, tab in ((lru_plan, states[0], tabs[0]), (lru_plan_ref, states[1], tabs[1]))]
            for a, b in zip(*outs):
                assert torch.equal(a, b)
            assert torch.equal(tabs[0], tabs[1])
            a, b = states
            assert torch.equal(a["slot_of"][:, :n], b["slot_of"][:, :n]) and torch.equal(a["counts"], b["counts"])
            assert torch.equal(a["owner"][:, :S], b["owner"][:, :S]) and torch.equal(a["last"][:, :S], b["last"][:, :S])


# ---- quantized chunks: copied and dequantized in one kernel -------------------------------------------
def _quant_case(device_cache: str = "cpu", bits: int = 4, dtype=torch.float32, vg: int = 4, pin: bool = False,
                seed: int = 0):
    """Host codes, value scales and positions of ``R`` token rows, key scales per chunk, and a
    device cache; entries with lengths 0..L, one skipped (-1), one written as padding (0)."""
    g = torch.Generator().manual_seed(seed)
    R, d, C, L, M, K = 120, 16, 12, 5, 9, 7
    w, ng = d * bits // 8, d // vg
    hkc = torch.randint(0, 256, (R, w), generator=g, dtype=torch.uint8)
    hvc = torch.randint(0, 256, (R, w), generator=g, dtype=torch.uint8)
    hs = (torch.rand(R, 2 * ng, generator=g) - 0.3).half()
    hp = torch.arange(R, dtype=torch.int32)
    if pin:
        hkc, hvc, hs, hp = (t.pin_memory() for t in (hkc, hvc, hs, hp))
    src = torch.randint(0, R - L, (M,), generator=g)
    ln = torch.randint(0, L + 1, (M,), generator=g)
    ln[2], ln[5] = -1, 0
    krow = torch.randint(0, K, (M,), generator=g)
    ksz = (torch.rand(K, 2, d, generator=g) - 0.5).half().to(device_cache)
    dst = torch.randperm(C, generator=g)[:M]
    ck = torch.full((C, L, d), 7.0, dtype=dtype, device=device_cache)
    cv = torch.full((C, L, d), 7.0, dtype=dtype, device=device_cache)
    cp = torch.full((C, L), 99, dtype=torch.int32, device=device_cache)
    return (hkc, hvc, hs, hp, src, ln, krow, ksz, ck, cv, cp, dst, bits)


@pytest.mark.parametrize("bits", [4, 2])
def test_copy_chunks_dequant_ref_matches_loop(bits):
    from kvsift.cache.quant import unpack
    from kvsift.kernels.chunk_fetch import copy_chunks_dequant_ref

    a = _quant_case(bits=bits)
    hkc, hvc, hs, hp, src, ln, krow, ksz, ck, cv, cp, dst, _ = a
    want = [ck.clone(), cv.clone(), cp.clone()]
    d, ng = ck.shape[2], hs.shape[1] // 2
    for m in range(src.numel()):
        n, r = int(ln[m]), int(dst[m])
        if n < 0:
            continue
        ks, kz = ksz[int(krow[m])].float()
        want[0][r], want[1][r], want[2][r] = kz, 0, -1          # padding: code 0, value scale 0
        for j in range(n):
            row = int(src[m]) + j
            vs = hs[row].float().view(2, ng).repeat_interleave(d // ng, -1)
            want[0][r, j] = unpack(hkc[row], bits).float() * ks + kz
            want[1][r, j] = unpack(hvc[row], bits).float() * vs[0] + vs[1]
            want[2][r, j] = hp[row]
    copy_chunks_dequant_ref(*a)
    for got, w in zip((ck, cv, cp), want):
        assert torch.equal(got, w)
    assert torch.equal(ck[int(dst[2])], torch.full_like(ck[0], 7.0))      # the skipped entry's row: untouched


def test_copy_chunks_dequant_bad_input():
    from kvsift.kernels.chunk_fetch import copy_chunks_dequant_ref

    a = list(_quant_case())
    with pytest.raises(ValueError, match="bits"):
        copy_chunks_dequant_ref(*a[:-1], 3)
    bad = list(a)
    bad[0] = a[0][:, :3]
    with pytest.raises(ValueError, match="uint8"):
        copy_chunks_dequant_ref(*bad)
    bad = list(a)
    bad[7] = a[7][:, :1]
    with pytest.raises(ValueError, match="key_sz"):
        copy_chunks_dequant_ref(*bad)
    bad = list(a)
    bad[6] = a[6][:3]
    with pytest.raises(ValueError, match="must be"):
        copy_chunks_dequant_ref(*bad)
    bad = list(a)
    bad[5] = torch.full_like(a[5], 9)
    with pytest.raises(ValueError, match="longer"):
        copy_chunks_dequant_ref(*bad)


_INTERP_DEQUANT = """
import itertools
import torch
from kvsift.kernels.chunk_fetch import copy_chunks, copy_chunks_dequant, copy_chunks_dequant_ref, copy_chunks_ref
from tests.test_kernels_offload import _case, _quant_case
for dt in (torch.float32, torch.float16):    # the plain copy (skipped, padding-only and partial entries)
    a = _case("cpu", dt, seed=4)
    b = [t.clone() for t in a]
    copy_chunks(*a)
    copy_chunks_ref(*b)
    for x, y in zip(a[5:8], b[5:8]):
        assert torch.equal(x, y), dt
for bits, dt, vg in itertools.product((4, 2), (torch.float32, torch.bfloat16), (4, 16)):
    a = _quant_case(bits=bits, dtype=dt, vg=vg, seed=bits + vg)
    b = [t.clone() if isinstance(t, torch.Tensor) else t for t in a]
    copy_chunks_dequant(*a)
    copy_chunks_dequant_ref(*b)
    # (the interpreter casts fp32 to bf16 by truncation, not to nearest: one bf16 step apart at most
    # there; the CUDA test checks the bits)
    for x, y in zip(a[8:11], b[8:11]):
        assert torch.equal(x, y) if dt == torch.float32 else torch.allclose(x.float(), y.float(), rtol=2 ** -7,
                                                                            atol=0), (bits, dt, vg)
print("INTERP_OK")
"""


def test_copy_kernels_match_refs_in_interpreter():
    from tests.conftest import run_in_triton_interpreter

    run_in_triton_interpreter(_INTERP_DEQUANT, timeout=600)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_copy_chunks_dequant_matches_ref(bits, dtype):
    """Through UVA from pinned host memory: the kernel's rows are the reference's, bit for bit."""
    from kvsift.kernels.chunk_fetch import copy_chunks_dequant, copy_chunks_dequant_ref

    a = _quant_case("cuda", bits, dtype, pin=True, seed=3)
    b = [t.clone() if isinstance(t, torch.Tensor) and t.is_cuda else t for t in a]
    dev = [t.cuda() if isinstance(t, torch.Tensor) and 4 <= i <= 6 or i == 11 else t for i, t in enumerate(a)]
    copy_chunks_dequant(*dev)
    copy_chunks_dequant_ref(*b)
    for x, y in zip(a[8:11], b[8:11]):
        assert torch.equal(x, y)


def test_lru_plan_kernel_matches_reference_in_interpreter_at_long_context_sizes():
    """The bookkeeping kernel at the sizes of a 30k-token prompt kept at 25% (about 1,000 chunks
    selected per row over a cache of 2,048 slots: the suite's failing cell, whose (k, S) tile passed
    Triton's largest block) and over more slots than one program holds (the reference then)."""
    from tests.conftest import run_in_triton_interpreter

    run_in_triton_interpreter(textwrap.dedent("""
        import torch
        from kvsift.kernels import chunk_cache as cc
        g = torch.Generator().manual_seed(7)
        def state(R, S, n):
            return {"slot_of": torch.full((R, n + 1), -1, dtype=torch.int64),
                    "owner": torch.full((R, S + 1), -1, dtype=torch.int64),
                    "last": torch.full((R, S + 1), -1, dtype=torch.int64),
                    "counts": torch.zeros(2, dtype=torch.int64)}
        for R, n, k, S, L, T in ((2, 3000, 1000, 2048, 16, 50000), (1, 40, 8, 12, 4, 200)):
            sts = [state(R, S, n) for _ in range(2)]
            starts = torch.randint(0, T - L, (R, n), generator=g)
            lens = torch.randint(0, L + 1, (R, n), generator=g, dtype=torch.int32)
            for step in range(3):
                idx = torch.stack([torch.randperm(min(n, k + k // 2), generator=g)[:k] for _ in range(R)])
                idx[0, -3:] = -1
                tabs = [torch.empty(R, k * L, dtype=torch.int32) for _ in range(2)]
                outs = [fn(idx, s["slot_of"], s["owner"], s["last"], starts, lens, T, s["counts"], L, tab)
                        for fn, s, tab in ((cc.lru_plan, sts[0], tabs[0]), (cc.lru_plan_ref, sts[1], tabs[1]))]
                for a, b in zip(*outs):
                    assert torch.equal(a, b), (R, k, S, step)
                assert torch.equal(tabs[0], tabs[1])
                a, b = sts   # (the scratch column / slot at the end may differ)
                assert torch.equal(a["slot_of"][:, :n], b["slot_of"][:, :n]) and torch.equal(a["counts"], b["counts"])
                assert torch.equal(a["owner"][:, :S], b["owner"][:, :S]) and torch.equal(a["last"][:, :S], b["last"][:, :S])
        # more cache slots than one program's block: the reference answers (same results)
        S = cc.MAX_BLOCK + 1
        sts = [state(1, S, 8) for _ in range(2)]
        idx = torch.tensor([[3, 5, -1, 0]])
        outs = [fn(idx, s["slot_of"], s["owner"], s["last"], torch.arange(8)[None] * 4,
                   torch.full((1, 8), 4, dtype=torch.int32), 40, s["counts"], 4)
                for fn, s in ((cc.lru_plan, sts[0]), (cc.lru_plan_ref, sts[1]))]
        for a, b in zip(*outs):
            assert torch.equal(a, b)
        print("INTERP_OK")
    """), timeout=900)
