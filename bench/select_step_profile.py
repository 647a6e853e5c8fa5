"""Per-kernel device time of a Quest-style selected decode step at 128k (issue #11).

The step as ``bench/gpu_decode.py`` times it (page scores, top-k, sparse attention split + merge;
pages of 16, a 2,048-token budget, the 8B attention shape, bf16 and int8 bounds), timed as CUDA
graph replays (us per layer, layers rotated) and profiled eagerly (``torch.profiler``: each
kernel's median device time), at batch 1 and 8. Also the cost of a graph node (an empty Triton
kernel) and two floors for the top-k: ``rowcopy`` (load and store each row of 8,192 scores) and
``rowcumsum`` (the same with one prefix sum and a scattered store).

    PYTHONPATH=. python3 bench/select_step_profile.py bench/out/select_step_profile.json
"""
import sys, json, statistics, math
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from kvsift.kernels import dispatch
from kvsift.kernels.chunk_scores import page_summaries, int8_bounds
from kvsift.kernels._triton import tl, triton
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import time_cuda

HQ, HK, D = 32, 8, 128
dev = torch.device("cuda")

@triton.jit
def _null(x_ptr):
    pass

@triton.jit
def _rowcopy(s_ptr, o_ptr, N, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    x = tl.load(s_ptr + pid * N + offs, mask=offs < N, other=0.0)
    tl.store(o_ptr + pid * N + offs, x, mask=offs < N)

@triton.jit
def _rowcumsum(s_ptr, o_ptr, N, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    x = tl.load(s_ptr + pid * N + offs, mask=offs < N, other=0.0)
    sel = x > 0.5
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(o_ptr + pid * N + pos, offs.to(tl.float32), mask=sel)

def prof(name, fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(n): fn()
        torch.cuda.synchronize()
    agg = {}
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            agg.setdefault(e.name[:60], []).append(e.device_time if hasattr(e, 'device_time') else e.cuda_time)
    out = {k: (len(v) / n, statistics.median(v)) for k, v in agg.items()}
    print(f"{name}: " + "; ".join(f"{k} x{c:.0f} {t:.1f}us" for k, (c, t) in out.items()), flush=True)
    return out

res = {}
x = torch.zeros(1, device=dev)
res["null_graph_us"] = time_cuda(lambda: _null[(1,)](x), 50, graph=True) * 1e3
res["null2_graph_us"] = time_cuda(lambda: (_null[(1,)](x), _null[(1,)](x)), 50, graph=True) * 1e3
print(res, flush=True)
for batch in (1, 8):
    ctx, page, budget = 131072, 16, 2048
    layer_bytes = 2 * batch * HK * ctx * D * 2
    nl = max(1, min(8, math.ceil(3 * 2**30 / layer_bytes)))
    g = torch.Generator(device=dev).manual_seed(1)
    Ls = []
    for _ in range(nl):
        k = torch.randn(batch, HK, ctx, D, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(batch, HK, ctx, D, device=dev, dtype=torch.bfloat16, generator=g)
        q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
        mm = page_summaries(k, page, "minmax")
        lo8, hi8, sc8, _ = int8_bounds(*mm)
        Ls.append(dict(q=q, k=k, v=v, mm=mm, q8=(lo8, hi8), sc8=sc8))
    for L in Ls:
        L["sc"] = dispatch.chunk_scores(L["q"], L["mm"], "max")
        L["pages"] = dispatch.select_chunks(L["sc"], page, budget)
        L["o"] = torch.empty_like(L["sc"])
    def over(f):
        def r():
            for L in Ls: f(L)
        return r
    def step(L, s="mm"):
        sc = dispatch.chunk_scores(L["q"], L[s], "max", L["sc8"] if s == "q8" else None)
        p = dispatch.select_chunks(sc, page, budget)
        return dispatch.sparse_decode_attention(L["q"], L["k"], L["v"], p, D ** -0.5, page=page)
    n_pages = ctx // page
    for name, f in [("step_fp", lambda L: step(L)), ("step_i8", lambda L: step(L, "q8")),
                    ("rowcopy", lambda L: _rowcopy[(batch * HK,)](L["sc"], L["o"], n_pages, BLOCK_N=8192, num_warps=8)),
                    ("rowcumsum", lambda L: _rowcumsum[(batch * HK,)](L["sc"], L["o"], n_pages, BLOCK_N=8192, num_warps=8))]:
        gms = time_cuda(over(f), 20, graph=True) / nl * 1e3
        pr = prof(f"b{batch} {name} graph {gms:.1f}us/layer", over(f))
        res[f"b{batch}_{name}"] = dict(graph_us=gms, kernels=pr)
Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/probe.json").write_text(json.dumps(res, indent=1))
