"""Benchmark runner: tasks x methods x budgets x context lengths x seeds -> JSONL, one row per cell.

A *cell* is ``(task, method, budget, length, seed)``; it runs all samples of that task for that
length and seed (e.g. every NIAH depth) and appends one JSON line with the mean score, the per-sample
results, KV bytes and timings. Reruns skip the cells already in the file (resumable).

Backends drive a model: :class:`KvsiftBackend` (kvsift's engine) here; ``bench/vs_kvpress.py``
adds a kvpress backend writing the same schema. This module imports no engine code at import time
so that the kvpress worker (another transformers version) can use it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Iterable, Protocol

from kvsift.eval.scoring import perplexity, score
from kvsift.eval.tasks import TASKS, Sample, TaskBuilder, TaskConfig

from kvsift.budget import FULL, Budget, budget_label, resolve_budget
from kvsift.budget import parse_budget as _parse_budget


def parse_budget(text: str | int | float | None) -> Budget:
    """``"full"``/None -> None, ``"256"`` -> 256 tokens, ``"0.25"``/``"25%"`` -> ratio 0.25."""
    return _parse_budget(text, allow_full=True)


def budget_kind(budget: Budget) -> str:
    return FULL if budget is None else ("tokens" if isinstance(budget, int) else "ratio")


def kept_tokens(budget: Budget, prompt_len: int) -> int:
    """Tokens kept per layer and KV head for ``budget`` on a prompt of ``prompt_len`` tokens (one
    grid budget serves every length, so a token budget is capped at the prompt)."""
    return resolve_budget(budget, prompt_len, clamp=True)


def cell_key(task: str, method: str, budget: Budget | str, length: int, seed: int) -> str:
    b = budget if isinstance(budget, str) else budget_label(budget)
    return f"{task}|{method}|{b}|{length}|{seed}"


# ----------------------------------------------------------------------------------------------
# backends


@dataclass(slots=True)
class Generation:
    """What a backend reports for one generated answer."""

    text: str
    prompt_tokens: int
    new_tokens: int
    kv_device_bytes: int
    kv_host_bytes: int
    kv_kept_bytes: int
    kv_full_bytes: int
    prefill_s: float
    decode_ms_per_token: float


@dataclass(slots=True)
class Scored:
    """What a backend reports for one teacher-forced continuation (perplexity)."""

    nll_sum: float
    n_tokens: int
    prompt_tokens: int
    kv_device_bytes: int
    kv_host_bytes: int
    kv_kept_bytes: int
    kv_full_bytes: int
    prefill_s: float
    decode_ms_per_token: float


class Backend(Protocol):
    name: str          # "kvsift" | "kvpress"
    model_name: str
    tokenizer: Any

    def generate(self, prompt_ids: list[int], method: str, budget: Budget, max_new_tokens: int) -> Generation: ...

    def score(self, context_ids: list[int], continuation_ids: list[int], method: str, budget: Budget) -> Scored: ...


class KvsiftBackend:
    """kvsift's engine (``kvsift.LLM``). Prompts are passed as token ids (the chat template is
    already in the sample's rendered prompt), so every backend sees the same tokens."""

    name = "kvsift"

    def __init__(self, llm=None, model: str | None = None, device: str = "auto", dtype: str = "auto",
                 method_kwargs: dict[str, dict] | None = None):
        if llm is None:
            from kvsift.engine import LLM

            llm = LLM(model, device=device, dtype=dtype)
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.model_name = llm.info.name
        self.method_kwargs = method_kwargs or {}

    def generate(self, prompt_ids, method, budget, max_new_tokens):
        from kvsift.engine import SamplingParams

        out = self.llm.generate(list(prompt_ids), SamplingParams(max_tokens=max_new_tokens, temperature=0.0),
                                method=method, budget=budget, method_kwargs=self.method_kwargs.get(method),
                                progress=False)[0]
        st = out.stats
        return Generation(text=out.text, prompt_tokens=st.prompt_tokens, new_tokens=st.generated_tokens,
                          kv_device_bytes=st.kv_device_bytes, kv_host_bytes=st.kv_host_bytes,
                          kv_kept_bytes=st.kv_kept_bytes, kv_full_bytes=st.kv_full_bytes, prefill_s=st.prefill_s,
                          decode_ms_per_token=st.decode_ms_per_token)

    def score(self, context_ids, continuation_ids, method, budget):
        from kvsift.eval.perplexity import score_continuation

        return score_continuation(self.llm, context_ids, continuation_ids, method, budget,
                                  method_kwargs=self.method_kwargs.get(method))


# ----------------------------------------------------------------------------------------------
# runner


