"""``kvsift bench``: run the evaluation grid and build reports.

    kvsift bench run --tasks niah,mk_niah --methods full,snapkv,streaming --budgets 0.1,0.25,0.5 \
        --lengths 1024,2048 --seeds 0 --out results/results.jsonl
    kvsift bench report results/results.jsonl [more.jsonl ...] --out results/report
    kvsift bench tasks
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with ``run`` / ``report`` / ``tasks``) to the ``kvsift`` sub-commands."""
    from kvsift.eval.tasks import DEFAULT_DEPTHS, TASKS

    b = subparsers.add_parser("bench", help="evaluation harness: NIAH, RULER-style tasks, perplexity, reports")
    bsub = b.add_subparsers(dest="bench_command", required=True)

    r = bsub.add_parser("run", help="run tasks x methods x budgets x lengths x seeds (resumable JSONL)")
    r.add_argument("--tasks", type=_csv, default=["niah"], help=f"comma list of {', '.join(TASKS)}, or 'all'")
    r.add_argument("--methods", type=_csv, default=["full", "snapkv"],
                   help="comma list of registered methods (see `kvsift methods`), or 'all'")
    r.add_argument("--budgets", type=_csv, default=["0.1", "0.25", "0.5"],
                   help="comma list of ratios (0.25), percents (25%%) or token counts (256)")
    r.add_argument("--lengths", type=_int_list, default=[1024, 2048], help="prompt lengths in tokens")
    r.add_argument("--seeds", type=_int_list, default=[0])
    r.add_argument("--depths", type=_float_list, default=list(DEFAULT_DEPTHS), help="NIAH needle depths in [0, 1]")
    r.add_argument("--samples", type=int, default=2, help="samples per cell for the non-NIAH tasks")
    r.add_argument("--ppl-tokens", type=int, default=128, help="teacher-forced tokens per ppl sample")
    r.add_argument("--method-opt", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="method option, e.g. snapkv.window=64 (repeatable)")
    r.add_argument("--out", type=Path, default=Path("results/results.jsonl"), help="JSONL file (appended)")
    r.add_argument("--report", type=Path, default=None, help="also write the report into this directory")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--backend", choices=("kvsift", "fake"), default="kvsift",
                   help="'fake' checks the pipeline in seconds (a prompt-reading fake model, no weights)")
    r.add_argument("--model", default=None, help="a named model (default qwen2.5-coder-0.5b; see `kvsift models`), "
                                                  "an HF model directory or a .gguf file")
    r.add_argument("--device", default="auto")
    r.add_argument("--dtype", default="auto")

    p = bsub.add_parser("report", help="Markdown table + PNG plots from result JSONL file(s)")
    p.add_argument("results", nargs="+", type=Path, help="JSONL result file(s) (kvsift and kvpress rows mix)")
    p.add_argument("--out", type=Path, default=Path("results/report"), help="output directory")

    bsub.add_parser("tasks", help="list the tasks")
    return b


def _method_opts(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--method-opt needs METHOD.KEY=VALUE, got {item!r}")
        lhs, v = item.split("=", 1)
        method, key = lhs.split(".", 1)
        try:
            value = json.loads(v)
        except json.JSONDecodeError:
            value = v
        out.setdefault(method.strip(), {})[key.strip()] = value
    return out


def run_bench(args) -> int:
    cmd = args.bench_command
    if cmd == "tasks":
        from kvsift.eval.tasks import TASK_DOCS, TASKS

        for name in TASKS:
            print(f"{name:8s} {TASK_DOCS.get(name, '')}")
        return 0
    if cmd == "report":
        from kvsift.eval.report import write_report

        res = write_report(args.results, args.out)
        print(Path(res["markdown"]).read_text(encoding="utf-8"))
        print(f"[bench] {res['rows']} rows -> {res['markdown']} and {len(res['plots'])} plot(s) in {args.out}",
              file=sys.stderr)
        return 0
    if cmd == "run":
        from kvsift.eval.runner import BenchConfig, KvsiftBackend, run_grid
        from kvsift.eval.tasks import TASKS, TaskConfig

        tasks = list(TASKS) if args.tasks == ["all"] else args.tasks
        if args.methods == ["all"]:
            from kvsift.methods import available_methods

            methods = list(available_methods())
        else:
            methods = args.methods
        cfg = BenchConfig(tasks=tasks, methods=methods, budgets=args.budgets, lengths=args.lengths, seeds=args.seeds,
                          task_config=TaskConfig(depths=tuple(args.depths), samples=args.samples,
                                                 ppl_tokens=args.ppl_tokens))
        kwargs = _method_opts(args.method_opt)
        if args.backend == "fake":
            from kvsift.eval.fakes import ReadingBackend, WordTokenizer

            backend = ReadingBackend(WordTokenizer())
        else:
            from kvsift.methods import build_method
            from kvsift.models import check_model

            check_model(args.model)
            for m in methods:  # fail before loading the model on an unknown method / option
                build_method(m, None if m == "full" else 0.5, **kwargs.get(m, {}))
            backend = KvsiftBackend(model=args.model, device=args.device, dtype=args.dtype, method_kwargs=kwargs)
        counts = run_grid(backend, cfg, args.out, progress=not args.no_progress,
                          log=lambda s: print(s, file=sys.stderr))
        print(f"[bench] {counts['run']} cell(s) run, {counts['skipped']} already done, {counts['errors']} error(s) "
              f"-> {args.out}", file=sys.stderr)
        if args.report is not None:
            from kvsift.eval.report import write_report

            res = write_report(args.out, args.report)
            print(f"[bench] report -> {res['markdown']}", file=sys.stderr)
        return 0 if counts["errors"] == 0 else 1
    raise ValueError(f"unknown bench command {cmd!r}")
