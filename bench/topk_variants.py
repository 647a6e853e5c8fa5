"""Where the page top-k's time goes, and variants of its threshold search (issue #11's batch-1 step).

The shipped kernel (``kvsift/kernels/topk_select.py``, ``impl="int32"``) finds the k-th largest of
a row by a 4-way search on order-preserving int32 keys (three counts per pass), then writes the
selected indices with a prefix sum. On Quest scores of random keys at 128k (8,192 pages of 16,
k = 128, the 2,048-token budget; one program per (row, KV head)) this times, CUDA graphs, per layer:

* ``i32``: the shipped kernel; ``passes``: how many search passes each row took;
* ``loadonly_w*``: everything but the search (load, keys, the tie path's two prefix sums, stores);
* ``tltopk_w*``: the threshold from ``tl.topk`` (a bitonic top-k), then the same write-out;
* ``wide{W}_w*``: a W-way search, its W-1 counts as one 2-D reduction per pass (fewer passes, more
  work per element).

Every variant is checked against ``topk_select_ref`` (``*_ok``). The kernels here are experiments
(not used by kvsift); the shipped one stays the fastest measured.

    PYTHONPATH=. python3 bench/topk_variants.py bench/out/topk_variants.json
"""
import sys, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from kvsift.kernels import dispatch
from kvsift.kernels import topk_select as tk
from kvsift.kernels.chunk_scores import page_summaries
from kvsift.kernels._triton import tl, triton
from kvsift.kernels.topk_select import row_keys, search_threshold, select_at, write_selected
from gpu_decode import time_cuda

HQ, HK, D = 32, 8, 128


@triton.jit
def _finish(valid, key, offs, kk, t, out_ptr, b, h, so_b, so_h, so_k, K, BLOCK_K: tl.constexpr):
    # the shipped kernel's write-out (tie path: the lowest indices at the threshold)
    write_selected(out_ptr, b, h, so_b, so_h, so_k, offs, select_at(valid, key, t, kk, False), kk, K, BLOCK_K)


