"""Reports from result rows: a Markdown table and PNG plots (matplotlib, Agg backend).

* ``summary.md``              per task: method x budget mean score (perplexity for ``ppl``), then a
                              detailed per-length table with KV bytes and timings
* ``niah_heatmap_<method>.png`` accuracy over depth x length, one panel per budget
* ``<task>_vs_budget.png``    score vs budget per method, the full cache as a dashed line
* ``memory.png``              device / host KV MiB per method and budget (niah, longest length)
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from kvsift.eval.runner import FULL, load_rows

MiB = 1 / 2**20


def _budget_sort_key(label: str) -> tuple[int, float]:
    if label == FULL:
        return (-1, 0.0)
    try:
        v = float(label)
    except ValueError:
        return (3, 0.0)
    return (0, v) if "." in label or v <= 1 else (1, v)


def _mean(xs: Iterable[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if digits == 0 or abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.{digits}f}"


def _metric(row: dict[str, Any]) -> float | None:
    return row.get("ppl") if row.get("task") == "ppl" else row.get("score")


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("error")]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Summary Markdown: per task a method x budget pivot (mean over lengths and seeds), then the
    per-cell detail table."""
    ok = _ok(rows)
    lines: list[str] = []
    tasks = sorted({r["task"] for r in ok})
    for task in tasks:
        tr = [r for r in ok if r["task"] == task]
        budgets = sorted({r["budget"] for r in tr}, key=_budget_sort_key)
        methods = sorted({r["method"] for r in tr}, key=lambda m: (m.split(":")[-1] != FULL, m))
        lengths = sorted({r["length"] for r in tr})
        what = "perplexity (lower is better)" if task == "ppl" else "mean score (higher is better)"
        lines.append(f"### {task}: {what}, lengths {', '.join(map(str, lengths))}")
        lines.append("")
        lines.append("| method | " + " | ".join(budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        for m in methods:
            cells = []
            for b in budgets:
                v = _mean(_metric(r) for r in tr if r["method"] == m and r["budget"] == b)
                cells.append(_fmt(v) if v is not None else "")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("### All cells")
    lines.append("")
    lines.append("| task | length | method | budget | score | ppl | prompt tok | KV device MiB | KV host MiB | "
                 "KV kept/full | prefill s | decode ms/tok | n |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        groups[(r["task"], r["length"], r["method"], r["budget"])].append(r)
    for (task, length, method, budget), rs in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], _budget_sort_key(kv[0][3]))):
        kept, full = _mean(r.get("kv_kept_bytes") for r in rs), _mean(r.get("kv_full_bytes") for r in rs)
        ratio = kept / full if kept is not None and full else None
        dev, host = _mean(r.get("kv_device_bytes") for r in rs), _mean(r.get("kv_host_bytes") for r in rs)
        lines.append("| " + " | ".join([
            task, str(length), method, budget, _fmt(_mean(r.get("score") for r in rs)),
            _fmt(_mean(r.get("ppl") for r in rs)), _fmt(_mean(r.get("prompt_tokens") for r in rs), 0),
            _fmt(dev * MiB if dev is not None else None), _fmt(host * MiB if host is not None else None),
            _fmt(ratio), _fmt(_mean(r.get("prefill_s") for r in rs)),
            _fmt(_mean(r.get("decode_ms_per_token") for r in rs)), str(sum(r.get("n_samples", 0) for r in rs)),
        ]) + " |")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines.append("")
        lines.append(f"{len(errors)} cell(s) failed:")
        lines.extend(f"- `{r['key']}`: {r['error']}" for r in errors)
    return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def plot_niah_heatmaps(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in _ok(rows) if r["task"] == "niah"]
    paths = []
    for method in sorted({r["method"] for r in ok}):
        mr = [r for r in ok if r["method"] == method]
        budgets = sorted({r["budget"] for r in mr}, key=_budget_sort_key)
        lengths = sorted({r["length"] for r in mr})
        depths = sorted({s["depth"] for r in mr for s in r.get("samples", []) if "depth" in s})
        if not depths:
            continue
        fig, axes = plt.subplots(1, len(budgets), figsize=(2.0 + (0.8 * len(lengths) + 0.6) * len(budgets), 3.6),
                                 squeeze=False)
        for bi, (ax, b) in enumerate(zip(axes[0], budgets)):
            acc = np.full((len(depths), len(lengths)), np.nan)
            for j, L in enumerate(lengths):
                for i, d in enumerate(depths):
                    v = _mean(s["score"] for r in mr if r["budget"] == b and r["length"] == L
                              for s in r.get("samples", []) if s.get("depth") == d)
                    if v is not None:
                        acc[i, j] = v
            im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths] if bi == 0 else [])
            ax.set_xlabel("context tokens")
            ax.set_title(f"budget {b}")
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    if not np.isnan(acc[i, j]):
                        ax.text(j, i, f"{acc[i, j]:.1f}", ha="center", va="center", fontsize=7)
        axes[0][0].set_ylabel("needle depth")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
        fig.suptitle(f"NIAH: {method}", y=1.03)
        p = out / f"niah_heatmap_{_safe(method)}.png"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


