"""sentencekv's real offload: device KV bytes and decode ms/token vs ``full`` at several contexts.

For each context length the same prompt (the bundled Alice text, repeated and cut to exactly that
many tokens) is generated with ``full`` and with ``sentencekv`` at a token budget; the table shows
compute-device KV bytes after prefill (what ``cache.memory()`` reports: buffers + method state),
host bytes (the offloaded chunks), decode ms/token and sentencekv's fetch counters.

    PYTHONPATH=. python3 bench/offload.py                              # CPU, default model, 2k/4k/8k
    PYTHONPATH=. python3 bench/offload.py --contexts 2048 --max-tokens 8
    PYTHONPATH=. python3 bench/offload.py --gpu-random-8b --contexts 32768 --budget 2048

``--gpu-random-8b`` builds a random-weight Llama-3.1-8B-shaped model (bf16, 32 layers, 32 q / 8 kv
heads, head_dim 128; ``--layers`` to cut it down) directly on CUDA, with random prompt ids (no
tokenizer: fixed-size chunks). Results go to ``--out`` (JSON) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvsift.engine.llm import LLM  # noqa: E402
from kvsift.engine.params import SamplingParams  # noqa: E402

MIB = 2**20


def text_prompt(llm: LLM, n: int) -> list[int]:
    """Exactly ``n`` token ids of real prose (the bundled text, repeated), ending with a question."""
    from importlib.resources import files

    text = files("kvsift").joinpath("data/alice_ch1_3.txt").read_text()
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    q = llm.tokenizer("\n\nQuestion: what did the White Rabbit take out of its waistcoat-pocket? Answer:",
                      add_special_tokens=False)["input_ids"]
    body = (ids * (n // len(ids) + 1))[: n - len(q)]
    return body + q


def random_8b(layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                      rope_theta=500000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def one(llm: LLM, ids: list[int], method: str, budget, max_tokens: int, kwargs: dict) -> dict:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate(ids, params, method=method, budget=budget, method_kwargs=kwargs, progress=False)[0]
    st = out.stats
    return {
        "method": method, "budget": budget, "options": kwargs, "context": len(ids),
        "kv_device_bytes": st.kv_device_bytes, "kv_host_bytes": st.kv_host_bytes,
        "kv_device_bytes_end": st.kv_device_bytes_end, "kv_full_bytes": st.kv_full_bytes,
        "prefill_s": st.prefill_s, "decode_ms_per_token": st.decode_ms_per_token,
        "generated": st.generated_tokens, "wall_s": time.perf_counter() - t0,
        "method_stats": st.method_stats, "first_tokens": out.token_ids[:8],
    }


def profile_decode(llm: LLM, n: int, ids: list[int], budget: int, opts: dict, steps: int = 6) -> None:
    """Profile ``steps`` sentencekv decode steps (prefill excluded): top ops, kernel launches and
    host syncs per step (CUDA sync debug mode: each sync is reported with its source line)."""
    import collections
    import warnings

    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    syncs: collections.Counter = collections.Counter()
    prof = profile(activities=acts)
    st = {"on": False, "steps": 0, "t0": 0.0}
    orig = llm.runner.forward

    def forward(ctx, input_ids, positions):  # this instance only: start at the first decode step
        if ctx.decoding and not st["on"]:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            prof.start()
            st["on"], st["t0"] = True, time.perf_counter()
        st["steps"] += st["on"]
        return orig(ctx, input_ids, positions)

    llm.runner.forward = forward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            llm.generate(ids, SamplingParams(max_tokens=steps + 1, ignore_eos=True), method="sentencekv",
                         budget=budget, method_kwargs=opts, progress=False)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - st["t0"]
        finally:
            del llm.runner.forward
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
            if st["on"]:
                prof.stop()
    done = st["steps"]
    for w in caught:
        syncs[f"{Path(w.filename).name}:{w.lineno}"] += 1
    done = max(done, 1)
    print(f"\nprofile ctx {n}: {done} decode steps in {wall * 1000:.1f} ms ({wall * 1000 / done:.1f} ms each, profiler on)")
    avg = prof.key_averages()
    launches = sum(e.count for e in avg if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel"))
    print(f"kernel launches per decode step: {launches / done:.0f}")
    print("host syncs per decode step by source line:", {k: round(v / done, 1) for k, v in syncs.most_common(12)})
    print(avg.table(sort_by="self_cpu_time_total", row_limit=25))
    if cuda:
        print(avg.table(sort_by="self_cuda_time_total", row_limit=20))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8000],
                    help="prompt lengths in tokens (the default model allows < 8192 in all)")
    ap.add_argument("--budget", type=int, default=512, help="sentencekv token budget per layer and kv head")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="sentencekv option (repeatable)")
    ap.add_argument("--gpu-random-8b", action="store_true", help="random-weight Llama-8B-shaped model on CUDA")
    ap.add_argument("--layers", type=int, default=32, help="layers of the random 8B model")
    ap.add_argument("--chunk-size", type=int, default=None, help="prefill chunk (default 512 CPU, 2048 GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--host-copy-too", action="store_true",
                    help="also run sentencekv with KVSIFT_NO_UVA=1 (misses gathered on the host, one sync per fetch)")
    ap.add_argument("--profile", action="store_true",
                    help="profile 4 sentencekv decode steps at the first context and print the top ops")
    ap.add_argument("--check", action="store_true",
                    help="at the first context: sentencekv with budget = context must give full's tokens, and "
                         "the UVA copy the host copy's tokens at --budget")
    ap.add_argument("--out", default="bench/out/offload.json")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    opts = {}
    for item in args.opt:
        k, _, v = item.partition("=")
        opts[k] = int(v) if v.lstrip("-").isdigit() else v
    if args.gpu_random_8b:
        if not torch.cuda.is_available():
            print("--gpu-random-8b needs CUDA", file=sys.stderr)
            return 2
        llm = LLM.from_model(random_8b(args.layers), None, "random-llama-8b", chunk_size=args.chunk_size or 2048)
        gen = torch.Generator().manual_seed(0)
        prompts = {n: torch.randint(1000, 120000, (n,), generator=gen).tolist() for n in args.contexts}
    else:
        llm = LLM(chunk_size=args.chunk_size or 512)
        prompts = {n: text_prompt(llm, n) for n in args.contexts}

    # warm-up: one-time costs (the sentence-end token table, allocator, kernels) stay out of the timings
    warm = next(iter(prompts.values()))[:256]
    for method, budget in (("full", None), ("sentencekv", 128)):
        one(llm, warm, method, budget, 2, opts if method == "sentencekv" else {})
    rows = []
    for n, ids in prompts.items():
        runs = [("full", None, {}, False), ("sentencekv", min(args.budget, n), opts, False)]
        if args.host_copy_too:
            runs.append(("sentencekv", min(args.budget, n), opts, True))
        for method, budget, kw, host_copy in runs:
            old = os.environ.get("KVSIFT_NO_UVA")
            if host_copy:
                os.environ["KVSIFT_NO_UVA"] = "1"
            try:
                r = one(llm, ids, method, budget, args.max_tokens, kw)
            finally:
                if host_copy:
                    os.environ.pop("KVSIFT_NO_UVA") if old is None else os.environ.__setitem__("KVSIFT_NO_UVA", old)
            r["host_copy"] = host_copy
            rows.append(r)
            label = method + (" (host copy)" if host_copy else "")
            print(f"  done {label:22s} ctx {n:6d}: {r['decode_ms_per_token']:.1f} ms/token", file=sys.stderr, flush=True)
    if args.check:
        n, ids = next(iter(prompts.items()))
        ref = one(llm, ids, "full", None, args.max_tokens, {})["first_tokens"]
        whole = one(llm, ids, "sentencekv", n, args.max_tokens, opts)["first_tokens"]
        uva = one(llm, ids, "sentencekv", min(args.budget, n), args.max_tokens, opts)["first_tokens"]
        os.environ["KVSIFT_NO_UVA"] = "1"
        try:
            host = one(llm, ids, "sentencekv", min(args.budget, n), args.max_tokens, opts)["first_tokens"]
        finally:
            del os.environ["KVSIFT_NO_UVA"]
        print(f"check ctx {n}: budget=context equals full: {whole == ref}; UVA equals host copy: {uva == host}",
              flush=True)
    if args.profile:
        profile_decode(llm, *next(iter(prompts.items())), min(args.budget, next(iter(prompts))), opts)
    print(f"\nmodel {llm.info.name} on {llm.device} ({llm.info.num_layers} layers, {llm.info.num_kv_heads} kv heads, "
          f"head_dim {llm.info.head_dim}, {llm.info.dtype}), sentencekv budget {args.budget}, "
          f"{args.max_tokens} new tokens, torch threads {torch.get_num_threads()}")
    hdr = (f"{'context':>7} {'method':>10} {'device MiB':>10} {'host MiB':>9} {'dev/full':>8} {'ms/token':>9} "
           f"{'prefill s':>9} {'chunks/head':>11} {'fetch MiB/step':>14} {'fetch ms/step':>13}")
    print(hdr)
    print("-" * len(hdr))
    full_dev = {}
    for r in rows:
        if r["method"] == "full":
            full_dev[r["context"]] = r["kv_device_bytes"]
        ms = r["method_stats"]
        ratio = r["kv_device_bytes"] / full_dev[r["context"]] if full_dev.get(r["context"]) else float("nan")
        name = "skv-host" if r.get("host_copy") else r["method"]
        print(f"{r['context']:>7} {name:>10} {r['kv_device_bytes'] / MIB:>10.1f} {r['kv_host_bytes'] / MIB:>9.1f} "
              f"{ratio:>8.3f} {r['decode_ms_per_token']:>9.1f} {r['prefill_s']:>9.2f} "
              f"{ms.get('chunks_selected_per_head', 0):>11.1f} {ms.get('fetch_mib_per_step', 0):>14.2f} "
              f"{ms.get('fetch_ms_per_step', 0):>13.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": llm.info.name, "device": str(llm.device), "dtype": str(llm.info.dtype),
            "layers": llm.info.num_layers, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "platform": platform.platform(), "loadavg": os.getloadavg(), "budget": args.budget,
            "max_tokens": args.max_tokens, "options": opts,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
