"""Load test of batching across requests: N concurrent streaming clients with long prompts against a
server this script starts on loopback (and stops), once per ``--max-batch`` value (default 1, the
old one-request-at-a-time behaviour, and 8, with continuous batching unless ``--continuous off``;
``--continuous both`` runs each value > 1 without and with it). Prints a table (throughput in generated tokens/s,
time to first token p50/p99, inter-token time p50/p99) and writes the numbers as JSON.

    python bench/serve_load.py                                  # tiny random model on CPU, 4 clients
    python bench/serve_load.py --clients 8 --prompt-tokens 2048 --max-tokens 64 --json out.json
    python bench/serve_load.py --model smollm2 --max-batch 1,4,16 --kv-method snapkv --kv-budget 256
    python bench/serve_load.py --kv-method snapkv --kv-budget 256 --prompt-tokens 768,1024,1280,1536 \
        --clients 12 --max-batch 1,8 --continuous both     # mixed lengths: joins against none, one run

Prompts are random token ids of one length, or of several (``--prompt-tokens 768,1024``, cycled
over the clients: a compressing method's requests then share one prefill batch only at equal
lengths, and join a running batch at any length), ``ignore_eos`` and greedy, so every request
generates exactly ``--max-tokens`` tokens. Each client sends its requests
one after another; all clients start together.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


QUESTIONS = ["Name one colour of the sky and say why, in one sentence.",
             "What is 12 times 7? Answer in one short sentence.",
             "Give one word that rhymes with 'cat', then stop.",
             "In one sentence, what does a compiler do?",
             "Name a fruit that is yellow. One sentence.",
             "What is the capital of France? One sentence.",
             "Say hello in Spanish, nothing else.",
             "In one sentence: why do we sleep?"]


def one_request(url: str, body: dict, timeout: float) -> dict:
    """One streamed completion (or chat completion, a body with ``messages``): send time, time of
    each content chunk, tokens generated."""
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    with httpx.stream("POST", url + path, json=body, timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            return {"error": f"{r.status_code} {r.text[:200]}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            if "error" in ch:  # the server reports a failure inside the stream (the status was 200)
                return {"error": f"in stream: {json.dumps(ch['error'])[:300]}"}
            c0 = ch["choices"][0] if ch.get("choices") else None
            if c0 and (c0.get("text") or (c0.get("delta") or {}).get("content") or c0.get("finish_reason")):
                times.append(time.perf_counter())
            if ch.get("usage"):
                tokens = ch["usage"]["completion_tokens"]
    return {"t0": t0, "times": times, "tokens": tokens, "end": time.perf_counter()}


def run_phase(url: str, clients: int, per_client: int, prompt_tokens: list[int], max_tokens: int, extra: dict,
              timeout: float, seed: int, chat: bool = False) -> dict:
    """Client ``i`` sends prompts of ``prompt_tokens[i % len(prompt_tokens)]`` random tokens, every
    answer ``max_tokens`` long; ``chat``: short questions instead (:data:`QUESTIONS`), answered
    until the model's end of sequence (``max_tokens`` is only their cap)."""
    rng = random.Random(seed)
    stream = {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}
    if chat:
        bodies = [[{"messages": [{"role": "user", "content": QUESTIONS[(i * per_client + k) % len(QUESTIONS)]}],
                    "max_tokens": max_tokens, **stream} for k in range(per_client)] for i in range(clients)]
    else:
        bodies = [[{"prompt": [rng.randrange(100, 30000) for _ in range(prompt_tokens[i % len(prompt_tokens)])],
                    "max_tokens": max_tokens, "ignore_eos": True, **stream} for _ in range(per_client)]
                  for i in range(clients)]
    results: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(i: int) -> None:
        start.wait()
        for body in bodies[i]:
            out = one_request(url, body, timeout)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = [r["times"][0] - r["t0"] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    later = [b - a for r in ok for a, b in zip(r["times"][1:], r["times"][2:])]   # from the second gap on
    # where each stream's longest gap falls (gap 0: first to second token, where a new batch's
    # first decode steps warm up and record their CUDA graphs): which part of the stream the p99 is
    worst = [max(range(len(r["times"]) - 1), key=lambda i, t=r["times"]: t[i + 1] - t[i])
             for r in ok if len(r["times"]) > 1]
    tokens = sum(r["tokens"] for r in ok)
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    return {"requests": len(results), "errors": [r["error"] for r in results if "error" in r],
            "wall_s": round(wall, 2), "tokens": tokens, "throughput_tok_s": round(tokens / wall, 2) if wall else None,
            "ttft_p50_ms": ms(percentile(ttft, 0.5)), "ttft_p99_ms": ms(percentile(ttft, 0.99)),
            "itl_p50_ms": ms(percentile(itl, 0.5)), "itl_p99_ms": ms(percentile(itl, 0.99)),
            "itl_p99_after_first_ms": ms(percentile(later, 0.99)),
            "longest_gap_at_first": sum(1 for w in worst if w == 0), "streams": len(worst),
            "ttft_mean_ms": ms(statistics.fmean(ttft)) if ttft else None}


def scrape(url: str) -> dict[str, float]:
    """The server's ``/metrics`` samples: name (with its labels, as written: ``name{k="v"}``) -> value."""
    vals = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            try:
                vals[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return vals


def batch_metric(vals: dict[str, float]) -> dict:
    """From :func:`scrape`'s samples: batches run and requests per batch on average."""
    n = vals.get("kvsift_batch_requests_count", 0.0)
    return {"batches": int(n), "requests_per_batch": round(vals.get("kvsift_batch_requests_sum", 0.0) / n, 2)
            if n else None}


def rebuild_metric(before: dict[str, float], after: dict[str, float]) -> dict:
    """Changes of a running batch's rows between two :func:`scrape` calls that running rows waited
    on (``kvsift_batch_rebuild_seconds``): how many, their mean host time, and the longest over the
    server's life (warm-up included)."""
    key = "kvsift_batch_rebuild_seconds"
    n = after.get(key + "_count", 0.0) - before.get(key + "_count", 0.0)
    total = after.get(key + "_sum", 0.0) - before.get(key + "_sum", 0.0)
    return {"rebuilds": int(n), "rebuild_mean_ms": round(1000 * total / n, 1) if n else None,
            "rebuild_max_ms": round(1000 * after.get(key + "_max", 0.0), 1) if n else None}


def step_trace(url: str, since: float | None = None) -> dict:
    """The server's ``GET /debug/steps`` (``--step-trace``): records from ``since`` (its clock) on."""
    params = {"since": since} if since is not None else {"since": 1e18}   # just its clock
    r = httpx.get(url + "/debug/steps", params=params, timeout=60)
    r.raise_for_status()
    return r.json()


def trace_report(body: dict, slowest: int = 40) -> dict:
    """A run's step trace, kept small: the server's summary of its slow gaps, its slowest gaps (those
    the summary counts, :func:`kvsift.engine.trace.waited`), and its changes of rows (how the run
    batched: requests stacked, rows kept; one after every row had finished is in no stream's gap)."""
    from kvsift.engine.trace import waited

    gaps = [r for r in body["records"] if waited(r)]
    return {**body["summary"], "slowest": sorted(gaps, key=lambda r: -r["gap_ms"])[:slowest],
            "changes": [r for r in body["records"] if r["stacked"] or r["rebuild_ms"] > 0][:slowest]}


def trace_line(r: dict) -> str | None:
    """One row's step trace in words (None without one)."""
    s = r.get("steps")
    if not s or not s.get("gaps"):
        return None
    w, m = s["slow_with"], s["slow_mean"]
    return (f"max-batch {r['max_batch']}{' join ' + str(r.get('join_chunk_size')) if r.get('join_chunk_size') else ''}"
            f"{' ' + r['join_order'] if r.get('join_order') else ''}: "
            f"{s['gaps']} gaps ({s['stream_gaps']} stream-gaps), p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms; "
            f"over {s['factor']}x p50: {s['slow_stream_gaps']} stream-gaps ({100 * s['slow_share']:.2f}%), mean "
            f"{m['gap_ms']} ms = wait {m['wait_ms']} + join {m['join_ms']} + rows {m['rebuild_ms']} + setup "
            f"{m['setup_ms']} (+ the rest); with a join chunk {w['join_chunk']}, a prefill ending {w['prefill_done']}, "
            f"rows changed {w['rows_changed']}, setup {w['setup']}, held {w['held']}, none of these {w['plain']}")


def admission_line(srv) -> str | None:
    """The server's startup line on its default admission limits (KV bytes on the device and in
    host memory; printed on CUDA when --kv-memory / --host-memory are not given), if any."""
    try:
        text = srv.log_path.read_text(errors="replace")
    except (OSError, AttributeError):
        return None
    m = re.search(r"admission: [^\n]*", text)
    return m.group(0) if m else None


def tiny_model_dir(path: Path) -> Path:
    from transformers import AutoTokenizer

    from kvsift.models import save_tiny_model
    from kvsift.models.loader import _convert_gguf, default_model_path

    tok = AutoTokenizer.from_pretrained(_convert_gguf(default_model_path("smollm2")))
    return save_tiny_model(path, tokenizer=tok, seed=1, max_positions=8192)


def random_8b_dir(path: Path, layers: int, tokenizer: str, max_positions: int) -> Path:
    """A random-weight Llama-3.1-8B-shaped model (``layers`` decoder layers, bf16) written as an HF
    directory for the server, with the tokenizer of a GGUF file or an HF directory (its vocabulary
    sets the embedding rows: 151,936 for Qwen's, against the 8B's 128,256). Built on the GPU when
    there is one."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "bench"))
    from _random_llama import LLAMA_8B

    g = Path(tokenizer)
    tok = AutoTokenizer.from_pretrained(g) if g.is_dir() else AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=max_positions, rope_theta=500000.0,
                      **{**LLAMA_8B, "vocab_size": len(tok)})
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return path


def _token_counts(ap: argparse.ArgumentParser, flag: str, value: str) -> list[int | None]:
    """An optional comma list of token counts (each >= 16, the server's floor); ``[None]`` when
    empty (the server's default)."""
    if not value:
        return [None]
    try:
        out = [int(v) for v in str(value).split(",")]
    except ValueError:
        ap.error(f"{flag} must be comma-separated integers")
    if min(out) < 16:
        ap.error(f"{flag} values must be >= 16")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="served model (default: a tiny random-weight model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--random-8b", type=int, default=None, metavar="LAYERS",
                    help="serve a random-weight Llama-3.1-8B-shaped model of LAYERS layers (bf16; needs --tokenizer)")
    ap.add_argument("--tokenizer", default=None,
                    help="GGUF file or HF directory whose tokenizer the --random-8b model gets")
    ap.add_argument("--max-batch", default="1,8", help="comma-separated --max-batch values to compare")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--prompt-tokens", default="1024",
                    help="prompt length, or a comma list of lengths cycled over the clients (512,1024,1536)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kv-method", default=None)
    ap.add_argument("--kv-budget", default=None)
    ap.add_argument("--kv-options", default=None, metavar="JSON",
                    help="method options sent with every request (the API's kv_options), "
                         'e.g. \'{"warm_cache": true}\'')
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--continuous", choices=("on", "off", "both"), default="on",
                    help="continuous batching (requests join a running batch) for --max-batch > 1; both: each "
                         "such value twice, without and with it, in one run")
    ap.add_argument("--no-continuous-batching", action="store_true", help="same as --continuous off")
    ap.add_argument("--join-chunks", default="1",
                    help="the server's --join-chunks, or a comma list run one after another with continuous "
                         "batching (0,1: a joining prompt prefilled at once vs a chunk per decode step)")
    ap.add_argument("--join-chunk-size", default="",
                    help="the server's --join-chunk-size (tokens per joining prefill chunk), or a comma list run one "
                         "after another with continuous batching (default: the server's, --chunk-size)")
    ap.add_argument("--join-order", default="together",
                    help="the server's --join-order (together | fcfs | shortest), or a comma list run one after "
                         "another with continuous batching")
    ap.add_argument("--max-batched-tokens", default="",
                    help="the server's --max-batched-tokens (prompt tokens one prefill forward takes over all its "
                         "rows: what bounds the running rows' gaps when many requests join at once), or a comma "
                         "list run one after another (default: the server's, 16384)")
    ap.add_argument("--preempt", choices=("off", "on", "both"), default="off",
                    help="the server's --preempt (with --kv-memory); both: every setting without, then with it")
    ap.add_argument("--kv-arena", choices=("off", "on", "both"), default="off",
                    help="run the server with --kv-arena (graphs replayed over KV arenas across batches), or both ways")
    ap.add_argument("--chat", action="store_true",
                    help="short chat questions answered until the model's end of sequence (--max-tokens caps "
                         "them) instead of random-token prompts of --prompt-tokens answered to --max-tokens")
    ap.add_argument("--kv-memory", default=None, help="the server's --kv-memory (e.g. 40G)")
    ap.add_argument("--threads", type=int, default=None,
                    help="the server's CPU threads (OMP_NUM_THREADS; on a shared machine 1 avoids threads waiting "
                         "for a busy core: 2 threads measured 4-60x slower steps there)")
    ap.add_argument("--warmup-clients", type=int, default=0, metavar="K",
                    help="before the timed clients, K concurrent untimed requests of the same prompt lengths "
                         "(warms what a long-running server has warm: page-locked host blocks in its pool, CUDA "
                         "graphs, cuDNN plans); 0: only a 3-token request")
    ap.add_argument("--step-trace", action="store_true",
                    help="start each server with --step-trace and report where its slow inter-token gaps went "
                         "(GET /debug/steps over the timed clients: gaps over 2x the median with a joining "
                         "prefill chunk, a prefill ending, a change of rows, CUDA graph setup; the 40 slowest "
                         "gaps and the changes of rows in the JSON)")
    ap.add_argument("--timeout", type=float, default=600.0, help="per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    try:
        values = [int(v) for v in args.max_batch.split(",")]
        lengths = [int(v) for v in str(args.prompt_tokens).split(",")]
        joins = [int(v) for v in str(args.join_chunks).split(",")]
    except ValueError:
        ap.error("--max-batch, --prompt-tokens and --join-chunks must be comma-separated integers")
    if not joins or min(joins) < 0:
        ap.error("--join-chunks values must be >= 0")
    widths = _token_counts(ap, "--join-chunk-size", args.join_chunk_size)
    from kvsift.engine.llm import JOIN_ORDERS

    orders = [v.strip() for v in args.join_order.split(",")]
    if not orders or any(v not in JOIN_ORDERS for v in orders):
        ap.error(f"--join-order values must be {', '.join(JOIN_ORDERS[:-1])} or {JOIN_ORDERS[-1]}, "
                 f"got {args.join_order!r}")
    caps = _token_counts(ap, "--max-batched-tokens", args.max_batched_tokens)
    if args.random_8b is not None and (args.random_8b < 1 or not args.tokenizer or args.model):
        ap.error("--random-8b takes a layer count >= 1 and --tokenizer, and no --model")
    if not values or any(v < 1 for v in values) or not 1 <= args.clients <= 256 or args.requests < 1 \
            or not lengths or min(lengths) < 1 or args.max_tokens < 1:
        ap.error("--max-batch values, --clients (<= 256), --requests, --prompt-tokens and --max-tokens must be >= 1")
    if not 0 <= args.warmup_clients <= 256:
        ap.error("--warmup-clients must be between 0 and 256")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    extra = {}
    if args.kv_method:
        extra["kv_method"] = args.kv_method
    if args.kv_budget:
        extra["kv_budget"] = args.kv_budget
    if args.kv_options:
        try:
            opts = json.loads(args.kv_options)
        except ValueError:
            opts = None
        if not isinstance(opts, dict):
            ap.error(f"--kv-options must be a JSON object, got {args.kv_options!r}")
        extra["kv_options"] = opts

    from kvsift.server.testing import ServerProcess

    tmp = tempfile.TemporaryDirectory(prefix="kvsift-load-")
    try:
        if args.random_8b is not None:
            model = str(random_8b_dir(Path(tmp.name) / "r8b", args.random_8b, args.tokenizer,
                                      max(lengths) + args.max_tokens + 64))
            label = f"random Llama-3.1-8B shape, {args.random_8b} layers, bf16"
        else:
            model = args.model or str(tiny_model_dir(Path(tmp.name) / "tiny"))
            label = args.model or "tiny random (llama, 2 layers)"
        rows = []
        modes = {"on": [True], "off": [False], "both": [False, True]}[
            "off" if args.no_continuous_batching else args.continuous]
        runs = [(mb, c, jc, jw, jo, cap, pre, arena) for mb in values for c in (modes if mb > 1 else modes[:1])
                for jc in (joins if c and mb > 1 else joins[:1])
                for jw in (widths if c and mb > 1 else widths[:1])
                for jo in (orders if c and mb > 1 else orders[:1])
                for cap in caps
                for pre in {"off": [False], "on": [True], "both": [False, True]}[args.preempt]
                for arena in {"off": [False], "on": [True], "both": [False, True]}[args.kv_arena]]
        for mb, cont, jc, jw, jo, cap, pre, arena in runs:
            cmd = ["--model", model, "--device", args.device, "--no-persist", "--max-batch", str(mb),
                   "--max-waiting", str(4 * args.clients), "--max-tokens-cap", str(args.max_tokens),
                   "--join-chunks", str(jc)]
            if jw is not None and cont and mb > 1:
                cmd += ["--join-chunk-size", str(jw)]
            if cont and mb > 1:
                cmd += ["--join-order", jo]
            if cap is not None:
                cmd += ["--max-batched-tokens", str(cap)]
            if args.chunk_size:
                cmd += ["--chunk-size", str(args.chunk_size)]
            if pre:
                cmd.append("--preempt")
            if arena:
                cmd.append("--kv-arena")
            if args.kv_memory:
                cmd += ["--kv-memory", args.kv_memory]
            if not cont:
                cmd.append("--no-continuous-batching")
            if args.step_trace:
                cmd += ["--step-trace", "1000000"]
            with ServerProcess(cmd, start_timeout=600, env=env) as srv:
                one_request(srv.url, {"prompt": [5, 6, 7], "max_tokens": 2, "stream": True}, args.timeout)  # warm-up
                warm = None
                if args.warmup_clients:  # other prompts (another seed), not counted
                    w = run_phase(srv.url, args.warmup_clients, 1, lengths, args.max_tokens, extra, args.timeout,
                                  args.seed + 1, chat=args.chat)
                    warm = {"clients": args.warmup_clients, "wall_s": w["wall_s"], "errors": len(w["errors"])}
                before = scrape(srv.url)
                t_trace = step_trace(srv.url)["now"] if args.step_trace else None
                res = run_phase(srv.url, args.clients, args.requests, lengths, args.max_tokens, extra,
                                args.timeout, args.seed, chat=args.chat)
                res["admission"] = admission_line(srv)
                if args.step_trace:
                    res["steps"] = trace_report(step_trace(srv.url, t_trace))
                if res["errors"]:  # the server's side of them
                    print(f"{len(res['errors'])} request(s) failed (max-batch {mb}); the server log ends:\n"
                          f"{srv.log()[-3000:]}", file=sys.stderr)
                try:
                    after = scrape(srv.url)
                except httpx.HTTPError:  # the server is gone: say why
                    print(f"server (max-batch {mb}) died; its log ends:\n{srv.log()[-4000:]}", file=sys.stderr)
                    raise
            res["preemptions"] = int(after.get("kvsift_preemptions_total", 0))
            peak = after.get('kvsift_device_memory_bytes{kind="peak_allocated"}')
            res["gpu_peak_gib"] = round(peak / 2**30, 2) if peak is not None else None   # the server's life
            res["joined"] = int(after.get("kvsift_batch_joins_total", 0) - before.get("kvsift_batch_joins_total", 0))
            res.update(rebuild_metric(before, after))
            n = batch_metric(after)["batches"] - batch_metric(before)["batches"]
            res["batches"] = n
            res["requests_per_batch"] = round((res["requests"] - len(res["errors"])) / n, 2) if n else None
            rows.append({"max_batch": mb, "continuous": cont and mb > 1, "join_chunks": jc if cont and mb > 1 else None,
                         "join_chunk_size": jw if cont and mb > 1 else None,
                         "join_order": jo if cont and mb > 1 else None, "max_batched_tokens": cap,
                         "preempt": pre, "kv_arena": arena, "warmup": warm, **res})
            if args.json is not None:  # rows so far, should a later run be cut off
                args.json.write_text(json.dumps({"partial": True, "model": label, "results": rows}, indent=1))
    finally:
        tmp.cleanup()

    head = ("max-batch", "arena", "joins", "join chunks", "chunk tokens", "order", "batched tokens", "joined",
            "preempt", "preemptions", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
            "ITL p50 ms", "ITL p99 ms", "p99 from gap 2", "longest at gap 1", "rebuilds", "rebuild ms mean/max",
            "batches", "req/batch", "GPU peak GiB", "errors")
    table = [head] + [(str(r["max_batch"]), "on" if r.get("kv_arena") else "off", "yes" if r["continuous"] else "no",
                       "-" if r["join_chunks"] is None else ("all" if r["join_chunks"] == 0 else str(r["join_chunks"])),
                       "-" if r.get("join_chunk_size") is None else str(r["join_chunk_size"]),
                       r.get("join_order") or "-",
                       "-" if r.get("max_batched_tokens") is None else str(r["max_batched_tokens"]),
                       str(r.get("joined", "-")), "yes" if r["preempt"] else "no", str(r["preemptions"]),
                       str(r["throughput_tok_s"]), str(r["ttft_p50_ms"]), str(r["ttft_p99_ms"]),
                       str(r["itl_p50_ms"]), str(r["itl_p99_ms"]), str(r.get("itl_p99_after_first_ms")),
                       f"{r.get('longest_gap_at_first', 0)}/{r.get('streams', 0)}", str(r.get("rebuilds", "-")),
                       f"{r.get('rebuild_mean_ms')}/{r.get('rebuild_max_ms')}" if r.get("rebuilds") else "-",
                       str(r["batches"]), str(r["requests_per_batch"]),
                       "-" if r.get("gpu_peak_gib") is None else str(r["gpu_peak_gib"]),
                       str(len(r["errors"]))) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    print(f"{args.clients} clients x {args.requests} requests, "
          + (f"chat questions answered to the end (at most {args.max_tokens} tokens)" if args.chat
             else f"{args.prompt_tokens}-token prompts, {args.max_tokens} new tokens")
          + f", model {label}" + (f", --kv-memory {args.kv_memory}" if args.kv_memory else "")
          + (f", {args.threads} server thread(s)" if args.threads else "")
          + (f", {args.kv_method} {args.kv_budget}" if args.kv_method else "")
          + (f" {json.dumps(extra['kv_options'])}" if extra.get("kv_options") else ""))
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    for line in sorted({r["admission"] for r in rows if r.get("admission")}):
        print(f"server {line}")
    for line in filter(None, map(trace_line, rows)):
        print(f"step trace, {line}")
    report = {"clients": args.clients, "requests_per_client": args.requests,
              "prompt_tokens": "chat questions" if args.chat else lengths, "kv_memory": args.kv_memory,
              "max_tokens": args.max_tokens, "model": label,
              "kv_method": args.kv_method, "kv_budget": args.kv_budget, "kv_options": extra.get("kv_options"),
              "threads": args.threads, "results": rows}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
