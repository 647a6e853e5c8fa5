#!/usr/bin/env python
"""KV bytes actually held, peak memory and decode speed per method: kvsift, and kvpress side by side.

    python bench/headwise_memory.py --model qwen2.5-coder-1.5b --lengths 8192,16384 --budgets 0.25 \
        --methods full,snapkv,pyramidkv,streaming,adakv,duo --kvpress --wheels .whl/kvpress-min
    python bench/headwise_memory.py --model /tmp/tiny --lengths 1024 --device cpu     # a CPU smoke run

Per (backend, method, length, budget) one prompt (kvsift's NIAH sample at that length, depth 0.5,
seed 0: the same token ids for both backends) is prefilled and 16 tokens (``--new-tokens``) are
decoded greedily with EOS ignored. Columns:

* ``KV MiB``: the KV bytes the device holds right after the prefill. kvsift: ``stats.kv_device_bytes``
  (its cache's real allocations); kvpress: the bytes of the ``DynamicCache`` tensors after the press
  (and after the last prompt token, which is fed uncompressed as in ``bench/vs_kvpress.py``).
  ``end MiB``: the same after the last decode step.
* ``held``: that over the full cache's bytes for the prompt. kvpress's head-wise presses (AdaKV,
  DuoAttention, KVzip) only *mask* keys: they keep 100% of the KV bytes.
* ``attended``: the entries the method attends to over the full cache (kvsift: ``kv_kept_bytes``, the
  used slots; kvpress: all but the masked entries). Equal budgets give equal ``attended``.
* ``peak GiB``: ``torch.cuda.max_memory_allocated`` over prefill + decode (reset before each row),
  ``+peak GiB`` the same less what was allocated before the row (weights, buffers): the prefill's
  and the KV's own cost. ``n/a`` on CPU.
* ``ms/tok``: decode ms per token (kvsift: ``steady_ms_per_token``, without CUDA-graph capture;
  kvpress: every decode step; each backend warms up once first).

Methods are kvsift method specs (``--methods``); a method kvsift does not know gives an error row,
not a crash. ``--kvpress`` also runs the kvpress equivalents (``--presses``, default: those of
``--methods`` that ``bench/vs_kvpress.py`` maps, same budget mapping at equal kept entries) in the
kvpress venv (made as ``bench/vs_kvpress.py`` makes it; ``--wheels`` for offline machines). Writes
the rows to ``bench/results/headwise_memory_<device>.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import vs_kvpress as vk  # noqa: E402  (the kvpress venv, model resolution, press table and backend)

DEFAULT_METHODS = "full,snapkv,pyramidkv,streaming,adakv,duo,h2o,tova,expected_attention,kvzip"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a kvsift model name (default: kvsift's default), an HF "
                                                  "directory or a .gguf file")
    ap.add_argument("--lengths", default="8192,16384", help="prompt tokens, comma list")
    ap.add_argument("--budgets", default="0.25", help="ratios (0.25) or token counts (2048), comma list")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="kvsift method specs, comma list ('' for none)")
    ap.add_argument("--kvpress", action="store_true", help="also run the kvpress presses in the kvpress venv")
    ap.add_argument("--presses", default=None,
                    help="kvpress presses (names of bench/vs_kvpress.py; default: those of --methods it maps)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--device", default="auto", help="auto: cuda when available")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--decoding-interval", type=int, default=1, help="kvpress decoding presses (see vs_kvpress.py)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default: bench/results/headwise_memory_<device>.json)")
    ap.add_argument("--venv", type=Path, default=REPO / ".venv-kvpress")
    ap.add_argument("--wheels", type=Path, default=None, help="kvpress venv: install offline from this wheel directory")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # a job file: the kvpress side
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode speed needs a decode step)")
    return args


def budget_list(text: str) -> list:
    sys.path.insert(0, str(REPO))
    from kvsift.budget import parse_budget

    return [parse_budget(b) for b in text.split(",") if b.strip()]


def label(budget) -> str:
    return "full" if budget is None else (f"{budget:g}" if isinstance(budget, float) else str(budget))


def cells(methods: list[str], lengths: list[int], budgets: list) -> list[tuple[str, int, object]]:
    """(method, length, budget); ``full`` once per length."""
    out = []
    for m in methods:
        for n in lengths:
            for b in ([None] if m.split(":", 1)[-1] == "full" else budgets):
                out.append((m, n, b))
    return out


def device_slug(device: str) -> str:
    import torch

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type != "cuda":
        return dev.type
    words = torch.cuda.get_device_name(dev).lower().replace("nvidia", "").split()
    return words[0] if words else "cuda"


def build_prompts(model_dir: Path, lengths: list[int]) -> dict[int, list[int]]:
    """kvsift's NIAH prompt (depth 0.5, seed 0) per length, as token ids."""
    from transformers import AutoTokenizer

    from kvsift.eval.tasks import TaskBuilder, TaskConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    builder = TaskBuilder(tok, TaskConfig(depths=(0.5,), samples=1))
    return {n: list(tok.encode(builder.build("niah", n, 0)[0].prompt, add_special_tokens=False)) for n in lengths}


