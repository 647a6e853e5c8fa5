"""``kvsift serve``: the OpenAI-compatible server (also ``python -m kvsift.server``).

    kvsift serve                                   # default model on http://127.0.0.1:8000
    kvsift serve --model smollm2                   # a named model (`kvsift models`)
    kvsift serve --model path/to/hf_dir --kv-method snapkv --kv-budget 1024 --api-key secret
    kvsift serve --host 0.0.0.0 --api-keys-file keys.txt   # tenants: lines 'KEY OWNER [admin] [max_concurrent=N]'
    kvsift serve --max-request-seconds 120 --max-concurrent-per-key 4   # limits: 429 + Retry-After
    kvsift serve --replicas 2                      # 2 engine replicas on a local Ray Serve (pip install 'kvsift[ray]')
    kvsift serve --replicas 8 --ray-address auto --contexts-dir /nfs/contexts   # on an existing Ray cluster
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from kvsift.budget import parse_bytes
from kvsift.errors import InputError

log = logging.getLogger("kvsift.server")


def _bytes(text: str) -> int:
    """``"2G"``, ``"512M"``, ``"1048576"`` -> bytes."""
    try:
        return parse_bytes(text)
    except InputError:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M or 2G, got {text!r}") from None


def default_contexts_dir() -> Path:
    root = Path(os.environ.get("KVSIFT_CACHE", Path.home() / ".cache" / "kvsift"))
    return root / "contexts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a named model (default qwen2.5-coder-0.5b; see `kvsift models`), "
                                                  "an HF model directory or a .gguf file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="prefill chunk length in tokens (default 512; on CPU a fresh prompt's first chunk "
                        "takes up to 4096)")
    p.add_argument("--join-chunks", type=int, default=1,
                   help="prefill chunks of a request joining a running batch between two of its decode steps "
                        "(default 1: a running stream waits at most one chunk per token; 0: the joining "
                        "prompt's whole prefill at once)")
    p.add_argument("--join-chunk-size", type=int, default=None,
                   help="tokens per such chunk over all the prompts joining together (each gets this // their "
                        "number, at least 16; default: --chunk-size each): narrower chunks keep a running "
                        "stream's inter-token time short while long prompts join; used for methods whose "
                        "prefill does not depend on its chunking (full, quest, tokenselect, squeezed, sentencekv)")
    p.add_argument("--join-order", choices=("together", "fcfs", "shortest"), default="together",
                   help="requests that join a running batch at one step: prefilled as a group and stacked "
                        "into it together once the last is prefilled (together, the default: one change of "
                        "rows per group), or one at a time, each streaming as soon as its own prefill ends, "
                        "in arrival order (fcfs) or shortest prompt first (shortest: a short question does "
                        "not wait for a long document's prefill); one change of rows per request")
    p.add_argument("--max-batched-tokens", type=int, default=16384,
                   help="prompt tokens one prefill forward takes over all the prompts prefilled together "
                        "(default 16384): many long prompts joining at once get narrower chunks, so "
                        "activation memory stays bounded")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port; see --ready-file)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $KVSIFT_API_KEY, else no key); "
                        "its owner is 'default', an admin")
    p.add_argument("--api-keys-file", type=Path, default=None,
                   help="tenants: JSON ([{key, owner, admin, max_concurrent}] or {key: owner}) or lines "
                        "'KEY OWNER [admin] [max_concurrent=N]'; contexts belong to their owner, admins see all")
    p.add_argument("--public-health", action="store_true",
                   help="serve /health and /metrics without a key even when keys are set")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without any API key")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the model's name)")
    p.add_argument("--kv-method", default="full", help="default KV method of requests (e.g. snapkv)")
    p.add_argument("--kv-budget", default=None, help="default KV budget: tokens (1024), ratio (0.25) or percent (25%%)")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of chat completions")
    p.add_argument("--max-tokens-cap", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: the model's context length); above: 400")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="queued requests beyond the running one (then 429 with Retry-After)")
    p.add_argument("--max-queue-seconds", type=float, default=None,
                   help="refuse a request (429 with Retry-After) whose expected wait in the queue is longer "
                        "(estimated from recent requests' run times; default: no limit)")
    p.add_argument("--max-request-seconds", type=float, default=None,
                   help="stop a generation running longer than this (from when it starts, not its time in the "
                        "queue) at its next token: it answers what it has, finish_reason 'length' and the header "
                        "X-Kvsift-Stopped: time-limit (default: no limit)")
    p.add_argument("--max-concurrent-per-key", type=int, default=None,
                   help="most requests of one API key queued or running at once, then 429 with Retry-After "
                        "(a key's max_concurrent in --api-keys-file overrides it; without keys all requests "
                        "share one bucket; default: no limit)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="most sequences of compatible queued requests (same method, options and context; greedy "
                        "or unseeded sampling; compressing methods: same prompt length) answered by one batched "
                        "generation (default 8; 1: one request at a time)")
    p.add_argument("--kv-arena", action="store_true",
                   help="decode kv_method full over reusable KV arenas, so that CUDA graphs recorded by one batch "
                        "are replayed by the next ones of the same size instead of recorded again (costs a copy of "
                        "the prompt's KV and the arenas' memory: at most two batch-size x length buckets); requests join "
                        "a running batch over it too (its rows are loaded into the arena of the new shape)")
    p.add_argument("--no-continuous-batching", action="store_true",
                   help="requests arriving while a batch runs wait for the next batch instead of joining it at its "
                        "next decode step (joining applies to methods whose state after the prefill is their kept KV: "
                        "full and the prefill eviction methods, any decode mode; over --kv-arena the joined batch replays "
                        "the arena's graphs)")
    p.add_argument("--kv-memory", type=_bytes, default=None,
                   help="expected KV bytes one batch may hold on the device (e.g. 8G; default: on CUDA 80%% of the "
                        "memory free once the model is loaded, elsewhere unbounded); "
                        "requests wait for room, one that cannot fit alone gets 400 kv_memory_exceeded")
    p.add_argument("--preempt", action="store_true",
                   help="admit requests of methods that can leave and rejoin a batch (full, the prefill eviction "
                        "methods, kivi) with their prompt's KV and a few decode tokens instead of all of max_tokens; "
                        "when --kv-memory runs out, the newest is swapped to host memory and resumed later")
    p.add_argument("--host-memory", type=_bytes, default=None,
                   help="the same for KV offloaded to host memory (sentencekv, shadowkv; default: with a CUDA "
                        "device half the host memory available, elsewhere unbounded)")
    p.add_argument("--step-trace", type=int, default=0, metavar="N",
                   help="keep the engine's last N decode-step gaps and what each spent its time on (a joining "
                        "prefill's chunks, a change of rows, CUDA graph recording), served at GET /debug/steps "
                        "with a summary of the slow gaps (default 0: off)")
    p.add_argument("--max-body", type=_bytes, default=8 * 2**20, help="largest request body (default 8M)")
    p.add_argument("--contexts-dir", type=Path, default=None,
                   help=f"where contexts are persisted (default {default_contexts_dir()})")
    p.add_argument("--no-persist", action="store_true", help="keep contexts in memory only")
    p.add_argument("--context-memory", type=_bytes, default=2 * 2**30,
                   help="LRU limit of context KV kept in memory (default 2G); persisted ones reload from disk")
    p.add_argument("--max-contexts", type=int, default=1000, help="most contexts kept (memory + disk)")
    p.add_argument("--contexts-disk-limit", type=_bytes, default=None,
                   help="quota on the bytes of persisted contexts (default: only the free space); over it: 507")
    p.add_argument("--ready-file", type=Path, default=None,
                   help="write {host, port, url} as JSON here once the server accepts connections")
    p.add_argument("--replicas", type=int, default=None,
                   help="run N engine replicas on Ray Serve behind this one endpoint (one GPU each where there "
                        "are GPUs), contexts routed to the replica that holds them; local Ray unless "
                        "--ray-address (needs pip install 'kvsift[ray]'; see docs/server.md)")
    p.add_argument("--ray-address", default=None,
                   help="run the replicas on an existing Ray cluster (e.g. auto, or ray://host:10001); it is "
                        "left running on exit (default with --replicas: a local Ray started and stopped here)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible server with reusable compressed contexts",
                              description="Serve /v1/completions, /v1/chat/completions, /v1/contexts, /metrics.")
    add_arguments(p)
    return p


def build_config(args):
    from kvsift.methods import build_method, parse_budget
    from kvsift.models import check_model
    from kvsift.server.config import ServerConfig

    budget = parse_budget(args.kv_budget)
    build_method(args.kv_method, budget)  # unknown method / missing budget: fail before loading the model
    if getattr(args, "join_chunks", 1) < 0:
        raise ValueError(f"--join-chunks must be >= 0 (0: a joining prompt's whole prefill at once), "
                         f"got {args.join_chunks}")
    jcs = getattr(args, "join_chunk_size", None)
    if jcs is not None and jcs < 16:
        raise ValueError(f"--join-chunk-size must be >= 16 tokens, got {jcs}")
    if getattr(args, "max_batched_tokens", 16384) < 16:
        raise ValueError(f"--max-batched-tokens must be >= 16, got {args.max_batched_tokens}")
    from kvsift.server.auth import KeyRing

    keys = KeyRing.from_file(args.api_keys_file) if args.api_keys_file is not None else None
    api_key = args.api_key if args.api_key is not None else os.environ.get("KVSIFT_API_KEY") or None
    if keys is not None and args.api_key is None:
        api_key = None  # the keys file wins over the environment's single key
    contexts_dir = None if args.no_persist else (args.contexts_dir or default_contexts_dir())
    config = ServerConfig(host=args.host, port=args.port, model_name=args.served_model_name, api_key=api_key,
                          default_method=args.kv_method, default_budget=budget, default_max_tokens=args.max_tokens,
                          max_waiting=args.max_waiting, max_body_bytes=args.max_body, contexts_dir=contexts_dir,
                          context_memory_bytes=args.context_memory, max_contexts=args.max_contexts,
                          contexts_disk_bytes=args.contexts_disk_limit, keys=keys, max_tokens_cap=args.max_tokens_cap,
                          public_health=args.public_health, insecure=args.insecure,
                          max_request_seconds=args.max_request_seconds, max_queue_seconds=args.max_queue_seconds,
                          max_concurrent_per_key=args.max_concurrent_per_key, max_batch=args.max_batch,
                          continuous_batching=not args.no_continuous_batching,
                          kv_memory_bytes=args.kv_memory, host_memory_bytes=args.host_memory,
                          preempt=getattr(args, "preempt", False), step_trace=getattr(args, "step_trace", 0))
    check_model(args.model)  # unknown or not installed: fail before binding or loading (after the cheap checks)
    return config


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def http_url(host: str, port: int) -> str:
    """``http://host:port`` (an IPv6 host in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def write_ready(path: Path, host: str, port: int, **extra) -> None:
    """The ready file: host, port, url, pid (and ``extra``), written atomically (tmp + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"host": host, "port": port, "url": http_url(host, port), "pid": os.getpid(), **extra}))
    os.replace(tmp, path)


def _write_ready(server, path: Path, host: str, port: int) -> None:
    """Write the ready file once uvicorn serves."""
    while not server.started and not server.should_exit:
        time.sleep(0.02)
    if not server.should_exit:
        write_ready(path, host, port)


RAY_INSTALL = "pip install 'kvsift[ray]'"


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) --ray-address must accept a TCP connection: Ray
    itself would retry an unreachable address for minutes. ``auto`` is left to Ray."""
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # e.g. "auto": Ray finds the cluster itself
    host = host.strip("[]") or "127.0.0.1"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"cannot reach the Ray cluster at --ray-address {address}: "
                         f"{e.strerror or type(e).__name__}") from None


