"""A radix (histogram) page top-k against the shipped one, and the page-score kernel's launch
settings, at 128k (issue #11's selected step).

* ``topk``: the shipped ``topk_select`` (``i32``) against ``radix{BINS}_w{warps}``: per pass, a
  ``tl.histogram`` of each candidate's bin (bins spread over the candidates' key range), the bin
  holding the k-th largest found by a suffix sum, its members the next pass's candidates (2-3
  passes on continuous scores). Checked equal to ``topk_select_ref`` on awkward rows (ties,
  constants, ``-inf`` and ``+inf``, short rows) and on Quest scores.
* ``score``: ``chunk_scores`` over Quest bounds (``mm``: bf16 min/max; ``q8``: the int8 bounds of
  ``bounds="int8"``) for every ``block_n`` x ``num_warps`` x ``dot`` setting.

Random bf16 keys, 8 layers rotated, CUDA graphs, us per layer; batch 1 and 8.

    PYTHONPATH=. python3 bench/topk_radix_score_tune.py bench/out/topk_radix_score_tune.json
"""
import sys, json, math
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from kvsift.kernels import dispatch
from kvsift.kernels import chunk_scores as cs_mod
from kvsift.kernels import topk_select as tk
from kvsift.kernels.chunk_scores import page_summaries, int8_bounds
from kvsift.kernels._triton import tl, triton
from kvsift.kernels.topk_select import row_keys, select_at, write_selected
from gpu_decode import time_cuda

HQ, HK, D = 32, 8, 128