# ---- measuring (shared by both backends) ---------------------------------------------------------

class Peak:
    """``torch.cuda.max_memory_allocated`` around a block (None on CPU)."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"
        self.device = device
        self.peak = self.start = None

    def __enter__(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.peak = self.torch.cuda.max_memory_allocated(self.device)
        return False


def row(backend: str, method: str, n: int, budget, **kw) -> dict:
    r = dict(backend=backend, method=method, length=n, budget=label(budget), prompt_tokens=None, new_tokens=None,
             kv_device_bytes=None, kv_device_bytes_end=None, kv_kept_bytes=None, kv_full_bytes=None,
             held_fraction=None, attended_fraction=None, peak_bytes=None, peak_over_start_bytes=None,
             prefill_s=None, decode_ms_per_token=None, error=None)
    r.update(kw)
    if r["kv_full_bytes"]:
        if r["kv_device_bytes"] is not None:
            r["held_fraction"] = r["kv_device_bytes"] / r["kv_full_bytes"]
        if r["kv_kept_bytes"] is not None:
            r["attended_fraction"] = r["kv_kept_bytes"] / r["kv_full_bytes"]
    return r


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def run_kvsift(args, prompts: dict[int, list[int]], budgets: list) -> list[dict]:
    import torch

    from kvsift.engine import LLM, SamplingParams
    from kvsift.methods import build_method

    methods = [m for m in args.methods.split(",") if m.strip()]
    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    first = prompts[min(prompts)]
    llm.generate([first[:256]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), method="full",
                 progress=False)  # warm-up
    rows = []
    for m, n, b in cells(methods, sorted(prompts), budgets):
        try:
            build_method(m, b)  # unknown methods / options: an error row
            with Peak(torch, llm.device) as pk:
                out = llm.generate([prompts[n]], params, method=m, budget=b, progress=False)[0]
            st = out.stats
            r = row("kvsift", m, n, b, prompt_tokens=st.prompt_tokens, new_tokens=st.generated_tokens,
                    kv_device_bytes=st.kv_device_bytes, kv_device_bytes_end=st.kv_device_bytes_end,
                    kv_kept_bytes=st.kv_kept_bytes, kv_full_bytes=st.kv_full_bytes, prefill_s=st.prefill_s,
                    decode_ms_per_token=st.steady_ms_per_token, kv_host_bytes=st.kv_host_bytes,
                    peak_bytes=pk.peak, peak_over_start_bytes=None if pk.peak is None else pk.peak - pk.start)
        except Exception as e:  # noqa: BLE001 - reported in the row
            r = row("kvsift", m, n, b, prompt_tokens=len(prompts[n]), error=_error(e))
            gc.collect()
            if llm.device.type == "cuda":
                torch.cuda.empty_cache()
        print(fmt_row(r), file=sys.stderr, flush=True)
        rows.append(r)
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def default_presses(methods: str) -> str:
    """The kvpress names among kvsift's ``methods`` (``adakv(snapkv)`` stays as is)."""
    out = []
    for m in methods.split(","):
        try:
            vk.parse_press(m)
            out.append(m)
        except ValueError:
            pass
    return ",".join(out)


# ---- the kvpress side (inside the kvpress venv) ----------------------------------------------------