@dataclass(slots=True)
class BenchConfig:
    """The grid. ``budgets`` apply to every compressing method; ``full`` runs once per
    (task, length, seed) whatever the budgets."""

    tasks: list[str]
    methods: list[str]
    budgets: list[Budget]
    lengths: list[int]
    seeds: list[int] = field(default_factory=lambda: [0])
    task_config: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self):
        for name in ("tasks", "methods", "lengths", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; available: {sorted(TASKS)}")
        self.budgets = [parse_budget(b) for b in self.budgets]
        if any(m != FULL and not m.endswith(":" + FULL) for m in self.methods) and not any(
                b is not None for b in self.budgets):
            raise ValueError("compressing methods need at least one budget (e.g. 0.25 or 256)")
        for n in self.lengths:
            if not isinstance(n, int) or n < 16:
                raise ValueError(f"lengths must be integers >= 16, got {n!r}")

    def cells(self) -> list[tuple[str, int, int, str, Budget]]:
        """``(task, length, seed, method, budget)`` in run order (grouped by prompt set)."""
        out = []
        for task, length, seed in product(self.tasks, self.lengths, self.seeds):
            for method in self.methods:
                if method == FULL or method.endswith(":" + FULL):
                    out.append((task, length, seed, method, None))
                else:
                    out.extend((task, length, seed, method, b) for b in self.budgets if b is not None)
        return out


def load_rows(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Rows of one or more JSONL result files (unreadable trailing lines from an interrupted
    write are skipped); the last row of a key wins."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows: dict[str, dict[str, Any]] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"no results file {p}")
        for line in p.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "key" in row:
                rows[row["key"]] = row
    return list(rows.values())


def done_keys(path: str | Path) -> set[str]:
    p = Path(path)
    if not p.exists():
        return set()
    return {r["key"] for r in load_rows(p) if not r.get("error")}


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def run_cell(backend: Backend, samples: list[Sample], task: str, method: str, budget: Budget, length: int,
             seed: int) -> dict[str, Any]:
    """Run every sample of one cell and return its row (not yet written)."""
    t0 = time.perf_counter()
    per: list[dict[str, Any]] = []
    tok = backend.tokenizer
    for s in samples:
        if s.metric == "ppl":
            r = backend.score(s.context_ids, s.continuation_ids, method, budget)
            entry = {"sample_id": s.sample_id, "nll_sum": r.nll_sum, "n_tokens": r.n_tokens,
                     "ppl": perplexity(r.nll_sum, r.n_tokens)}
        else:
            ids = list(tok.encode(s.prompt, add_special_tokens=False))
            r = backend.generate(ids, method, budget, s.max_new_tokens)
            entry = {"sample_id": s.sample_id, "score": score(s.metric, r.text, s.answers),
                     "prediction": r.text, "answers": s.answers}
        for k in ("depth",):
            if k in s.meta:
                entry[k] = s.meta[k]
        entry.update(prompt_tokens=r.prompt_tokens, kv_device_bytes=r.kv_device_bytes,
                     kv_host_bytes=r.kv_host_bytes, kv_kept_bytes=r.kv_kept_bytes, kv_full_bytes=r.kv_full_bytes,
                     prefill_s=r.prefill_s, decode_ms_per_token=r.decode_ms_per_token)
        per.append(entry)
    row: dict[str, Any] = {
        "key": cell_key(task, method, budget, length, seed), "task": task, "method": method,
        "budget": budget_label(budget), "budget_value": budget, "budget_kind": budget_kind(budget),
        "length": length, "seed": seed, "backend": backend.name, "model": backend.model_name,
        "n_samples": len(per),
    }
    if samples and samples[0].metric == "ppl":
        nll, n = sum(e["nll_sum"] for e in per), sum(e["n_tokens"] for e in per)
        row["ppl"] = perplexity(nll, n)
        row["nll"] = nll / n
        row["score"] = None
    else:
        row["score"] = _mean([e["score"] for e in per])
    for k in ("prompt_tokens", "kv_device_bytes", "kv_host_bytes", "kv_kept_bytes", "kv_full_bytes", "prefill_s",
              "decode_ms_per_token"):
        row[k] = _mean([e[k] for e in per])
    row["wall_s"] = time.perf_counter() - t0
    row["time"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    row["samples"] = per
    return row


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if p.exists() and p.stat().st_size > 0:
        with p.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with p.open("a", encoding="utf-8") as f:
        # after an interrupted write the file may end mid-line: start a fresh line
        f.write(("\n" if torn else "") + json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_grid(backend: Backend, config: BenchConfig, out: str | Path, progress: bool = True,
              method_prefix: str = "", log=print) -> dict[str, int]:
    """Run every cell of ``config`` not already in ``out``; returns counts ``{"run", "skipped", "errors"}``.

    ``method_prefix`` is prepended to method names in the rows (``"kvpress:"`` for the peer)."""
    done = done_keys(out)
    builder = TaskBuilder(backend.tokenizer, config.task_config)
    cells = config.cells()
    todo = [c for c in cells if cell_key(c[0], method_prefix + c[3], c[4], c[1], c[2]) not in done]
    counts = {"run": 0, "skipped": len(cells) - len(todo), "errors": 0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="bench", unit="cell")
    samples_cache: dict[tuple[str, int, int], list[Sample] | Exception] = {}
    for task, length, seed, method, budget in todo:
        name = method_prefix + method
        if bar is not None:
            bar.set_postfix_str(f"{task} L={length} {name} {budget_label(budget)}")
        key = (task, length, seed)
        if key not in samples_cache:
            samples_cache.clear()  # cells are grouped by prompt set: keep one set in memory
            try:
                samples_cache[key] = builder.build(task, length, seed)
            except ValueError as e:
                samples_cache[key] = e
        samples = samples_cache[key]
        try:
            if isinstance(samples, Exception):
                raise samples
            row = run_cell(backend, samples, task, name, budget, length, seed)
            counts["run"] += 1
        except Exception as e:  # noqa: BLE001 - a bad combination (budget larger than the prompt) or a
            # broken method must not end a long run: record the error (reruns retry it) and go on
            row = {"key": cell_key(task, name, budget, length, seed), "task": task, "method": name,
                   "budget": budget_label(budget), "budget_value": budget, "budget_kind": budget_kind(budget),
                   "length": length, "seed": seed, "backend": backend.name, "model": backend.model_name,
                   "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=-4)}
            counts["errors"] += 1
            if log:
                log(f"[bench] {row['key']}: {row['error']}")
        append_row(out, row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return counts
