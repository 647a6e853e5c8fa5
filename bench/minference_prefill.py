"""Dense vs MInference sparse prefill: attention of one layer and the end-to-end prefill, per length.

On an H200 (a random-weight Llama-3.1-8B shape: 32 layers, 32 q heads, 8 KV heads, head_dim 128,
bf16; the method's default sizes: vertical 1000, slash 6096, block 64, top_blocks 100, local 4096):

    PYTHONPATH=. python3 bench/minference_prefill.py --lengths 32768,131072 --out bench/out/minference_prefill_h200.json

On CPU (the default there: a small shape, 2 layers, lengths 1024 and 2048, sizes scaled down):

    PYTHONPATH=. python3 bench/minference_prefill.py

Per length and pattern (every head on that pattern), the ``layer`` rows time one layer's prefill
attention over the whole prompt as one chunk, on queries and keys with a diagonal and a sink
(``structured_qk``; ``--random-qk``: plain random ones): dense causal SDPA against the sparse index build
(``index ms``) plus the sparse attention (``attn ms``: the Triton kernel on CUDA, the PyTorch
reference elsewhere), with the fraction of causal keys listed (``density``) and the share of 64
sampled rows' true attention the selection holds (``recall``). ``--coverage F`` builds every index
with that cumulative-attention coverage (the method's option; the sizes become caps), ``--sample-q N``
with N more estimating rows spread through the chunk (the method's ``sample_q``). The ``e2e`` rows time
``LLM.generate(max_tokens=1)`` prefill (``stats.prefill_s``) of the whole model in chunks of
``--chunk`` with ``full``, with ``minference`` (default patterns: vertical-slash everywhere; a chunk
whose index lists more than ``max_density`` of its keys attends densely: ``minference_fallback_chunks``)
and with ``minference@sparse`` (``max_density=1``: every chunk through the sparse kernel).
The e2e model has random weights: near-uniform attention, so the verticals and slashes it estimates
are scattered (a pessimistic density for vertical-slash); the times are what the kernels cost at
the density reported.

On a real model (``--model NAME``, e.g. the 1.5B staged on the GPU), e2e rows only: the eval
suite's prompts (``--tasks``, default niah and qa) at each length, prefilled with ``full``,
``minference`` and ``minference@sparse``, once with the model's searched patterns (``kvsift minference
search``; skipped when it has none) and once with the default table, so that the density is real
attention's. Each configuration runs twice and the second call is timed (the first compiles):

    PYTHONPATH=. python3 bench/minference_prefill.py --model /root/m/qwen2.5-coder-1.5b.gguf --lengths 16384,30000

``--tune`` adds ``tune`` rows: the sparse kernel's launch settings (pipeline stages, warps, the
unmasked loop over whole blocks) swept on one layer's vertical-slash and block-sparse index, blocks
of 64 and 128, beside dense SDPA in the same run, each output checked against the first setting's:

    PYTHONPATH=. python3 bench/minference_prefill.py --lengths 131072 --tune --out bench/out/minference_prefill_tune_h200.json

Prints a table and writes every row to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # runs from a checkout without an install (the GPU machine)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _timed(fn, dev, reps: int) -> tuple[float, object]:
    """Median milliseconds of ``fn()`` over ``reps`` runs after one warm-up; its last result."""
    out = fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2], out


def structured_qk(n: int, hq: int, hk: int, d: int, dev, dtype, g) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys with the structure of real attention heads: rotary phases make ``q_i . k_j``
    peak at ``i = j`` and fall off with ``|i - j|`` (slash lines near the diagonal), and key 0 draws
    every query (a vertical line, the sink), plus noise. ``(1, hq, n, d)`` and ``(1, hk, n, d)``."""
    inv = 10000.0 ** (-torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d)
    ang = torch.arange(n, device=dev, dtype=torch.float32)[:, None] * inv          # (n, d/2)
    amp = 4.0 / d ** 0.25                                                          # logit ~8 on the diagonal
    base = torch.cat([ang.cos(), ang.sin()], -1) * amp                             # (n, d)
    q = base + 0.3 * torch.randn(1, hq, n, d, device=dev, generator=g)
    k = base + 0.3 * torch.randn(1, hk, n, d, device=dev, generator=g)
    k[:, :, 0] = q.mean(2).view(1, hk, hq // hk, d).mean(2) * 4.0                  # the sink
    return q.to(dtype), k.to(dtype)


def layer_rows(n: int, shape: dict, sizes: dict, dev, dtype, reps: int, random_qk: bool = False) -> list[dict]:
    from kvsift.kernels.dispatch import sparse_prefill_attention
    from kvsift.methods.minference import PATTERNS, MInference, listed_fraction

    hq, hk, d = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    g = torch.Generator(device=dev).manual_seed(0)
    if random_qk:
        q = torch.randn(1, hq, n, d, device=dev, dtype=dtype, generator=g)
        k = torch.randn(1, hk, n, d, device=dev, dtype=dtype, generator=g)
    else:
        q, k = structured_qk(n, hq, hk, d, dev, dtype, g)
    v = torch.randn(1, hk, n, d, device=dev, dtype=dtype, generator=g)
    scale = d ** -0.5
    dense_ms, _ = _timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True),
                         dev, reps)
    rows = [{"kind": "layer", "length": n, "pattern": "dense", "attn_ms": dense_ms}]
    m = MInference(min_len=0, patterns="default", **sizes)
    from bench.minference_coverage import attention_rows
    from kvsift.kernels.sparse_prefill_attention import selected_mask

    sample = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:64].sort().values.to(dev)
    att = attention_rows(q, k, sample, n, scale)                       # (1, hq, 64, n): the true attention
    for pat in PATTERNS:
        heads = (pat,) * hq
        index_ms, (bi, cols) = _timed(lambda: m.index(q, k, heads, scale), dev, reps)
        attn_ms, _ = _timed(lambda: sparse_prefill_attention(q, k, v, bi, cols, scale, m.block), dev, reps)
        recall = float((att * selected_mask(bi, cols, n, n, m.block, sample)).sum(-1).mean())
        rows.append({"kind": "layer", "length": n, "pattern": pat, "index_ms": index_ms, "attn_ms": attn_ms,
                     "density": float(listed_fraction(bi, cols, n, n, m.block)), "recall": recall,
                     "coverage": m.coverage, "sample_q": m.sample_q, "speedup": dense_ms / (index_ms + attn_ms)})
    del att
    del q, k, v
    return rows