@triton.jit
def _topk_radix_kernel(s_ptr, out_ptr, N, K, ss_b, ss_h, ss_n, so_b, so_h, so_k,
                       HK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BINS: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // HK).to(tl.int64)
    h = (pid % HK).to(tl.int64)
    offs, valid, key, n_valid, kk = row_keys(s_ptr, b, h, ss_b, ss_h, ss_n, N, K, BLOCK_N)
    lo = tl.min(tl.where(valid, key, 2147483647), axis=0)
    hi = tl.max(tl.where(valid, key, -2147483647 - 1), axis=0)
    cand = valid
    krem = kk
    t = lo
    ties = False
    done = n_valid <= K
    offs_b = tl.arange(0, BINS)
    while not done:
        width = (hi.to(tl.int64) - lo.to(tl.int64) + 1).to(tl.float32)
        binf = (key.to(tl.int64) - lo.to(tl.int64)).to(tl.float32) * (BINS / width)
        bins = tl.minimum(tl.maximum(binf, 0.0).to(tl.int32), BINS - 1)
        hist = tl.histogram(bins, BINS, mask=cand)
        suf = tl.flip(tl.cumsum(tl.flip(hist, 0), 0), 0)                      # #cand with bin >= d
        dstar = tl.sum((suf >= krem).to(tl.int32), axis=0) - 1
        cnt_ge = tl.sum(tl.where(offs_b == dstar, suf, 0), axis=0)
        cnt_gt = tl.sum(tl.where(offs_b == dstar + 1, suf, 0), axis=0)
        krem = krem - cnt_gt
        cand = cand & (bins == dstar)
        lo = tl.min(tl.where(cand, key, 2147483647), axis=0)
        hi = tl.max(tl.where(cand, key, -2147483647 - 1), axis=0)
        t = lo
        if cnt_ge - cnt_gt == krem:
            done = True
        elif lo == hi:
            done = True
            ties = True
    # (ties: krem of the keys equal to t, after every key above it: the shipped tie rule)
    write_selected(out_ptr, b, h, so_b, so_h, so_k, offs, select_at(valid, key, t, kk, not ties), kk, K, BLOCK_K)


def radix(scores, k, bins=256, nw=8):
    b, h, n = scores.shape
    out = torch.empty(b, h, k, dtype=torch.int64, device=scores.device)
    bn = max(16, triton.next_power_of_2(n))
    _topk_radix_kernel[(b * h,)](scores, out, n, k, *scores.stride(), *out.stride(), HK=h, BLOCK_N=bn,
                                 BLOCK_K=max(16, triton.next_power_of_2(k)), BINS=bins, num_warps=nw)
    return out


def main():
    dev = torch.device("cuda")
    print("triton", triton.__version__, flush=True)
    res = {"checks": {}, "topk": {}, "score": {}}
    # correctness: radix vs the reference on awkward rows
    g = torch.Generator(device=dev).manual_seed(0)
    cases = {"normal": torch.randn(8, 8, 8192, device=dev, generator=g),
             "ties": torch.randn(8, 8, 8192, device=dev, generator=g).round(),
             "fewties": (torch.randn(8, 8, 8192, device=dev, generator=g) * 2).round() / 2,
             "masked": torch.randn(8, 8, 8192, device=dev, generator=g).masked_fill(torch.rand(8, 8, 8192, device=dev, generator=g) < 0.99, float("-inf")),
             "const": torch.ones(2, 8, 8192, device=dev), "short": torch.randn(2, 8, 100, device=dev, generator=g),
             "inf": torch.randn(2, 8, 8192, device=dev, generator=g).masked_fill(torch.rand(2, 8, 8192, device=dev, generator=g) < 0.01, float("inf"))}
    for name, s in cases.items():
        for k in (1, 128, 200, 8192):
            ref = tk.topk_select_ref(s, k, torch.int64)
            for bins in (64, 256, 1024):
                ok = torch.equal(radix(s, k, bins), ref)
                res["checks"][f"{name}/k{k}/bins{bins}"] = ok
                if not ok:
                    print("MISMATCH", name, k, bins, flush=True)
    print("checks", sum(res["checks"].values()), "of", len(res["checks"]), flush=True)
    for batch in (1, 8):
        ctx, page, budget = 131072, 16, 2048
        n = ctx // page
        nl = 8
        Ls = []
        for _ in range(nl):
            k = torch.randn(batch, HK, ctx, D, device=dev, dtype=torch.bfloat16, generator=g)
            q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
            mm = page_summaries(k, page, "minmax")
            lo8, hi8, sc8, _ = int8_bounds(*mm)
            del k
            L = dict(q=q, mm=mm, q8=(lo8, hi8), sc8=sc8)
            L["sc"] = dispatch.chunk_scores(q, mm, "max")
            Ls.append(L)
        def over(f):
            def r():
                for L in Ls:
                    f(L)
            return r
        kk = budget // page
        ok = all(torch.equal(radix(L["sc"], kk), tk.topk_select_ref(L["sc"], kk, torch.int64)) for L in Ls)
        res["checks"][f"quest_b{batch}"] = ok
        t = {"i32": time_cuda(over(lambda L: tk.topk_select(L["sc"], kk, torch.int64)), 20, graph=True) / nl * 1e3}
        for bins in (64, 256, 1024):
            for nw in (4, 8, 16):
                t[f"radix{bins}_w{nw}"] = time_cuda(over(lambda L: radix(L["sc"], kk, bins, nw)), 20, graph=True) / nl * 1e3
        res["topk"][f"b{batch}"] = t
        print(f"b{batch} topk us:", {k: round(v, 1) for k, v in t.items()}, "quest ok", ok, flush=True)
        saved = dict(cs_mod.TUNING)
        sc = {}
        for s in ("mm", "q8"):
            for bn in (16, 32, 64, 128):
                for nw in (2, 4, 8):
                    for dot in (True, False):
                        cs_mod.TUNING.update(block_n=bn, num_warps=nw, dot=dot)
                        try:
                            sc[f"{s}/bn{bn}/w{nw}/dot{int(dot)}"] = time_cuda(over(lambda L: dispatch.chunk_scores(L["q"], L[s], "max", L["sc8"] if s == "q8" else None)), 20, graph=True) / nl * 1e3
                        except Exception as e:
                            sc[f"{s}/bn{bn}/w{nw}/dot{int(dot)}"] = str(e)[:80]
        cs_mod.TUNING.update(saved)
        res["score"][f"b{batch}"] = sc
        best = {s: min(((v, k) for k, v in sc.items() if k.startswith(s) and isinstance(v, float))) for s in ("mm", "q8")}
        print(f"b{batch} score default", {s: round(sc[f"{s}/bn128/w4/dot1"], 1) for s in ("mm", "q8")}, "best", best, flush=True)
        del Ls
        torch.cuda.empty_cache()
    Path(sys.argv[1]).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