def check_replicas(args) -> bool:
    """Whether to serve through Ray Serve replicas; bad values and a missing Ray raise ValueError
    (``kvsift: error: ...``, exit 2) before anything is loaded."""
    replicas, address = getattr(args, "replicas", None), getattr(args, "ray_address", None)
    if replicas is None and address is None:
        return False
    if replicas is not None and replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    if address is not None and not address.strip():
        raise ValueError("--ray-address must not be empty (e.g. auto, or ray://host:10001)")
    if address is not None:
        _check_reachable(address.strip())
    flag = "--ray-address" if replicas is None else "--replicas"
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{flag} needs Ray Serve, which is not installed: no module {e.name or e!s} "
                         f"({RAY_INSTALL})") from None
    return True


def run_serve(args) -> int:
    logging.getLogger("kvsift").setLevel(args.log_level.upper())
    replicas = check_replicas(args)
    config = build_config(args)
    if replicas:
        from kvsift.server.ray_serve import run_replicas

        if config.contexts_dir is None:
            print("kvsift: warning: --no-persist with replicas: a context lives on its replica only and is lost "
                  "with it", file=sys.stderr)
        else:
            config.shared_contexts = True
        return run_replicas(args, config)
    import uvicorn

    from kvsift.engine import LLM
    from kvsift.server.app import create_app
    if config.insecure and config.keys is None and config.host not in ("127.0.0.1", "::1", "localhost"):
        print(f"kvsift: warning: serving on {config.host} without an API key (--insecure)", file=sys.stderr)
    sock = _bind(config.host, config.port)  # fail fast on a busy port, before loading the model
    port = sock.getsockname()[1]
    t0 = time.perf_counter()
    llm = LLM(args.model, device=args.device, dtype=args.dtype, chunk_size=args.chunk_size, kv_arena=args.kv_arena,
              join_chunks=args.join_chunks, max_batched_tokens=args.max_batched_tokens,
              join_chunk_size=args.join_chunk_size, join_order=args.join_order)
    app = create_app(llm, config)
    print(f"kvsift: serving {app.state.kvsift.model_id} ({llm.info.device}, loaded in {time.perf_counter() - t0:.1f}s) "
          f"on {http_url(config.host, port)}/v1", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5,
                                           access_log=args.log_level in ("info", "debug")))
    if args.ready_file is not None:
        threading.Thread(target=_write_ready, args=(server, args.ready_file, config.host, port), daemon=True).start()
    server.run(sockets=[sock])
    return 0