def worker(job_path: Path) -> int:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    job = json.loads(job_path.read_text())
    runner, _, _ = vk._import_eval()
    be = vk.KvpressBackend(Path(job["model_dir"]), runner, job["model_name"], job["device"], job["dtype"],
                           decoding_interval=job["decoding_interval"])
    prompts = {int(n): ids for n, ids in job["prompts"].items()}
    budgets = [runner.parse_budget(b) for b in job["budgets"]]
    be.run_prompts([prompts[min(prompts)][:256]], "full", None, 4, ignore_eos=True)  # warm-up
    rows = []
    for m, n, b in cells(job["presses"], sorted(prompts), budgets):
        try:
            vk.parse_press(m)
            with Peak(torch, be.device) as pk:
                res = be.run_prompts([prompts[n]], m, b, job["new_tokens"], ignore_eos=True)
            r = row("kvpress", m, n, b, prompt_tokens=res["n"], new_tokens=len(res["ids"][0]),
                    kv_device_bytes=res["kv"], kv_device_bytes_end=res["kv_end"],
                    kv_kept_bytes=res["kv"] - res["masked"], kv_full_bytes=be._full_bytes(res["n"]),
                    prefill_s=res["prefill_s"],
                    decode_ms_per_token=1000.0 * res["decode_s"] / res["steps"] if res["steps"] else None,
                    peak_bytes=pk.peak, peak_over_start_bytes=None if pk.peak is None else pk.peak - pk.start)
        except Exception as e:  # noqa: BLE001 - reported in the row
            r = row("kvpress", m, n, b, prompt_tokens=len(prompts[n]), error=_error(e))
            be.free_memory()
        print(fmt_row(r), file=sys.stderr, flush=True)
        rows.append(r)
    Path(job["out"]).write_text(json.dumps({"rows": rows, "versions": {
        "transformers": transformers.__version__, "torch": torch.__version__, "kvpress": _version("kvpress")}}))
    return 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def run_kvpress(args, name: str, model_dir: Path, prompts: dict[int, list[int]]) -> tuple[list[dict], dict]:
    presses = [p for p in (args.presses if args.presses is not None else default_presses(args.methods)).split(",")
               if p.strip()]
    if not presses:
        return [], {}
    try:
        py = vk.ensure_venv(args.venv, args.wheels)
    except Exception as e:  # noqa: BLE001 - the kvsift rows are kept, the kvpress ones say why
        return [row("kvpress", p, 0, None, error=f"kvpress venv: {_error(e)}") for p in presses], {}
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "rows.json"
        job.write_text(json.dumps(dict(model_dir=str(model_dir), model_name=name, device=args.device,
                                       dtype=args.dtype, presses=presses, budgets=args.budgets.split(","),
                                       new_tokens=args.new_tokens, decoding_interval=args.decoding_interval,
                                       prompts={str(n): ids for n, ids in prompts.items()}, out=str(out))))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        rc = subprocess.run([str(py), str(Path(__file__).resolve()), "--worker", str(job)], env=env).returncode
        if rc != 0 or not out.exists():
            return [row("kvpress", p, 0, None, error=f"kvpress worker exited with {rc}") for p in presses], {}
        res = json.loads(out.read_text())
    return res["rows"], res["versions"]


# ---- output ------------------------------------------------------------------------------------------

COLS = ("backend", "method", "len", "budget", "KV MiB", "end MiB", "held", "attended", "peak GiB", "+peak GiB",
        "ms/tok", "error")


def _mib(x):
    return "" if x is None else (f"{x / 2**20:.1f}" if x >= 2**20 else f"{x / 2**20:.3f}")


def _gib(x):
    return "n/a" if x is None else f"{x / 2**30:.2f}"


def _pct(x):
    return "" if x is None else f"{100 * x:.1f}%"


def fmt_cells(r: dict) -> list[str]:
    err = r.get("error")
    if err:
        return [r["backend"], r["method"], str(r["length"]), r["budget"], "", "", "", "", "", "", "", err]
    ms = r.get("decode_ms_per_token")
    return [r["backend"], r["method"], str(r["length"]), r["budget"], _mib(r["kv_device_bytes"]),
            _mib(r["kv_device_bytes_end"]), _pct(r["held_fraction"]), _pct(r["attended_fraction"]),
            _gib(r["peak_bytes"]), _gib(r["peak_over_start_bytes"]), "" if ms is None else f"{ms:.2f}", ""]


def fmt_row(r: dict) -> str:
    return "[headwise_memory] " + " | ".join(c for c in fmt_cells(r) if c != "")


def table(rows: list[dict]) -> str:
    body = [list(COLS)] + [fmt_cells(r) for r in rows]
    widths = [max(len(b[i]) for b in body) for i in range(len(COLS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(b, widths)) + " |" for b in body]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    sys.path.insert(0, str(REPO))
    import torch

    lengths = [int(x) for x in args.lengths.split(",")]
    budgets = budget_list(args.budgets)
    name, model_dir = vk.converted_model_dir(args.model)
    t0 = time.time()
    prompts = build_prompts(model_dir, lengths)
    slug = device_slug(args.device)
    rows: list[dict] = []
    if args.methods.strip():
        rows += run_kvsift(args, prompts, budgets)
    versions = {}
    if args.kvpress:
        kv_rows, versions = run_kvpress(args, name, model_dir, prompts)
        rows += kv_rows
    out = args.out or BENCH / "results" / f"headwise_memory_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name() if slug not in ("cpu",) and torch.cuda.is_available() else slug
    import transformers

    out.write_text(json.dumps(dict(
        model=name, device=dev, dtype=args.dtype, lengths=lengths, budgets=[label(b) for b in budgets],
        new_tokens=args.new_tokens, decoding_interval=args.decoding_interval,
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), seconds=round(time.time() - t0, 1),
        versions={"kvsift": {"torch": torch.__version__, "transformers": transformers.__version__},
                  "kvpress": versions},
        rows=rows), indent=1))
    print(table(rows))
    print(f"\n[headwise_memory] {len(rows)} row(s), {sum(bool(r['error']) for r in rows)} error(s) -> {out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
