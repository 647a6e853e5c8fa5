"""``kvsift bench``: run the evaluation grid and build reports.

    kvsift bench run --suite standard --model /path/to/model.gguf --out results/standard.jsonl --max-minutes 8
    kvsift bench run --tasks niah,mk_niah --methods full,snapkv,streaming --budgets 0.1,0.25,0.5 \
        --lengths 1024,2048 --seeds 0 --out results/results.jsonl
    kvsift bench run --tasks niah --methods full,kvzip,expected_attention --budgets 0.25 --compress context
    kvsift bench report results/results.jsonl [more.jsonl ...] --out results/report
    kvsift bench tasks
    kvsift bench suites
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvsift.eval.labels import split_items


def _csv(text: str) -> list[str]:
    """Comma-separated items; commas inside brackets or parentheses (``kivi[bits=2,group=64]``) stay."""
    items = split_items(text)
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
    from kvsift.eval.suites import SUITES
    from kvsift.eval.tasks import DEFAULT_DEPTHS, TASKS

    b = subparsers.add_parser("bench", help="evaluation harness: NIAH, RULER-style tasks, perplexity, reports")
    bsub = b.add_subparsers(dest="bench_command", required=True)

    r = bsub.add_parser("run", help="run tasks x methods x budgets x lengths x seeds (resumable JSONL)")
    r.add_argument("--suite", choices=sorted(SUITES), default=None,
                   help="a named grid (see `kvsift bench suites`); the options below narrow or change it")
    r.add_argument("--tasks", type=_csv, default=None,
                   help=f"comma list of {', '.join(TASKS)}, or 'all' (default: niah, or the suite's)")
    r.add_argument("--methods", type=_csv, default=None,
                   help="comma list of registered methods (see `kvsift methods`), or 'all' "
                        "(default: full,snapkv, or the suite's: all); a method may carry options in brackets, "
                        "which then name its rows: kivi[bits=2],snapkv[window=64]")
    r.add_argument("--budgets", type=_csv, default=None,
                   help="comma list of ratios (0.25), percents (25%%) or token counts (256) (default: 0.1,0.25,0.5)")
    r.add_argument("--lengths", type=_int_list, default=None, help="prompt lengths in tokens (default: 1024,2048)")
    r.add_argument("--seeds", type=_int_list, default=None, help="default: 0")
    r.add_argument("--depths", type=_float_list, default=None,
                   help=f"NIAH needle depths in [0, 1] (default: {','.join(f'{d:g}' for d in DEFAULT_DEPTHS)})")
    r.add_argument("--samples", type=int, default=None,
                   help="samples per cell for every task (NIAH cycles through the depths); default: one NIAH "
                        "sample per depth and 2 for the other tasks, or the suite's")
    r.add_argument("--ppl-tokens", type=int, default=None, help="teacher-forced tokens per ppl sample (default: 128)")
    r.add_argument("--ppl-text", default=None,
                   help="text for the ppl task: alice (the default: the whole book, 34k Qwen2.5 tokens), "
                        "a shipped file (alice_ch1_3.txt, ...) or a .txt path")
    r.add_argument("--batch-size", type=_batch_size, default=None, metavar="N|auto",
                   help="samples per model call (default auto: 1 on CPU; on CUDA what a KV-memory estimate allows)")
    r.add_argument("--batch-padding", action="store_true",
                   help="let a batch mix prompt lengths (left padding: fewer, larger batches; but a ratio budget is "
                        "then resolved against the batch's longest prompt, so some methods answer differently than "
                        "one at a time; ppl batches always hold one length)")
    r.add_argument("--mem-fraction", type=float, default=0.5,
                   help="auto batch size: the batch's estimated KV bytes stay under this fraction of free GPU memory")
    r.add_argument("--max-batch", type=int, default=64,
                   help="auto batch size (and --group-budgets' continuous batches): at most this many sequences")
    r.add_argument("--chunk-size", type=int, default=2048,
                   help="prefill chunk length (LLM chunk_size; 2048 prefills a 30k row 2.8x faster than the engine's "
                        "512 on an H200)")
    r.add_argument("--prefill-mode", choices=("auto", "batch", "rows"), default="auto",
                   help="LLM prefill_mode: auto = rows for eviction methods (one full KV on the GPU at a time, "
                        "exact per row); batch = ~25%% faster at 30k, holds the batch's full KV")
    r.add_argument("--share-prefix-gib", type=_gib, default=0.0, metavar="GIB",
                   help="share prefills between methods: keep each prompt's full-cache KV before its last prefill "
                        "chunk (up to GIB GiB of device memory) and start every method that allows it "
                        "(`kvsift methods NAME`: shares prefix) from there, so a prompt set is prefilled about once "
                        "instead of once per method and budget; same tokens as row-by-row prefill "
                        "(docs/eval.md, Prefix sharing). Default 0: off")
    r.add_argument("--compress", choices=("prompt", "context"), default="prompt",
                   help="what a method compresses: prompt = the whole rendered prompt, question included (the "
                        "query-aware setting, default); context = only the sample's context, the budget resolved "
                        "against the context, then the question answered uncompressed over it (the query-agnostic "
                        "setting, kvpress's pipeline; one sample at a time; report label '<method> [ctx]')")
    r.add_argument("--group-budgets", action="store_true",
                   help="run each method's budgets over a prompt set as one continuous batch (every sample and "
                        "budget a request, each prefilled on its own as alone; requests join the running batch "
                        "where the method allows it: any budget and prompt length for methods that keep only KV), "
                        "at most --max-batch sequences within --mem-fraction of free GPU memory: fewer decode "
                        "steps than one batch per cell; rows record settings.grouped_cells")
    r.add_argument("--max-minutes", type=float, default=None,
                   help="stop cleanly after the cell in flight once this many minutes have passed (rerun to continue)")
    r.add_argument("--method-opt", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="method option, e.g. snapkv.window=64 (repeatable)")
    r.add_argument("--out", type=Path, default=Path("results/results.jsonl"), help="JSONL file (appended)")
    r.add_argument("--report", type=Path, default=None, help="also write the report into this directory")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--backend", choices=("kvsift", "fake"), default="kvsift",
                   help="'fake' checks the pipeline in seconds (a prompt-reading fake model, no weights)")
    r.add_argument("--model", default=None, help="a named model (default qwen2.5-coder-0.5b; see `kvsift models`), "
                                                  "an HF model directory or a .gguf file path")
    r.add_argument("--device", default="auto")
    r.add_argument("--dtype", default="auto")
    r.add_argument("--dry-run", action="store_true", help="print the plan (cells, samples) and stop")

    p = bsub.add_parser("report", help="Markdown table + PNG plots from result JSONL file(s)")
    p.add_argument("results", nargs="+", type=Path, help="JSONL result file(s) (kvsift and kvpress rows mix)")
    p.add_argument("--out", type=Path, default=Path("results/report"), help="output directory")
    p.add_argument("--heatmap-budget", default=None,
                   help="budget of the per-method NIAH heatmap grid (default: the budget nearest 0.1)")

    c = bsub.add_parser("compare", help="method A against method B on the samples both ran: paired differences")
    c.add_argument("a", help="method label of the rows (e.g. 'sentencekv[prefill_offload=true,prefill_budget=2048]')")
    c.add_argument("b", help="the method compared with (e.g. 'sentencekv', or 'full')")
    c.add_argument("results", nargs="+", type=Path, help="JSONL result file(s) holding both")
    c.add_argument("--budget", default=None, help="only A's cells at this budget label (e.g. 0.1)")
    c.add_argument("--budget-b", default=None, help="B's budget label (default: A's, else B's only one)")
    c.add_argument("--tasks", type=_csv, default=None, help="only these tasks' cells (e.g. niah,mk_niah,vt,qa)")
    c.add_argument("--lengths", type=_int_list, default=None,
                   help="only these prompt lengths (e.g. 16384,30000: the 'all' row pools just them)")
    c.add_argument("--json", type=Path, default=None, help="also write the rows here")

    bsub.add_parser("tasks", help="list the tasks")
    bsub.add_parser("suites", help="list the named suites")
    return b


def _gib(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in GiB (e.g. 24), got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a size in GiB >= 0, got {text!r}")
    return v


def _batch_size(text: str) -> int | None:
    if str(text).strip().lower() == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"batch size must be >= 1, got {n}")
    return n


_DEFAULTS = dict(tasks=["niah"], methods=["full", "snapkv"], budgets=["0.1", "0.25", "0.5"], lengths=[1024, 2048],
                 seeds=[0], depths=None, samples=None, ppl_tokens=128)


def resolve_plan(args) -> dict:
    """The grid of a ``bench run``: the suite's values (or the defaults) where an option is not given.
    ``methods`` 'all' (and a suite's default) expand to every registered method."""
    from kvsift.eval.suites import get_suite
    from kvsift.eval.tasks import DEFAULT_DEPTHS, TASKS

    given = {k: getattr(args, k) for k in ("tasks", "methods", "budgets", "lengths", "seeds", "depths", "samples",
                                           "ppl_tokens")}
    if args.suite is not None:
        suite = get_suite(args.suite)
        base = dict(tasks=list(suite.tasks), methods=list(suite.methods) if suite.methods else ["all"],
                    budgets=list(suite.budgets), lengths=list(suite.lengths), seeds=list(suite.seeds),
                    depths=list(suite.depths), samples=suite.samples, ppl_tokens=suite.ppl_tokens)
    else:
        base = dict(_DEFAULTS)
    plan = {k: (v if v is not None else base[k]) for k, v in given.items()}
    if plan["depths"] is None:
        plan["depths"] = list(DEFAULT_DEPTHS)
    if plan["tasks"] == ["all"]:
        plan["tasks"] = list(TASKS)
    if plan["methods"] == ["all"]:
        from kvsift.methods import available_methods

        plan["methods"] = list(available_methods())
    return plan


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
    if cmd == "suites":
        from kvsift.eval.suites import SUITES

        for name, su in SUITES.items():
            print(f"{name:9s} {su.doc}")
            print(f"{'':9s} tasks {','.join(su.tasks)}; lengths {','.join(map(str, su.lengths))}; budgets "
                  f"{','.join(su.budgets)}; methods {','.join(su.methods) if su.methods else 'all registered'}; "
                  f"{su.samples} samples per cell; NIAH depths {','.join(f'{d:g}' for d in su.depths)}")
        return 0
    if cmd == "compare":
        from kvsift.eval.report import comparison_markdown, load_rows, paired_comparison, perplexity_markdown

        missing = [str(p) for p in args.results if not Path(p).is_file()]
        if missing:
            raise ValueError(f"no such result file: {', '.join(missing)}")
        if args.tasks:
            from kvsift.eval.tasks import check_task_names

            check_task_names(args.tasks)
        if args.lengths and min(args.lengths) < 1:
            raise ValueError(f"--lengths must be positive token counts, got {args.lengths}")
        rows = load_rows(args.results)
        only = dict(tasks=args.tasks, lengths=args.lengths)
        comp = paired_comparison(rows, args.a, args.b, args.budget, args.budget_b, **only)
        ppl = paired_comparison(rows, args.a, args.b, args.budget, args.budget_b, perplexity=True, **only)
        if not comp and not ppl:
            where = "".join(f" {k} {','.join(map(str, v))}" for k, v in only.items() if v)
            raise ValueError(f"no samples that both {args.a!r} and {args.b!r} ran in these files"
                             + (f" (only{where})" if where else ""))
        print("\n\n".join(md for md in (comp and comparison_markdown(args.a, args.b, comp),
                                        ppl and perplexity_markdown(args.a, args.b, ppl)) if md))
        if args.json is not None:   # the scores' rows, then the perplexity rows (those with "ratio")
            args.json.write_text(json.dumps(comp + ppl, indent=1))
        return 0
    if cmd == "report":
        from kvsift.eval.report import write_report

        res = write_report(args.results, args.out, heatmap_budget=args.heatmap_budget)
        print(Path(res["markdown"]).read_text(encoding="utf-8"))
        print(f"[bench] {res['rows']} rows -> {res['markdown']} and {len(res['plots'])} plot(s) in {args.out}",
              file=sys.stderr)
        return 0
    if cmd == "run":
        from kvsift.eval.runner import BenchConfig, KvsiftBackend, check_results_file, run_grid
        from kvsift.eval.tasks import TaskConfig

        plan = resolve_plan(args)
        methods = plan["methods"]
        cfg = BenchConfig(tasks=plan["tasks"], methods=methods, budgets=plan["budgets"], lengths=plan["lengths"],
                          seeds=plan["seeds"],
                          task_config=TaskConfig(depths=tuple(plan["depths"]), samples=plan["samples"],
                                                 ppl_tokens=plan["ppl_tokens"], ppl_text=args.ppl_text))
        kwargs = _method_opts(args.method_opt)
        if args.group_budgets and (args.compress != "prompt" or args.batch_padding or args.batch_size is not None):
            raise ValueError("--group-budgets runs each method's budgets as one continuous batch of unpadded prompts, "
                             "sized by --max-batch and --mem-fraction: it does not go with --compress context, "
                             "--batch-padding or --batch-size")
        check_results_file(args.out)   # a results file rows cannot be appended to: before any work
        if args.backend != "fake":  # bad model, method or option: fail before printing or loading anything
            from kvsift.methods import build_method
            from kvsift.models import check_model

            from kvsift.eval.runner import method_options

            for m in methods:
                spec, opts = method_options(m, kwargs)
                build_method(spec, None if m == "full" else 0.5, **opts)
            check_model(args.model)
        n_cells = len(cfg.cells())
        per_cell = {t: cfg.task_config.n_samples(t) for t in cfg.tasks}
        print(f"[bench] {'suite ' + args.suite if args.suite else 'grid'}: {n_cells} cell(s) = tasks "
              f"{','.join(cfg.tasks)} x lengths {','.join(map(str, cfg.lengths))} x seeds "
              f"{','.join(map(str, cfg.seeds))} x (methods {','.join(methods)} at budgets "
              f"{','.join(plan['budgets'])}; full once); samples per cell "
              f"{', '.join(f'{t} {n}' for t, n in per_cell.items())}; compress {args.compress} -> {args.out}",
              file=sys.stderr)
        if args.dry_run:
            return 0
        if args.backend == "fake":
            from kvsift.eval.fakes import ReadingBackend, WordTokenizer

            backend = ReadingBackend(WordTokenizer())
        else:
            backend = KvsiftBackend(model=args.model, device=args.device, dtype=args.dtype, method_kwargs=kwargs,
                                    mem_fraction=args.mem_fraction, max_batch=args.max_batch,
                                    chunk_size=args.chunk_size, prefill_mode=args.prefill_mode,
                                    share_prefix_bytes=int(args.share_prefix_gib * 2**30))
        counts = run_grid(backend, cfg, args.out, progress=not args.no_progress,
                          log=lambda s: print(s, file=sys.stderr), batch_size=args.batch_size,
                          max_minutes=args.max_minutes, pad=args.batch_padding, compress=args.compress,
                          group_budgets=args.group_budgets)
        left = f", {counts['left']} left (rerun to continue)" if counts["stopped"] else ""
        na = f", {counts['unavailable']} not available" if counts["unavailable"] else ""
        print(f"[bench] {counts['run']} cell(s) run, {counts['skipped']} already done, {counts['errors']} error(s)"
              f"{na}{left} in {counts['wall_s'] / 60:.1f} min -> {args.out}", file=sys.stderr)
        if args.report is not None:
            from kvsift.eval.report import write_report

            res = write_report(args.out, args.report)
            print(f"[bench] report -> {res['markdown']}", file=sys.stderr)
        return 0 if counts["errors"] == 0 else 1
    raise ValueError(f"unknown bench command {cmd!r}")