def tune_rows(n: int, shape: dict, sizes: dict, dev, dtype, reps: int, random_qk: bool = False) -> list[dict]:
    """``--tune``: the sparse kernel's launch settings (``sparse_prefill_attention.TUNING``) swept on
    one layer's vertical-slash and block-sparse index at length ``n``, blocks of 64 and 128, each
    row beside dense SDPA timed in the same run."""
    import itertools

    from kvsift.kernels import sparse_prefill_attention as spa
    from kvsift.kernels.dispatch import sparse_prefill_attention
    from kvsift.methods.minference import MInference, listed_fraction

    hq, hk, d = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    g = torch.Generator(device=dev).manual_seed(0)
    q, k = ((torch.randn(1, hq, n, d, device=dev, dtype=dtype, generator=g),
             torch.randn(1, hk, n, d, device=dev, dtype=dtype, generator=g)) if random_qk
            else structured_qk(n, hq, hk, d, dev, dtype, g))
    v = torch.randn(1, hk, n, d, device=dev, dtype=dtype, generator=g)
    scale = d ** -0.5
    dense_ms, _ = _timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True),
                         dev, reps)
    rows, saved = [], dict(spa.TUNING)
    for block, pat in itertools.product((64, 128), ("vertical_slash", "block_sparse")):
        m = MInference(min_len=0, patterns="default", **dict(sizes, block=block))
        bi, cols = m.index(q, k, (pat,) * hq, scale)
        dens = float(listed_fraction(bi, cols, n, n, block))
        first = None   # every setting's output against the first one's: the same attention
        for stages, warps, skip in itertools.product((2, 3, 4), (4, 8), (True, False)):
            spa.TUNING.update(num_stages=stages, num_warps_small=warps, num_warps_large=warps, skip_mask=skip)
            diff = float("nan")
            try:
                ms, out = _timed(lambda: sparse_prefill_attention(q, k, v, bi, cols, scale, block), dev, reps)
                first = out if first is None else first
                diff = (out.float() - first.float()).abs().max().item()
            except Exception as e:   # e.g. out of shared memory at this depth: a row that says so
                ms = float("nan")
                print(f"  {pat} block {block} {spa.TUNING}: {type(e).__name__}: {str(e)[:120]}")
            rows.append({"kind": "tune", "length": n, "pattern": pat, "block": block, "setting": dict(spa.TUNING),
                         "attn_ms": ms, "dense_ms": dense_ms, "density": dens, "vs_dense": dense_ms / ms,
                         "max_diff_vs_first": diff})
            print(f"tune {n:>7} {pat:<15} block {block:>3} stages {stages} warps {warps} skip_mask {skip!s:<5} "
                  f"{ms:9.2f} ms  dense {dense_ms:8.2f}  density {dens:.3f}  {dense_ms / ms:5.2f}x  "
                  f"max diff {diff:.1e}")
        spa.TUNING.update(saved)
    del q, k, v
    return rows