@triton.jit
def _k_tltopk(s_ptr, out_ptr, N, K, ss_b, ss_h, ss_n, so_b, so_h, so_k,
              HK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, KC: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // HK).to(tl.int64)
    h = (pid % HK).to(tl.int64)
    offs, valid, key, n_valid, kk = row_keys(s_ptr, b, h, ss_b, ss_h, ss_n, N, K, BLOCK_N)
    top = tl.topk(key, KC)
    t = tl.min(top, axis=0)
    _finish(valid, key, offs, kk, t, out_ptr, b, h, so_b, so_h, so_k, K, BLOCK_K)


@triton.jit
def _k_loadonly(s_ptr, out_ptr, N, K, ss_b, ss_h, ss_n, so_b, so_h, so_k,
                HK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # everything but the search: threshold = the max (sel = the max's ties), to time the rest
    pid = tl.program_id(0)
    b = (pid // HK).to(tl.int64)
    h = (pid % HK).to(tl.int64)
    offs, valid, key, n_valid, kk = row_keys(s_ptr, b, h, ss_b, ss_h, ss_n, N, K, BLOCK_N)
    t = tl.max(key, axis=0)
    _finish(valid, key, offs, kk, t, out_ptr, b, h, so_b, so_h, so_k, K, BLOCK_K)


@triton.jit
def _k_passes(s_ptr, cnt_ptr, N, K, ss_b, ss_h, ss_n, HK: tl.constexpr, BLOCK_N: tl.constexpr):
    # the i32 kernel's search, counting its passes
    pid = tl.program_id(0)
    b = (pid // HK).to(tl.int64)
    h = (pid % HK).to(tl.int64)
    offs, valid, key, n_valid, kk = row_keys(s_ptr, b, h, ss_b, ss_h, ss_n, N, K, BLOCK_N)
    _, _, passes = search_threshold(valid, key, n_valid, kk)   # the shipped search, counting its passes
    tl.store(cnt_ptr + pid, passes)


@triton.jit
def _k_wide(s_ptr, out_ptr, N, K, ss_b, ss_h, ss_n, so_b, so_h, so_k,
            HK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WAYS: tl.constexpr):
    # W-way search: WAYS-1 counts per pass in one 2-D reduction
    pid = tl.program_id(0)
    b = (pid // HK).to(tl.int64)
    h = (pid % HK).to(tl.int64)
    offs, valid, key, n_valid, kk = row_keys(s_ptr, b, h, ss_b, ss_h, ss_n, N, K, BLOCK_N)
    lo = tl.min(tl.where(valid, key, 2147483647), axis=0).to(tl.int64)
    hi = tl.max(key, axis=0).to(tl.int64) + 1
    cnt_lo = n_valid
    offs_w = tl.arange(0, WAYS)
    while (hi - lo > 1) & (cnt_lo != kk):
        w = hi - lo
        m = lo + (w * offs_w.to(tl.int64)) // WAYS                          # (WAYS,) m[0] = lo
        c = tl.sum((key[None, :] >= m.to(tl.int32)[:, None]).to(tl.int32), axis=1)   # invalid keys are int32 min
        c = tl.where(offs_w == 0, cnt_lo, c)
        j = tl.sum((c >= kk).to(tl.int32), axis=0) - 1
        new_lo = tl.sum(tl.where(offs_w == j, m, 0), axis=0)
        cnt_lo = tl.sum(tl.where(offs_w == j, c, 0), axis=0)
        hi = tl.where(j == WAYS - 1, hi, tl.sum(tl.where(offs_w == j + 1, m, 0), axis=0))
        lo = new_lo
    sel = select_at(valid, key, lo.to(tl.int32), kk, cnt_lo == kk)
    write_selected(out_ptr, b, h, so_b, so_h, so_k, offs, sel, kk, K, BLOCK_K)


def launch(kern, s, k, nw=8, **kw):
    b, h, n = s.shape
    out = torch.empty(b, h, k, dtype=torch.int64, device=s.device)
    kern[(b * h,)](s, out, n, k, *s.stride(), *out.stride(), HK=h, BLOCK_N=triton.next_power_of_2(n),
                   BLOCK_K=max(16, triton.next_power_of_2(k)), num_warps=nw, **kw)
    return out


def main():
    dev = torch.device("cuda")
    res = {}
    g = torch.Generator(device=dev).manual_seed(0)
    for batch in (1, 8):
        ctx, page, kk = 131072, 16, 128
        Ls = []
        for _ in range(8):
            k = torch.randn(batch, HK, ctx, D, device=dev, dtype=torch.bfloat16, generator=g)
            q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
            Ls.append({"sc": dispatch.chunk_scores(q, page_summaries(k, page, "minmax"), "max")})
            del k
        def over(f):
            def r():
                for L in Ls:
                    f(L)
            return r
        cnt = torch.zeros(batch * HK, dtype=torch.int32, device=dev)
        s0 = Ls[0]["sc"]
        _k_passes[(batch * HK,)](s0, cnt, s0.shape[-1], kk, *s0.stride(), HK=HK, BLOCK_N=8192, num_warps=8)
        row = {"passes": cnt.tolist()}
        row["i32"] = time_cuda(over(lambda L: tk.topk_select(L["sc"], kk, torch.int64)), 20, graph=True) / 8 * 1e3
        for ways in (4, 8, 16, 32):
            for nw in (4, 8, 16):
                got = launch(_k_wide, s0, kk, nw, WAYS=ways)
                row[f"wide{ways}_ok_w{nw}"] = torch.equal(got, tk.topk_select_ref(s0, kk, torch.int64))
                row[f"wide{ways}_w{nw}"] = time_cuda(over(lambda L: launch(_k_wide, L["sc"], kk, nw, WAYS=ways)), 20, graph=True) / 8 * 1e3
        for nw in (4, 8, 16):
            row[f"loadonly_w{nw}"] = time_cuda(over(lambda L: launch(_k_loadonly, L["sc"], kk, nw)), 20, graph=True) / 8 * 1e3
            try:
                got = launch(_k_tltopk, s0, kk, nw, KC=128)
                row[f"tltopk_ok_w{nw}"] = torch.equal(got, tk.topk_select_ref(s0, kk, torch.int64))
                row[f"tltopk_w{nw}"] = time_cuda(over(lambda L: launch(_k_tltopk, L["sc"], kk, nw, KC=128)), 20, graph=True) / 8 * 1e3
            except Exception as e:
                row["tltopk_err"] = str(e)[:200]
        res[f"b{batch}"] = row
        print(f"batch {batch}: search passes per row min {min(row['passes'])} median "
              f"{sorted(row['passes'])[len(row['passes']) // 2]} max {max(row['passes'])}", flush=True)
        print(f"{'variant':<16} {'us/layer':>9} {'exact':>6}", flush=True)
        for name, v in row.items():
            if isinstance(v, float):
                ok = row.get(name.replace("_w", "_ok_w"), "")
                print(f"{name:<16} {v:9.1f} {str(ok):>6}", flush=True)
    Path(sys.argv[1]).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