def plot_score_vs_budget(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """One figure per task: x = budget (ratios and token counts on separate panels)."""
    import matplotlib.pyplot as plt

    ok = _ok(rows)
    paths = []
    for task in sorted({r["task"] for r in ok}):
        tr = [r for r in ok if r["task"] == task]
        kinds = [k for k in ("ratio", "tokens") if any(r.get("budget_kind") == k for r in tr)]
        if not kinds:
            continue
        fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.8), squeeze=False)
        full_rows = [r for r in tr if r["budget"] == FULL]
        for ax, kind in zip(axes[0], kinds):
            for method in sorted({r["method"] for r in tr if r.get("budget_kind") == kind}):
                pts = defaultdict(list)
                for r in tr:
                    if r["method"] == method and r.get("budget_kind") == kind:
                        pts[float(r["budget_value"])].append(_metric(r))
                xs = sorted(pts)
                ax.plot(xs, [_mean(pts[x]) for x in xs], marker="o", label=method)
            for fm in sorted({r["method"] for r in full_rows}):
                v = _mean(_metric(r) for r in full_rows if r["method"] == fm)
                if v is not None:
                    ax.axhline(v, linestyle="--", color="black" if ":" not in fm else "gray", label=f"{fm} (full cache)")
            ax.set_xlabel("KV budget (ratio of prompt)" if kind == "ratio" else "KV budget (tokens per head)")
            if kind == "tokens":
                ax.set_xscale("log", base=2)
            ax.set_ylabel("perplexity" if task == "ppl" else "score")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.suptitle(f"{task}: {'perplexity' if task == 'ppl' else 'accuracy'} vs KV budget (mean over lengths)")
        p = out / f"{_safe(task)}_vs_budget.png"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


def plot_memory(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Grouped bars: device and host KV MiB per (method, budget) for one task (``niah`` when
    present) at the longest length measured."""
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in _ok(rows) if r.get("kv_device_bytes") is not None]
    if not ok:
        return None
    tasks = sorted({r["task"] for r in ok})
    task = "niah" if "niah" in tasks else tasks[0]
    ok = [r for r in ok if r["task"] == task]
    L = max(r["length"] for r in ok)
    lr = [r for r in ok if r["length"] == L]
    groups = sorted({(r["method"], r["budget"]) for r in lr}, key=lambda mb: (mb[0], _budget_sort_key(mb[1])))
    dev = [(_mean(r["kv_device_bytes"] for r in lr if (r["method"], r["budget"]) == g) or 0) * MiB for g in groups]
    host = [(_mean(r.get("kv_host_bytes") for r in lr if (r["method"], r["budget"]) == g) or 0) * MiB for g in groups]
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(groups) + 2), 4))
    ax.bar(x - 0.2, dev, 0.4, label="device KV")
    ax.bar(x + 0.2, host, 0.4, label="host KV (offloaded)")
    ax.set_xticks(x, [m if b == FULL else f"{m} {b}" for m, b in groups], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title(f"KV memory after prefill: {task}, {L}-token prompts")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    p = out / "memory.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return p


def write_report(results: str | Path | list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Write ``summary.md`` and the plots for the rows in ``results`` into ``out_dir``.
    Returns ``{"markdown": path, "plots": [paths], "rows": n}``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    rows = load_rows(results)
    if not rows:
        raise ValueError(f"no result rows in {results}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "summary.md"
    md.write_text(markdown_table(rows), encoding="utf-8")
    plots = plot_niah_heatmaps(rows, out) + plot_score_vs_budget(rows, out)
    mem = plot_memory(rows, out)
    if mem is not None:
        plots.append(mem)
    return {"markdown": md, "plots": plots, "rows": len(rows)}