def e2e_rows(llm, ids: list[int], chunk: int, sizes: dict, dev, patterns: str | None = "default",
             task: str = "random") -> list[dict]:
    """Prefill ``ids`` (one prompt) through ``llm`` with ``full``, ``minference`` as a user gets it (a
    chunk whose index lists more than ``max_density`` of its keys attends densely) and
    ``minference@sparse`` (``max_density=1``: every chunk through the sparse kernel), ``patterns``
    being the per-head table (None: the model's searched file when there is one). One row each."""
    from kvsift import SamplingParams

    n = len(ids)
    rows = []
    for name, kw in (("full", {}), ("minference", dict(sizes, min_len=0, patterns=patterns)),
                     ("minference@sparse", dict(sizes, min_len=0, patterns=patterns, max_density=1.0))):
        kw = {k: v for k, v in kw.items() if v is not None}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        # twice: the first call of a configuration compiles its kernels (Triton specialises on the
        # pattern mix and the shapes); the second is the one timed
        first, out = (llm.generate(ids, SamplingParams(max_tokens=1, ignore_eos=True), method=name.split("@")[0],
                                   method_kwargs=kw, progress=False)[0] for _ in range(2))
        row = {"kind": "e2e", "length": n, "method": name, "chunk": chunk, "prefill_s": out.stats.prefill_s,
               "first_call_prefill_s": first.stats.prefill_s,
               "method_stats": out.stats.method_stats, "task": task, "patterns": patterns,
               "first_token": out.token_ids[0] if out.token_ids else None}
        if dev.type == "cuda":
            row["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        if len(rows):
            row["speedup"] = rows[0]["prefill_s"] / row["prefill_s"]
            row["same_first_token"] = row["first_token"] == rows[0]["first_token"]
        rows.append(row)
    return rows


def real_prompt(tok, task: str, n: int) -> list[int]:
    """The eval suite's first ``task`` sample at about ``n`` tokens, as token ids."""
    from kvsift.eval.tasks import TaskBuilder, TaskConfig

    sample = TaskBuilder(tok, TaskConfig(samples=1)).build(task, n, 0)[0]
    return list(tok.encode(sample.prompt, add_special_tokens=False))


def real_prompts(tok, lengths: list[int], tasks: str):
    """``(length, task, ids)`` for every length and comma-separated task: the suite's first sample."""
    for n in lengths:
        for task in [t for t in tasks.split(",") if t]:
            yield n, task, real_prompt(tok, task, n)


OPTIONS = ("last_q", "sample_q", "vertical", "slash", "block", "top_blocks", "local", "coverage")
"""The minference options the command line sets."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default=None, help="comma-separated prompt lengths (default: 131072 on CUDA, "
                                                   "1024,2048 on CPU)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the e2e model (default 32 CUDA, 2 CPU)")
    p.add_argument("--chunk", type=int, default=None, help="e2e prefill chunk (default 16384 CUDA, 512 CPU)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per layer measurement (median)")
    p.add_argument("--no-e2e", action="store_true", help="per-layer attention only")
    p.add_argument("--tune", action="store_true",
                   help="also sweep the sparse kernel's launch settings per length (tune rows; with --no-e2e: "
                        "layer and tune rows only)")
    p.add_argument("--random-qk", action="store_true",
                   help="layer rows on plain random q/k (no diagonal or sink structure) instead")
    for opt in (o for o in OPTIONS if o != "coverage"):   # the int ones
        p.add_argument("--" + opt.replace("_", "-"), type=int, default=None, help=f"minference {opt}")
    p.add_argument("--coverage", type=float, default=None,
                   help="minference coverage (vertical-slash heads keep the lines holding this share of the "
                        "estimated attention; default: the fixed sizes)")
    p.add_argument("--model", default=None,
                   help="a real model (registered name or path): e2e rows only, on the eval suite's prompts "
                        "(--tasks), with its searched patterns (`kvsift minference search`) and the default ones")
    p.add_argument("--tasks", default="niah,qa", help="with --model: the suite tasks whose prompts are prefilled")
    p.add_argument("--out", default="bench/out/minference_prefill.json")
    args = p.parse_args(argv)
    if args.model:
        return main_real(args)
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256) if cuda else dict(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        vocab_size=1000)
    sizes = {} if cuda else dict(vertical=128, slash=8, top_blocks=4, local=256)
    sizes.update({o: getattr(args, o) for o in OPTIONS if getattr(args, o) is not None})
    lengths = [int(x) for x in (args.lengths or ("131072" if cuda else "1024,2048")).split(",") if x]
    layers = args.layers or (32 if cuda else 2)
    chunk = args.chunk or (16384 if cuda else 512)
    rows = []
    print(f"device {dev}, {dtype}, shape {shape}, sizes {sizes or 'method defaults'}")
    print(f"{'kind':<6} {'length':>7} {'what':<15} {'index ms':>9} {'attn ms':>9} {'prefill s':>9} {'density':>8} "
          f"{'speedup':>8} {'recall':>7}")
    model = None
    if not args.no_e2e:
        cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=max(lengths) + 64, rope_theta=500000.0,
                          **shape)
        torch.manual_seed(0)
        with torch.device(dev):
            model = LlamaForCausalLM(cfg).to(dtype).eval()
    llm = None
    if model is not None:
        from kvsift import LLM

        llm = LLM.from_model(model, None, chunk_size=chunk)
    for n in lengths:
        new = layer_rows(n, shape, sizes, dev, dtype, args.reps, args.random_qk)
        if args.tune:
            new += tune_rows(n, shape, sizes, dev, dtype, args.reps, args.random_qk)
        if llm is not None:
            ids = torch.randint(0, shape["vocab_size"], (n,), generator=torch.Generator().manual_seed(1)).tolist()
            new += e2e_rows(llm, ids, chunk, sizes, dev)
        _print_rows(new)
        rows += new
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype), "shape": shape,
            "layers": layers, "chunk": chunk, "sizes": sizes}
    return _write(args.out, meta, rows)


def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        if r["kind"] == "tune":   # printed as they ran
            continue
        what = r.get("pattern") or r.get("method")
        if r.get("task", "random") != "random":
            searched = "" if r["method"] == "full" else f"[{r['patterns'] or 'searched'}]"
            what = f"{r['task']}/{what}{searched}"
        dens = r.get("density", (r.get("method_stats") or {}).get("minference_density"))
        print(f"{r['kind']:<6} {r['length']:>7} {what:<15} {r.get('index_ms', float('nan')):>9.2f} "
              f"{r.get('attn_ms', float('nan')):>9.2f} {r.get('prefill_s', float('nan')):>9.3f} "
              f"{dens if dens is not None else float('nan'):>8.3f} {r.get('speedup', float('nan')):>8.2f} "
              f"{r.get('recall', float('nan')):>7.3f}")


def _write(path: str, meta: dict, rows: list[dict]) -> int:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def main_real(args) -> int:
    """``--model``: e2e rows on a real model and the suite's prompts, once with the model's searched
    patterns (its ``kvsift minference search`` file; the default table when it has none) and once
    with the default table (vertical-slash everywhere), so real attention's sparsity is measured."""
    from kvsift import LLM
    from kvsift.methods.minference import cache_path

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = {o: getattr(args, o) for o in OPTIONS if getattr(args, o) is not None}
    lengths = [int(x) for x in (args.lengths or ("30000" if dev.type == "cuda" else "2048")).split(",") if x]
    chunk = args.chunk or (16384 if dev.type == "cuda" else 512)
    llm = LLM(args.model, device=dev.type, chunk_size=chunk)
    name = llm.info.name
    searched = cache_path(name).is_file()
    print(f"device {dev}, model {args.model} ({name}), patterns searched: {searched} ({cache_path(name)}), "
          f"sizes {sizes or 'method defaults'}")
    print(f"{'kind':<6} {'length':>7} {'what':<15} {'index ms':>9} {'attn ms':>9} {'prefill s':>9} {'density':>8} "
          f"{'speedup':>8} {'recall':>7}")
    rows = []
    for n, task, ids in real_prompts(llm.tokenizer, lengths, args.tasks):
        new = []
        for patterns in ((None, "default") if searched else ("default",)):
            new += e2e_rows(llm, ids, chunk, sizes, dev, patterns, task)
        _print_rows(new)
        rows += new
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "model": args.model,
            "model_name": name, "searched_patterns": searched, "chunk": chunk, "sizes": sizes}
    return _write(args.out, meta, rows)


if __name__ == "__main__":
    raise SystemExit(main())
