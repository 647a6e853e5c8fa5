"""Reports from result rows: a Markdown summary and PNG plots (matplotlib, Agg backend).

``summary.md``:

* a leaderboard: method x budget, the mean over tasks and lengths of the fraction of the full
  cache's score kept, with a 95% interval (stratified paired bootstrap), and the GPU KV MiB per
  sequence; the same for perplexity (full ppl / method ppl)
* per (task, length, method, budget): mean score with a 95% interval (Wilson for 0/1 scores,
  bootstrap for fractional scores and perplexity), the full-cache baseline on the same samples,
  the fraction kept, and ``n.s.`` where the paired difference to the full cache is not
  significant (paired bootstrap over the same sample ids)
* per task: method x budget mean score (perplexity for ``ppl``), then every cell with KV bytes and timings

Plots:

* ``accuracy_vs_kv.png``        mean accuracy over the tasks vs GPU KV MiB per sequence, a panel per length
* ``kept_vs_kv.png``            fraction of the full-cache score kept vs GPU KV MiB per sequence, a panel per length
* ``niah_heatmaps_<budget>.png`` NIAH accuracy over depth x length, a panel per method, at one budget
* ``niah_heatmap_<method>.png``  accuracy over depth x length, one panel per budget
* ``<task>_vs_budget.png``      score vs budget per method, the full cache as a dashed line
* ``memory.png``                device / host KV MiB per method and budget (niah, longest length)

Rows of the query-agnostic setting (``compress: "context"``, ``kvsift bench run --compress
context``) are never pooled with prompt-mode rows: their method label gets the suffix ``[ctx]``
(``kvzip [ctx]``, ``kvpress:kvzip [ctx]``, :func:`mode_rows`), and their baseline is the full cache
run in the same mode (``full [ctx]``).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kvsift.eval import stats
from kvsift.eval.runner import FULL, load_rows

MiB = 1 / 2**20
MIN_FULL = 0.1  # leaderboard: cells where the full cache scores below this tell nothing about kept fractions


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


CTX_SUFFIX = " [ctx]"  # method label of a row run with --compress context


def row_compress(row: dict[str, Any]) -> str:
    """``"context"`` or ``"prompt"`` (rows written before the option: prompt)."""
    return row.get("compress") or (row.get("settings") or {}).get("compress") or "prompt"


def mode_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with the method label of ``--compress context`` rows suffixed ``" [ctx]"`` (copies;
    prompt-mode rows as they are), so that no table, interval or plot pools the two settings."""
    out = []
    for r in rows:
        if row_compress(r) == "context" and not str(r.get("method", "")).endswith(CTX_SUFFIX):
            r = dict(r, method=r["method"] + CTX_SUFFIX)
        out.append(r)
    return out


def _split_mode(m: str) -> tuple[str, str]:
    return (m[:-len(CTX_SUFFIX)], CTX_SUFFIX) if m.endswith(CTX_SUFFIX) else (m, "")


def _is_full(m: str) -> bool:
    return _split_mode(m)[0].split(":")[-1] == FULL


def _method_key(m: str) -> tuple:
    m, mode = _split_mode(m)
    base = m.split(":")[-1]
    return (":" in m, m.split(":")[0] if ":" in m else "", mode, base != FULL, base)


def baseline_of(method: str) -> str:
    """The full-cache run a method is compared with: ``kvpress:full`` for ``kvpress:*``, else
    ``full``; in the same compress mode (``kvzip [ctx]`` -> ``full [ctx]``)."""
    m, mode = _split_mode(method)
    return (m.split(":", 1)[0] + ":" + FULL if ":" in m else FULL) + mode


def _sample_values(row: dict[str, Any]) -> dict[str, float]:
    """sample id -> the per-sample value: the score, or the NLL per token for ``ppl``."""
    out = {}
    for s in row.get("samples") or []:
        if row.get("task") == "ppl":
            if s.get("nll_sum") is not None and s.get("n_tokens"):
                out[s["sample_id"]] = s["nll_sum"] / s["n_tokens"]
        elif s.get("score") is not None:
            out[s["sample_id"]] = float(s["score"])
    return out


def _group_cells(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """(task, length, method, budget) -> pooled samples over seeds and the mean KV bytes."""
    cells: dict[tuple, dict[str, Any]] = {}
    for r in _ok(mode_rows(rows)):
        c = cells.setdefault((r["task"], r["length"], r["method"], r["budget"]),
                             {"values": {}, "rows": [], "budget_value": r.get("budget_value")})
        c["values"].update(_sample_values(r))
        c["rows"].append(r)
    for c in cells.values():
        rs = c["rows"]
        c["kv_device_bytes"] = _mean(r.get("kv_device_bytes") for r in rs)
        c["kv_host_bytes"] = _mean(r.get("kv_host_bytes") for r in rs)
    return cells


def paired_comparison(rows: list[dict[str, Any]], a: str, b: str, budget_a: str | None = None,
                      budget_b: str | None = None, n_boot: int = stats.N_BOOT,
                      seed: int = stats.SEED, perplexity: bool = False, tasks: Sequence[str] | None = None,
                      lengths: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Method ``a`` against method ``b`` (their ``method`` labels in the rows) on the samples both
    ran, one dict per (length, ``a``'s budget): ``n`` paired samples, ``a``/``b`` their mean
    scores, ``diff, lo, hi`` the mean of ``a - b`` over every task's samples with a stratified
    paired bootstrap interval (:func:`kvsift.eval.stats.pooled_paired_diff`), ``significant``, and
    ``tasks``: task -> ``(n, mean a, mean b)``. ``b``'s budget: ``budget_b``, else ``a``'s, else the
    only one ``b`` ran for that task and length (its full cache: ``full``). Where a budget of
    ``a`` has cells at more than one length, one more row (``length`` ``"all"``) pools them: every
    (task, length) cell a stratum of the bootstrap. Perplexity rows are left out (lower is better
    there), unless ``perplexity``: then only they, paired by sample on the NLL per token, and each
    dict also holds ``a_ppl``/``b_ppl`` (``exp`` of the mean NLL per token) and ``ratio, ratio_lo,
    ratio_hi`` (``exp`` of the difference and its interval: A's perplexity over B's). ``tasks`` /
    ``lengths``: only those cells (so the ``all`` row pools just them, e.g. 16k and 30k)."""
    cells = _group_cells([r for r in rows if (tasks is None or r.get("task") in tasks)
                          and (lengths is None or r.get("length") in lengths)])
    out = []
    pooled: dict[str, list[tuple[list[tuple[list[float], list[float]]], dict[str, tuple[int, float, float]]]]] = {}
    for length in sorted({k[1] for k in cells}):
        mine = [k for k in cells if k[1] == length and k[2] == a and (k[0] == "ppl") == perplexity
                and (budget_a is None or k[3] == budget_a)]
        for bud in sorted({k[3] for k in mine}, key=_budget_sort_key):
            pairs, tasks = [], {}
            for key in sorted(k for k in mine if k[3] == bud):
                task = key[0]
                theirs = [k for k in cells if k[:3] == (task, length, b)]
                want = budget_b if budget_b is not None else bud
                kb = next((k for k in theirs if k[3] == want), None)
                if kb is None and budget_b is None and len(theirs) == 1:
                    kb = theirs[0]
                if kb is None:
                    continue
                va, vb = cells[key]["values"], cells[kb]["values"]
                ids = sorted(set(va) & set(vb), key=str)
                if not ids:
                    continue
                xa, xb = [va[i] for i in ids], [vb[i] for i in ids]
                pairs.append((xa, xb))
                tasks[task] = (len(ids), sum(xa) / len(ids), sum(xb) / len(ids))
            if not pairs:
                continue
            out.append(_paired_row(length, bud, pairs, tasks, n_boot, seed))
            pooled.setdefault(bud, []).append((pairs, tasks))
    for bud, parts in pooled.items():   # more than one length: every length's samples, each cell a stratum
        if len(parts) > 1:
            pairs = [p for ps, _ in parts for p in ps]
            tasks = {}
            for _, ts in parts:
                for t, (n, ma, mb) in ts.items():
                    n0, sa, sb = tasks.get(t, (0, 0.0, 0.0))
                    tasks[t] = (n0 + n, sa + n * ma, sb + n * mb)
            tasks = {t: (n, sa / n, sb / n) for t, (n, sa, sb) in tasks.items()}
            out.append(_paired_row("all", bud, pairs, tasks, n_boot, seed))
    return out


def _paired_row(length, bud: str, pairs: list[tuple[list[float], list[float]]],
                tasks: dict[str, tuple[int, float, float]], n_boot: int, seed: int) -> dict[str, Any]:
    d = stats.pooled_paired_diff(pairs, n_boot, seed)
    n = d["n"]
    out = {"length": length, "budget": bud, "n": n,
           "a": sum(sum(x) for x, _ in pairs) / n, "b": sum(sum(y) for _, y in pairs) / n,
           "diff": d["diff"], "lo": d["lo"], "hi": d["hi"], "significant": d["significant"], "tasks": tasks}
    if set(tasks) == {"ppl"}:   # values are NLL per token: perplexities and their ratio
        out.update(a_ppl=math.exp(out["a"]), b_ppl=math.exp(out["b"]), ratio=math.exp(d["diff"]),
                   ratio_lo=math.exp(d["lo"]), ratio_hi=math.exp(d["hi"]))
    return out


def comparison_markdown(a: str, b: str, comp: list[dict[str, Any]]) -> str:
    """:func:`paired_comparison`'s rows as a Markdown table (scores and differences in points)."""
    tasks = sorted({t for r in comp for t in r["tasks"]})
    head = ["length", "A's budget", "paired n", *tasks, "A", "B", "A - B [95%]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in comp:
        cells = [f"{100 * r['tasks'][t][1]:.1f} ({100 * r['tasks'][t][2]:.1f})" if t in r["tasks"] else "-"
                 for t in tasks]
        sig = "" if r["significant"] else " n.s."
        lines.append("| " + " | ".join([str(r["length"]), str(r["budget"]), str(r["n"]), *cells,
                                         f"{100 * r['a']:.1f}", f"{100 * r['b']:.1f}",
                                         f"{100 * r['diff']:+.1f} [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]{sig}"])
                     + " |")
    lines.append("")
    lines.append(f"A = `{a}`, B = `{b}`. Task cells: A (B), mean scores in points on the paired samples; "
                 f"A - B over all of them, stratified paired bootstrap (n.s.: the interval holds 0).")
    return "\n".join(lines)


def perplexity_markdown(a: str, b: str, comp: list[dict[str, Any]]) -> str:
    """:func:`paired_comparison`'s perplexity rows (``perplexity=True``) as a Markdown table."""
    lines = ["| length | A's budget | paired n | A perplexity | B perplexity | A / B [95%] |", "|" + "---|" * 6]
    for r in comp:
        sig = "" if r["significant"] else " n.s."
        lines.append(f"| {r['length']} | {r['budget']} | {r['n']} | {r['a_ppl']:.3f} | {r['b_ppl']:.3f} | "
                     f"{r['ratio']:.3f} [{r['ratio_lo']:.3f}, {r['ratio_hi']:.3f}]{sig} |")
    lines.append("")
    lines.append(f"A = `{a}`, B = `{b}`, on the perplexity task: `exp` of the mean NLL per token over the "
                 f"paired samples; A / B from the mean per-sample difference of NLL per token, stratified "
                 f"paired bootstrap (n.s.: the interval holds 1; below 1: A predicts the text better).")
    return "\n".join(lines)


KV_TOLERANCE = 0.02   # a peer's GPU KV counts as "no more" within 2% (rounding, a method's small state)


def vs_peer_at_kv(rows: list[dict[str, Any]], peer: str = "kvpress", tolerance: float = KV_TOLERANCE,
                  n_boot: int = stats.N_BOOT, seed: int = stats.SEED, lengths: Sequence[int] | None = None,
                  budgets: Sequence[str] | None = None, pick: str = "cell") -> list[dict[str, Any]]:
    """Each kvsift method and budget against the peer's best at no more GPU KV bytes, one dict per
    (method, budget) that has such a comparison.

    Per (task, length, compress mode) cell where both ran: the peer's eligible entries are its
    presses and budgets (``<peer>:*`` rows, its full cache included) whose mean ``kv_device_bytes``
    per sequence is at most the kvsift cell's times ``1 + tolerance``; the best is the one with
    the highest mean score in that cell (chosen per cell, after the fact: a bias in the peer's
    favour). The kvsift cell's samples are paired with the best's by sample id, and the cells
    pooled: ``diff, lo, hi, significant`` the mean of kvsift - peer over every paired sample
    (stratified paired bootstrap, :func:`kvsift.eval.stats.pooled_paired_diff`); ``ours`` and
    ``theirs`` the two means; ``cells`` the cells compared, ``no_peer`` those where the peer had no
    entry within the bytes, and ``best`` the peer's winners with how many cells each won.
    Perplexity cells are left out. The full caches are not compared (``full`` rows). ``lengths``
    and ``budgets``: only these prompt lengths, and only these budgets of kvsift's entries (the
    peer's entries at any budget stay eligible). ``pick="press"``: instead of a winner per cell,
    the peer's one best entry (press and budget) over the method's cells, as a user would pick one
    press: among the entries eligible in the most cells, the one with the highest mean over them;
    cells where it is not eligible count in ``no_peer``, and ``unmeasured_larger`` lists the peer's
    entries that hold more GPU KV than the chosen one (within the bytes) but lack some of the cells
    (their larger budget may score higher once measured; always empty with ``pick="cell"``)."""
    if pick not in ("cell", "press"):
        raise ValueError(f"pick must be 'cell' or 'press', got {pick!r}")
    cells = {k: v for k, v in _group_cells(rows).items() if lengths is None or k[1] in lengths}
    prefix = peer + ":"
    by_cell: dict[tuple, list[tuple]] = defaultdict(list)   # (task, length, mode) -> the peer's cell keys
    for k in cells:
        m, mode = _split_mode(k[2])
        if m.startswith(prefix) and k[0] != "ppl":
            by_cell[(k[0], k[1], mode)].append(k)
    out = []
    groups: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    for k in cells:
        if (k[0] != "ppl" and ":" not in _split_mode(k[2])[0] and not _is_full(k[2])
                and (budgets is None or k[3] in budgets)):
            groups[(k[2], k[3])].append(k)
    for (method, budget), keys in sorted(groups.items(), key=lambda kv: (_method_key(kv[0][0]),
                                                                           _budget_sort_key(kv[0][1]))):
        pairs, best, no_peer, larger = [], defaultdict(int), 0, []
        per_cell: list[tuple[tuple, list[tuple]]] = []
        for key in sorted(keys):
            theirs = by_cell.get((key[0], key[1], _split_mode(method)[1]))
            if not theirs:
                continue
            cap = cells[key]["kv_device_bytes"]
            per_cell.append((key, [k for k in theirs if cap is not None and cells[k]["kv_device_bytes"] is not None
                                   and cells[k]["kv_device_bytes"] <= cap * (1 + tolerance)]))
        chosen = None
        if pick == "press":   # one entry (press, budget) for every cell: most cells, then the best mean
            cover: dict[tuple[str, str], list[tuple]] = defaultdict(list)
            for _, eligible in per_cell:
                for k in eligible:
                    cover[(k[2], k[3])].append(k)
            if cover:
                most = max(len(v) for v in cover.values())
                chosen = max((e for e, v in cover.items() if len(v) == most), key=lambda e: (
                    _mean(x for k in cover[e] for x in cells[k]["values"].values()) or 0.0, e))
                kv = {e: _mean(cells[k]["kv_device_bytes"] for k in v) or 0.0 for e, v in cover.items()}
                # entries holding more bytes than the chosen one but measured on fewer cells: a
                # larger budget usually scores higher, so the comparison may move once they are run
                larger = sorted(f"{e[0][len(prefix):]}@{e[1]}" for e, v in cover.items()
                                if len(v) < len(per_cell) and kv[e] > kv[chosen] * (1 + tolerance))
        for key, eligible in per_cell:
            ours = cells[key]
            if chosen is not None:
                eligible = [k for k in eligible if (k[2], k[3]) == chosen]
            if not eligible:
                no_peer += 1
                continue
            win = max(eligible, key=lambda k: (_mean(cells[k]["values"].values()) or 0.0, k[2], k[3]))
            ids = sorted(set(ours["values"]) & set(cells[win]["values"]), key=str)
            if not ids:
                continue
            pairs.append(([ours["values"][i] for i in ids], [cells[win]["values"][i] for i in ids]))
            best[f"{win[2][len(prefix):]}@{win[3]}"] += 1
        if not pairs and not no_peer:
            continue
        d: dict[str, Any] = {"method": method, "budget": budget, "cells": len(pairs), "no_peer": no_peer,
                             "best": dict(sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))),
                             "unmeasured_larger": larger}
        if pairs:
            p = _paired_row("all", budget, pairs, {}, n_boot, seed)
            d.update(n=p["n"], ours=p["a"], theirs=p["b"], diff=p["diff"], lo=p["lo"], hi=p["hi"],
                     significant=p["significant"])
        out.append(d)
    return out


def vs_peer_markdown(comp: list[dict[str, Any]], peer: str = "kvpress") -> str:
    """:func:`vs_peer_at_kv` as a Markdown section (empty when there is nothing to compare)."""
    if not comp:
        return ""
    lines = [f"### Against {peer}'s best at no more GPU KV bytes", "",
             f"Per (task, length) cell, {peer}'s best-scoring press and budget among those whose GPU KV per "
             f"sequence is at most this entry's (+{100 * KV_TOLERANCE:g}%), chosen per cell after the fact (a bias "
             f"in {peer}'s favour); the samples paired by id and pooled over the cells, stratified paired "
             f"bootstrap. Scores in points; `above` / `below`: the 95% interval of the difference excludes 0; "
             f"`n.s.`: it does not. `no {peer} entry`: cells where every press held more GPU KV than this entry.",
             "", f"| method | budget | cells | paired n | kvsift | {peer} best | kvsift - {peer} [95%] | verdict | "
                 f"{peer}'s best (cells won) | no {peer} entry |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d in comp:
        if d["cells"]:
            verdict = ("above" if d["diff"] > 0 else "below") if d["significant"] else "n.s."
            nums = [str(d["n"]), f"{100 * d['ours']:.1f}", f"{100 * d['theirs']:.1f}",
                    f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]", verdict]
        else:
            nums = ["-", "-", "-", "-", "-"]
        won = ", ".join(f"{k} ({v})" for k, v in d["best"].items()) or "-"
        lines.append("| " + " | ".join([d["method"], d["budget"], str(d["cells"]), *nums, won,
                                         str(d["no_peer"])]) + " |")
    return "\n".join(lines) + "\n"


def cell_stats(rows: list[dict[str, Any]], n_boot: int = stats.N_BOOT, seed: int = stats.SEED) -> list[dict[str, Any]]:
    """One dict per (task, length, method, budget): ``n, value, lo, hi, kind`` (the mean score, or
    the perplexity for ``ppl``, with its 95% interval), and against the full-cache baseline on the
    samples both ran (``paired_n``): ``full, full_lo, full_hi, kept, kept_lo, kept_hi, diff,
    diff_lo, diff_hi, significant`` (None when there is no baseline)."""
    cells = _group_cells(rows)
    out = []
    for (task, length, method, budget), c in cells.items():
        vals = c["values"]
        ppl = task == "ppl"
        d: dict[str, Any] = {"task": task, "length": length, "method": method, "budget": budget,
                             "budget_value": c["budget_value"], "n": len(vals), "baseline": None,
                             "kv_device_bytes": c["kv_device_bytes"], "kv_host_bytes": c["kv_host_bytes"],
                             "higher_is_better": not ppl}
        if not vals:
            continue
        xs = list(vals.values())
        if ppl:
            d["value"] = float(stats.STATS["exp_mean"](np.asarray(xs)))
            d["lo"], d["hi"] = stats.bootstrap_ci(xs, "exp_mean", n_boot, seed)
            d["kind"] = "bootstrap"
        else:
            d["value"], d["lo"], d["hi"], d["kind"] = stats.mean_ci(xs, n_boot, seed)
        base = baseline_of(method)
        if base not in {m for (t, L, m, b) in cells if t == task and L == length}:
            base = FULL + _split_mode(method)[1]  # e.g. kvpress rows without kvpress:full: kvsift's full
        bc = cells.get((task, length, base, FULL))
        if bc is not None and (method, budget) != (base, FULL):
            ids = sorted(set(vals) & set(bc["values"]))
            if ids:
                m_xs = [vals[i] for i in ids]
                f_xs = [bc["values"][i] for i in ids]
                st = "exp_mean" if ppl else "mean"
                f = stats.STATS[st]
                full_v = float(f(np.asarray(f_xs)))
                if ppl:
                    flo, fhi = stats.bootstrap_ci(f_xs, st, n_boot, seed)
                else:
                    _, flo, fhi, _ = stats.mean_ci(f_xs, n_boot, seed)
                kept, klo, khi = stats.kept_fraction(m_xs, f_xs, st, not ppl, n_boot, seed)
                pb = stats.paired_bootstrap(m_xs, f_xs, st, n_boot, seed)
                d.update(baseline=base, paired_n=len(ids), full=full_v, full_lo=flo, full_hi=fhi, kept=kept,
                         kept_lo=klo, kept_hi=khi, diff=pb["diff"], diff_lo=pb["lo"], diff_hi=pb["hi"],
                         significant=pb["significant"], method_values=m_xs, full_values=f_xs)
        out.append(d)
    out.sort(key=lambda d: (d["task"], d["length"], _method_key(d["method"]), _budget_sort_key(d["budget"])))
    return out


def _pooled_kept(ds: list[dict[str, Any]], ppl: bool = False, n_boot: int = stats.N_BOOT,
                 seed: int = stats.SEED) -> dict[str, Any]:
    """The fraction of the full score kept pooled over the cells ``ds`` (:func:`cell_stats` dicts with
    a baseline): ``value, lo, hi`` (stratified paired bootstrap) and ``cells``."""
    return stats.pooled_kept_fraction([(d["method_values"], d["full_values"]) for d in ds],
                                      "exp_mean" if ppl else "mean", not ppl, n_boot, seed)


def _scored_cells(cstats: list[dict[str, Any]], min_full: float) -> list[dict[str, Any]]:
    """The accuracy cells with a full-cache baseline scoring at least ``min_full`` (below it there
    is nothing to keep)."""
    return [d for d in cstats if d["task"] != "ppl" and d.get("baseline") and d["full"] >= min_full]


def _full_cells(cstats: list[dict[str, Any]], full: str, min_full: float) -> set[tuple[str, int]]:
    """The (task, length) accuracy cells the full-cache run ``full`` has, scoring at least ``min_full``."""
    return {(d["task"], d["length"]) for d in cstats if d["method"] == full and d["budget"] == FULL
            and d["task"] != "ppl" and d["value"] >= min_full}


def leaderboard(cstats: list[dict[str, Any]], ppl: bool = False, min_full: float = MIN_FULL,
                n_boot: int = stats.N_BOOT, seed: int = stats.SEED) -> dict[tuple[str, str], dict[str, Any]]:
    """(method, budget) -> the mean over tasks and lengths of the fraction of the full score kept
    (``value, lo, hi``: stratified paired bootstrap), ``cells`` used and ``left_out`` (cells whose
    full-cache score is below ``min_full``: nothing to keep). ``ppl=True``: the perplexity task
    alone (fraction = full ppl / method ppl)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for d in cstats:
        if d.get("baseline") is None or (d["task"] == "ppl") != ppl:
            continue
        groups[(d["method"], d["budget"])].append(d)
    out = {}
    for key, ds in groups.items():
        use = [d for d in ds if ppl or d["full"] >= min_full]
        if not use:
            out[key] = {"value": None, "lo": None, "hi": None, "cells": 0, "left_out": len(ds)}
            continue
        res = _pooled_kept(use, ppl, n_boot, seed)
        res["left_out"] = len(ds) - len(use)
        out[key] = res
    return out


def _ci(v: float | None, lo: float | None, hi: float | None, digits: int = 2) -> str:
    if v is None or v != v:
        return "-"
    if lo is None or hi is None or lo != lo:
        return _fmt(v, digits)
    return f"{_fmt(v, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def leaderboard_markdown(rows: list[dict[str, Any]], cstats: list[dict[str, Any]] | None = None) -> str:
    """The leaderboard section: fraction of the full score kept (accuracy tasks, then perplexity)
    per method and budget, and the GPU KV MiB per sequence."""
    cstats = cell_stats(rows) if cstats is None else cstats
    lines: list[str] = []
    for ppl in (False, True):
        lb = leaderboard(cstats, ppl=ppl)
        if not lb:
            continue
        budgets = sorted({b for _, b in lb}, key=_budget_sort_key)
        methods = sorted({m for m, _ in lb}, key=_method_key)
        scope = [d for d in cstats if d.get("baseline") and (d["task"] == "ppl") == ppl]
        tasks = sorted({d["task"] for d in scope})
        lengths = sorted({d["length"] for d in scope})
        if ppl:
            lines.append("### Leaderboard: perplexity kept (full-cache ppl / method ppl, 1 = as good as full)")
        else:
            lines.append("### Leaderboard: fraction of the full-cache score kept")
        lines.append("")
        left = sum(v["left_out"] for v in lb.values())
        ratio = "full-cache ppl / method ppl" if ppl else "method score / full-cache score"
        most = max(v["cells"] for v in lb.values())
        lines.append(f"Mean over tasks ({', '.join(tasks)}) and lengths ({', '.join(map(str, lengths))}) of "
                     f"{ratio} on the same samples; 95% interval of a stratified paired bootstrap in brackets."
                     + ("" if ppl else f" Cells where the full cache scores below {MIN_FULL:g} are left out "
                                       f"({left} cell(s)).")
                     + f" `(n/{most})`: an entry over fewer cells than the most any entry has (not every task and "
                       f"length measured yet), so not comparable with the others as it stands.")
        lines.append("")
        lines += _method_budget_table(methods, budgets, lambda m, b: (
            _ci(v["value"], v["lo"], v["hi"]) + (f" ({v['cells']}/{most})" if v["cells"] < most else "")
            if (v := lb.get((m, b))) else ""))
    # GPU KV per sequence, at the longest length measured
    kv = [d for d in cstats if d.get("kv_device_bytes") is not None]
    if kv:
        L = max(d["length"] for d in kv)
        at = [d for d in kv if d["length"] == L]
        budgets = sorted({d["budget"] for d in at}, key=_budget_sort_key)
        methods = sorted({d["method"] for d in at}, key=_method_key)
        lines.append(f"### GPU KV MiB per sequence after prefill ({L}-token prompts, mean over tasks)")
        lines.append("")
        lines += _method_budget_table(methods, budgets, lambda m, b: (
            _fmt(v * MiB) if (v := _mean(d["kv_device_bytes"] for d in at
                                         if d["method"] == m and d["budget"] == b)) is not None else ""))
    return "\n".join(lines) + "\n"


BAR = {"budget": "0.05", "lengths": (16384, 30000), "kept": 0.95}
"""Issue #15's bar: at least this fraction of the full-cache score kept at this budget, at these lengths."""


def bar_rows(cstats: list[dict[str, Any]], budget: str = BAR["budget"], lengths=BAR["lengths"],
             kept: float = BAR["kept"], min_full: float = MIN_FULL,
             rows: list[dict[str, Any]] | None = None, peer: str = "kvpress") -> list[dict[str, Any]]:
    """Where each method stands against a bar (a fraction ``kept`` of the full-cache score at
    ``budget``, at ``lengths``): per method (accuracy tasks, cells where its full cache scores at
    least ``min_full``), the pooled fraction kept at each length and over all of them, with its
    stratified paired bootstrap interval and the cells behind it, and a verdict: ``above`` (the
    interval's low end at or over the bar), ``meets`` (the value at or over it), ``below`` (the
    value under it), ``clearly below`` (the interval's high end under it); ``incomplete`` where the
    method lacks a (task, length) cell its full cache has.

    The bar's second half, with ``rows`` holding the peer's (``<peer>:*``) rows: ``peer`` is the
    method's :func:`vs_peer_at_kv` entry against the peer's best press (``pick="press"``: one press
    and budget for all the bar's cells, at no more GPU KV bytes) at the bar's budget and lengths
    (None where the peer ran none of them), ``peer_cell`` the stricter per-cell winner's;
    ``peer_verdict`` ``above`` / ``n.s.`` / ``below`` (the paired difference's interval against the
    best press), ``no <peer> entry`` where every press held more GPU KV, ``no <peer> rows``; and
    ``bar`` the whole bar: ``met`` (kept ``above`` or ``meets``, and significantly above the peer),
    ``kept, not above <peer>``, ``not met`` (kept ``below`` or ``clearly below``) or ``open``
    (incomplete, a bar cell where the best press has no entry at those bytes, or a larger entry of
    the peer within the bytes not measured on every cell). Peer methods themselves get no second half."""
    cs = [d for d in _scored_cells(cstats, min_full) if d["length"] in lengths]
    vs = vs_cell = None
    if rows is not None and any(r["method"].startswith(peer + ":") for r in rows):
        vs = {d["method"]: d for d in vs_peer_at_kv(rows, peer, lengths=lengths, budgets=[budget], pick="press")}
        vs_cell = {d["method"]: d for d in vs_peer_at_kv(rows, peer, lengths=lengths, budgets=[budget])}
    out = []
    for m in sorted({d["method"] for d in cs if d["budget"] == budget}, key=_method_key):
        ds = [d for d in cs if d["method"] == m and d["budget"] == budget]
        row: dict[str, Any] = {"method": m}
        for L in (*lengths, "all"):
            at = [d for d in ds if L == "all" or d["length"] == L]
            row[L] = _pooled_kept(at) if at else {"value": None, "lo": None, "hi": None, "cells": 0}
        want = {c for c in _full_cells(cstats, baseline_of(m), min_full) if c[1] in lengths}
        row["missing"] = len(want - {(d["task"], d["length"]) for d in ds})
        v = row["all"]
        if row["missing"]:
            row["verdict"] = "incomplete"
        elif v["lo"] is not None and v["lo"] >= kept:
            row["verdict"] = "above"
        elif v["value"] >= kept:
            row["verdict"] = "meets"
        elif v["hi"] is not None and v["hi"] < kept:
            row["verdict"] = "clearly below"
        else:
            row["verdict"] = "below"
        if vs is not None and not m.startswith(peer + ":"):
            d = vs.get(m)
            row["peer"], row["peer_cell"] = d, vs_cell.get(m)
            if d is None or (not d["cells"] and not d["no_peer"]):
                row["peer_verdict"] = f"no {peer} rows"
            elif not d["cells"]:
                row["peer_verdict"] = f"no {peer} entry"
            else:
                row["peer_verdict"] = ("above" if d["diff"] > 0 else "below") if d["significant"] else "n.s."
            if row["verdict"] in ("below", "clearly below"):
                row["bar"] = "not met"
            elif (row["verdict"] == "incomplete" or row["peer_verdict"] not in ("above", "n.s.", "below")
                  or d["no_peer"] or d["unmeasured_larger"]):   # the comparison is not whole yet
                row["bar"] = "open"
            else:
                row["bar"] = "met" if row["peer_verdict"] == "above" else f"kept, not above {peer}"
        out.append(row)
    return out


def bar_markdown(cstats: list[dict[str, Any]], budget: str = BAR["budget"], lengths=BAR["lengths"],
                 kept: float = BAR["kept"], rows: list[dict[str, Any]] | None = None, peer: str = "kvpress") -> str:
    """The bar's table (:func:`bar_rows`) and the full cache's own scores per task and length there;
    with the peer's rows among ``rows``, the bar's second half (against the peer's best at no more
    GPU KV bytes, at the bar's budget and lengths: its best press, and the per-cell winner) and the
    whole bar's verdict in three more columns."""
    table = bar_rows(cstats, budget, lengths, kept, rows=rows, peer=peer)
    if not table:
        return ""
    second = any("bar" in r for r in table)
    lens = " | ".join(f"{L} kept [95% CI] (cells)" for L in lengths)
    lines = [f"### The bar: {kept:g} of the full-cache score kept at {budget}, at {', '.join(map(str, lengths))} tokens",
             "",
             "Per method, the fraction kept pooled over the accuracy tasks at each length and over all of them "
             "(stratified paired bootstrap); `above`: the interval's low end at or over the bar, `meets`: the value "
             "at or over it, `below` / `clearly below`: the value / the interval's high end under it, `incomplete`: "
             "cells the full cache has are not measured yet (the value so far is shown)."
             + (f" The bar's second half, `vs {peer}'s best press`: kvsift's score minus that of {peer}'s one best "
                f"press and budget among those holding no more GPU KV bytes (the best mean over the bar's cells), "
                f"in points over those cells with its 95% interval (`above` / `below`: the interval excludes 0; "
                f"`n.s.`: it does not), the press beside it; `per-cell best`: the same against a winner chosen per "
                f"cell after the fact (the next table's rule, a bias in {peer}'s favour); `bar`: `met` where the "
                f"fraction kept is `above` or `meets` and the method is significantly above {peer}'s best press, "
                f"`open` where a cell or the comparison is missing (`n without`: bar cells where that press has no "
                f"entry at those bytes; `not all run`: {peer}'s entries (press and budget) within the bytes, larger than "
                f"the best press, not measured on every bar cell yet)." if second else ""), "",
             f"| method | {lens} | all [95% CI] | verdict |"
             + (f" vs {peer}'s best press (points, cells) | per-cell best | bar |" if second else ""),
             "|---|" + "---|" * (len(lengths) + 2 + 3 * second)]
    for r in table:
        cells = [f"{_ci(r[L]['value'], r[L]['lo'], r[L]['hi'])} ({r[L]['cells']})" if r[L]["cells"] else "-"
                 for L in lengths]
        verdict = r["verdict"] + (f" ({r['missing']} cell{'s' * (r['missing'] > 1)} missing)" if r["missing"] else "")
        extra = ""
        if second:
            d, dc = r.get("peer"), r.get("peer_cell")
            diff = (lambda x: f"{100 * x['diff']:+.1f} [{100 * x['lo']:+.1f}, {100 * x['hi']:+.1f}]")  # noqa: E731
            if "bar" not in r:       # the peer's own presses
                extra = "  |  |  |"
            elif d and d["cells"]:
                gap = f", {d['no_peer']} without" if d["no_peer"] else ""
                n_un = len(d["unmeasured_larger"])
                run = (f"; not all run: {d['unmeasured_larger'][0]}" if n_un == 1
                       else f"; {n_un} larger not all run" if n_un else "")
                extra = (f" {diff(d)} {r['peer_verdict']} ({d['cells']}{gap}; {next(iter(d['best']))}{run}) | "
                         + (f"{diff(dc)} ({dc['cells']})" if dc and dc["cells"] else "-") + f" | {r['bar']} |")
            else:
                extra = f" {r['peer_verdict']} | - | {r['bar']} |"
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {_ci(r['all']['value'], r['all']['lo'], r['all']['hi'])}"
                     f" | {verdict} |" + extra)
    table = _baseline_table(cstats, FULL, lengths, ppl=False)
    if table:
        lines += ["", "Full-cache scores there (mean [95% CI], 30 samples a cell in the suite):", "", *table]
    return "\n".join(lines) + "\n"


def _baseline_table(cstats: list[dict[str, Any]], method: str, lengths=None, ppl: bool = True) -> list[str]:
    """Markdown lines of one full-cache run's own values, a row per length and a column per task:
    the mean score (3 digits) or, for ``ppl`` (with ``ppl=True``), the perplexity (2 digits), each
    with its 95% interval; ``lengths``: only these. [] when the run has no cell there."""
    cells = [d for d in cstats if d["method"] == method and d["budget"] == FULL and (ppl or d["task"] != "ppl")
             and (lengths is None or d["length"] in lengths)]
    if not cells:
        return []
    tasks = sorted({d["task"] for d in cells}, key=lambda t: (t == "ppl", t))
    lines = ["| length | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for L in sorted({d["length"] for d in cells}):
        by = {d["task"]: d for d in cells if d["length"] == L}
        lines.append(f"| {L} | " + " | ".join(_ci(by[t]["value"], by[t]["lo"], by[t]["hi"], 2 if t == "ppl" else 3)
                                            if t in by else "-" for t in tasks) + " |")
    return lines


def baselines_markdown(cstats: list[dict[str, Any]]) -> str:
    """Every full-cache run's own values per task and length (kvsift's ``full``, then a peer's
    ``kvpress:full``): the baselines the leaderboard's fractions are taken against. "" without one."""
    runs = sorted({d["method"] for d in cstats if d["budget"] == FULL and _is_full(d["method"])}, key=_method_key)
    if not runs:
        return ""
    lines = ["### Full-cache baselines per task and length", "",
             "The full cache's own mean score (`ppl`: perplexity, lower is better) per cell, with its 95% interval "
             "(Wilson for 0/1 scores, bootstrap otherwise); every fraction kept above is taken against these, on "
             "the same samples.", ""]
    for m in runs:
        lines += [f"`{m}`:", "", *_baseline_table(cstats, m), ""]
    return "\n".join(lines)


def intervals_markdown(cstats: list[dict[str, Any]]) -> str:
    """Per task: every (length, method, budget) with its 95% interval, the full cache on the same
    samples, the fraction kept and the paired significance."""
    lines: list[str] = []
    for task in sorted({d["task"] for d in cstats}):
        ppl = task == "ppl"
        lines.append(f"### {task}: {'perplexity' if ppl else 'mean score'} with 95% intervals "
                     f"({'bootstrap' if ppl else 'Wilson for 0/1 scores, bootstrap otherwise'})")
        lines.append("")
        what = "ppl" if ppl else "score"
        lines.append(f"| length | method | budget | n | {what} [95% CI] | full [95% CI] | kept [95% CI] | "
                     f"vs full | GPU KV MiB/seq |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for d in (d for d in cstats if d["task"] == task):
            digits = 2 if ppl else 3
            if d.get("baseline"):
                full = _ci(d["full"], d["full_lo"], d["full_hi"], digits)
                kept = _ci(d["kept"], d["kept_lo"], d["kept_hi"])
                if not d["significant"]:
                    sig = "n.s."
                else:
                    better = (d["diff"] > 0) == d["higher_is_better"]
                    sig = "better" if better else "worse"
            else:
                full = kept = sig = ""
            kvb = d.get("kv_device_bytes")
            lines.append("| " + " | ".join([
                str(d["length"]), d["method"], d["budget"], str(d["n"]), _ci(d["value"], d["lo"], d["hi"], digits),
                full, kept, sig, _fmt(kvb * MiB) if kvb is not None else "-"]) + " |")
        lines.append("")
    if cstats:
        lines.append("`n.s.`: the paired bootstrap interval of the difference to the full cache (same samples) "
                     "includes 0; `better`/`worse`: it does not.")
        lines.append("")
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Summary Markdown: per task a method x budget pivot (mean over lengths and seeds), then the
    per-cell detail table."""
    rows = mode_rows(rows)
    ok = _ok(rows)
    cstats = cell_stats(rows)
    peer = vs_peer_markdown(vs_peer_at_kv(rows))   # "" without kvpress rows
    bar = bar_markdown(cstats, rows=rows)
    base = baselines_markdown(cstats)
    lines: list[str] = [leaderboard_markdown(rows, cstats), *([base] if base else []), *([bar] if bar else []),
                        *([peer.rstrip("\n") + "\n"] if peer else []),
                        intervals_markdown(cstats), "### Mean score per task, method and budget", ""]
    tasks = sorted({r["task"] for r in ok})
    for task in tasks:
        tr = [r for r in ok if r["task"] == task]
        budgets = sorted({r["budget"] for r in tr}, key=_budget_sort_key)
        methods = sorted({r["method"] for r in tr}, key=_method_key)
        lengths = sorted({r["length"] for r in tr})
        what = "perplexity (lower is better)" if task == "ppl" else "mean score (higher is better)"
        lines.append(f"#### {task}: {what}, lengths {', '.join(map(str, lengths))}")
        lines.append("")
        lines += _method_budget_table(methods, budgets, lambda m, b: (
            _fmt(v) if (v := _mean(_metric(r) for r in tr
                                   if r["method"] == m and r["budget"] == b)) is not None else ""))
    lines.append("### All cells")
    lines.append("")
    lines.append("| task | length | method | budget | score | ppl | prompt tok | KV device MiB | KV host MiB | "
                 "KV kept/full | prefill s | decode ms/tok | steady ms/tok | n |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
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
            _fmt(_mean(r.get("decode_ms_per_token") for r in rs)), _fmt(_mean(r.get("steady_ms_per_token") for r in rs)),
            str(sum(r.get("n_samples", 0) for r in rs)),
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


def _method_budget_table(methods, budgets, cell) -> list[str]:
    """Markdown rows: one per method, one column per budget, ``cell(method, budget) -> str``; a
    blank line after."""
    out = ["| method | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
    out += [f"| {m} | " + " | ".join(cell(m, b) for b in budgets) + " |" for m in methods]
    return out + [""]


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">")


def method_styles(methods: Iterable[str]) -> dict[str, dict[str, Any]]:
    """A distinct matplotlib style per method label: ten colours times ten markers in the labels'
    sorted order; a peer's rows (``kvpress:*``) dashed. :func:`write_report` makes one map from all
    its rows and hands it to every plot, so a method looks the same in each."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    out = {}
    for k, m in enumerate(sorted(set(methods), key=_method_key)):
        out[m] = {"color": cmap(k % 10), "marker": _MARKERS[(k // 10) % len(_MARKERS)],
                  "linestyle": "--" if ":" in m else "-"}
    return out


def _figure_legend(axes, outside: bool = False) -> None:
    """One legend from every panel (a method may be plotted in some only): on the last panel, or
    (``outside``) right of the figure, where a long list covers no data."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            # a long label (a method with its options) shortened in the middle
            seen.setdefault(lab if len(lab) <= 48 else lab[:28] + "..." + lab[-17:], h)
    if seen and outside:
        axes[-1].figure.legend(list(seen.values()), list(seen), fontsize=7, loc="center left",
                               bbox_to_anchor=(1.0, 0.5))
    elif seen:
        axes[-1].legend(list(seen.values()), list(seen), fontsize=7, loc="best")


def plot_score_vs_budget(rows: list[dict[str, Any]], out: Path, styles: dict[str, dict] | None = None) -> list[Path]:
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
        style = styles or method_styles(r["method"] for r in tr)
        for ax, kind in zip(axes[0], kinds):
            for method in sorted({r["method"] for r in tr if r.get("budget_kind") == kind}):
                pts = defaultdict(list)
                for r in tr:
                    if r["method"] == method and r.get("budget_kind") == kind:
                        pts[float(r["budget_value"])].append(_metric(r))
                xs = sorted(pts)
                ax.plot(xs, [_mean(pts[x]) for x in xs], markersize=4, label=method, **style[method])
            for fm in sorted({r["method"] for r in full_rows}):
                v = _mean(_metric(r) for r in full_rows if r["method"] == fm)
                if v is not None:
                    ax.axhline(v, linestyle="--", color="black" if ":" not in fm else "gray", label=f"{fm} (full cache)")
            ax.set_xlabel("KV budget (ratio of prompt)" if kind == "ratio" else "KV budget (tokens per head)")
            if kind == "tokens":
                ax.set_xscale("log", base=2)
            ax.set_ylabel("perplexity" if task == "ppl" else "score")
            ax.grid(alpha=0.3)
        _figure_legend(axes[0], outside=True)
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


def _pick_budget(budgets: list[str], want: str | None) -> str | None:
    """``want`` if measured, else the ratio budget nearest 0.1 (else the first budget)."""
    if not budgets:
        return None
    if want is not None:
        w = str(want)
        for b in budgets:
            if b == w or _budget_sort_key(b) == _budget_sort_key(w):
                return b
        raise ValueError(f"no rows at budget {want!r}; measured: {', '.join(budgets)}")
    ratios = [b for b in budgets if _budget_sort_key(b)[0] == 0]
    return min(ratios, key=lambda b: abs(float(b) - 0.1)) if ratios else budgets[0]


def plot_niah_grid(rows: list[dict[str, Any]], out: Path, budget: str | None = None) -> Path | None:
    """NIAH accuracy over depth x length, one panel per method at one budget (the full cache first)."""
    import matplotlib.pyplot as plt

    ok = [r for r in _ok(rows) if r["task"] == "niah"]
    budgets = sorted({r["budget"] for r in ok if r["budget"] != FULL}, key=_budget_sort_key)
    b = _pick_budget(budgets, budget)
    if b is None:
        return None
    methods = sorted({r["method"] for r in ok if r["budget"] in (b, FULL)}, key=_method_key)
    lengths = sorted({r["length"] for r in ok})
    depths = sorted({s["depth"] for r in ok for s in r.get("samples", []) if "depth" in s})
    if not depths or not methods:
        return None
    cols = min(4, len(methods))
    nrows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(1.6 + (0.7 * len(lengths) + 0.9) * cols,
                                                   0.6 + (0.32 * len(depths) + 1.3) * nrows),
                             squeeze=False, layout="constrained")
    im = None
    for k, m in enumerate(methods):
        ax = axes[k // cols][k % cols]
        mb = FULL if _is_full(m) else b
        acc = np.full((len(depths), len(lengths)), np.nan)
        for j, L in enumerate(lengths):
            for i, d in enumerate(depths):
                v = _mean(s["score"] for r in ok if r["method"] == m and r["budget"] == mb and r["length"] == L
                          for s in r.get("samples", []) if s.get("depth") == d)
                if v is not None:
                    acc[i, j] = v
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45, fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths] if k % cols == 0 else [], fontsize=7)
        ax.set_title(m if mb == FULL else f"{m} @ {b}", fontsize=9)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(acc[i, j]):
                    ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=6)
    for k in range(len(methods), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="accuracy")
    fig.suptitle(f"NIAH accuracy (needle depth x context tokens), budget {b}")
    p = out / f"niah_heatmaps_{_safe(b)}.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return p


def plot_accuracy_vs_kv(rows: list[dict[str, Any]], out: Path, cstats: list[dict[str, Any]] | None = None,
                        styles: dict[str, dict] | None = None) -> Path | None:
    """Mean accuracy over the scored tasks vs GPU KV MiB per sequence, one panel per length; a line
    per method through its budgets, the full cache as a star."""
    import matplotlib.pyplot as plt

    cstats = cell_stats(rows) if cstats is None else cstats
    cs = [d for d in cstats if d["task"] != "ppl" and d.get("kv_device_bytes")]
    if not cs:
        return None
    lengths = sorted({d["length"] for d in cs})
    methods = sorted({d["method"] for d in cs}, key=_method_key)
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 3.8), squeeze=False, sharey=True)
    style = styles or method_styles(methods)
    for ax, L in zip(axes[0], lengths):
        at = [d for d in cs if d["length"] == L]
        n_tasks = len({d["task"] for d in at})
        for m in methods:
            pts = []
            for b in sorted({d["budget"] for d in at if d["method"] == m}, key=_budget_sort_key):
                ds = [d for d in at if d["method"] == m and d["budget"] == b]
                if len({d["task"] for d in ds}) < n_tasks:
                    continue  # mean over tasks only where every task ran
                pts.append((_mean(d["kv_device_bytes"] for d in ds) * MiB, _mean(d["value"] for d in ds)))
            if not pts:
                continue
            xs, ys = zip(*sorted(pts))
            if _is_full(m):
                ax.plot(xs, ys, marker="*", markersize=12, linestyle="none", color="black" if ":" not in m else "gray",
                        label=m)
            else:
                ax.plot(xs, ys, markersize=4, label=m, **style[m])
        _kv_axis(ax, f"{L} tokens ({n_tasks} tasks)")
    return _save_kv_figure(fig, axes, "mean score over tasks", "Accuracy vs GPU KV bytes (each point a budget)",
                           out / "accuracy_vs_kv.png")


def _kv_axis(ax, title: str) -> None:
    """A panel whose x axis is GPU KV MiB per sequence, log scale."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("GPU KV MiB per sequence (log)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _save_kv_figure(fig, axes, ylabel: str, title: str, path: Path) -> Path:
    """The y label, one legend right of the panels, the title; saved to ``path`` and closed."""
    import matplotlib.pyplot as plt

    axes[0][0].set_ylabel(ylabel)
    _figure_legend(axes[0], outside=True)
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def kept_points(cstats: list[dict[str, Any]], min_full: float = MIN_FULL, n_boot: int = 200
                ) -> dict[tuple[int, str], tuple[list[tuple], int]]:
    """(length, method) -> (points, tasks of the full cache at that length): each budget's point
    ``(GPU KV MiB per sequence, fraction of the full score kept, lo, hi, partial)`` in ascending
    MiB, the fraction pooled over the (task) cells the method has at that length (stratified paired
    bootstrap, ``n_boot`` replicates), cells where ``full`` scores below ``min_full`` left out;
    ``partial``: fewer tasks than the full cache ran there. Accuracy tasks only."""
    cs = [d for d in _scored_cells(cstats, min_full) if d.get("kv_device_bytes")]
    full_cells = _full_cells(cstats, FULL, min_full)
    out: dict[tuple[int, str], tuple[list[tuple], int]] = {}
    for L in sorted({d["length"] for d in cs}):
        at = [d for d in cs if d["length"] == L]
        n_tasks = sum(1 for _, length in full_cells if length == L)
        for m in sorted({d["method"] for d in at}, key=_method_key):
            pts = []
            for b in sorted({d["budget"] for d in at if d["method"] == m}, key=_budget_sort_key):
                ds = [d for d in at if d["method"] == m and d["budget"] == b]
                res = _pooled_kept(ds, n_boot=n_boot)
                if res["value"] == res["value"]:
                    pts.append((_mean(d["kv_device_bytes"] for d in ds) * MiB, res["value"], res["lo"], res["hi"],
                                len({d["task"] for d in ds}) < n_tasks))
            if pts:
                out[(L, m)] = (sorted(pts), n_tasks)
    return out


def plot_kept_vs_kv(rows: list[dict[str, Any]], out: Path, cstats: list[dict[str, Any]] | None = None,
                    min_full: float = MIN_FULL, styles: dict[str, dict] | None = None) -> Path | None:
    """The leaderboard's measure against memory: per length, each method's fraction of the
    full-cache score kept (mean over the (task) cells it has at that length, paired with ``full``
    on the same samples; cells where ``full`` scores below ``min_full`` left out) vs its GPU KV MiB
    per sequence, a line through its budgets, with the bootstrap interval as error bars. A hollow
    marker: a point over fewer tasks than the full cache ran at that length (not yet comparable).
    Unlike ``accuracy_vs_kv.png`` (raw scores, only where every task ran) it shows every method as
    the suite fills in."""
    import matplotlib.pyplot as plt

    points = kept_points(cell_stats(rows) if cstats is None else cstats, min_full)
    if not points:
        return None
    lengths = sorted({L for L, _ in points})
    style = styles or method_styles(m for _, m in points)
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 3.8), squeeze=False, sharey=True)
    for ax, L in zip(axes[0], lengths):
        at = sorted(((m, v) for (length, m), v in points.items() if length == L), key=lambda mv: _method_key(mv[0]))
        n_tasks = at[0][1][1]
        for m, (pts, _) in at:
            st = style[m]
            ax.plot([x for x, *_ in pts], [y for _, y, *_ in pts], markersize=4, linewidth=1, label=m, **st)
            for x, y, lo, hi, partial in pts:
                ax.errorbar([x], [y], yerr=[[max(0.0, y - lo)], [max(0.0, hi - y)]], color=st["color"],
                            linestyle="none", capsize=2, linewidth=0.8)
                if partial:
                    ax.plot([x], [y], marker=st["marker"], markersize=4, color=st["color"], markerfacecolor="white",
                            linestyle="none")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(0.95, color="gray", linewidth=0.8, linestyle=":")
        _kv_axis(ax, f"{L} tokens (full cache: {n_tasks} tasks)")
    return _save_kv_figure(fig, axes, "fraction of the full-cache score kept",
                           "Score kept vs GPU KV bytes (each point a budget; hollow: fewer tasks than full; dotted: 0.95)",
                           out / "kept_vs_kv.png")


def write_report(results: str | Path | list[str | Path], out_dir: str | Path,
                 heatmap_budget: str | None = None) -> dict[str, Any]:
    """Write ``summary.md`` and the plots for the rows in ``results`` into ``out_dir``.
    ``heatmap_budget``: the budget of the per-method NIAH heatmap grid (default: nearest 0.1).
    Returns ``{"markdown": path, "plots": [paths], "rows": n}``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    rows = mode_rows(load_rows(results))
    if not rows:
        raise ValueError(f"no result rows in {results}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "summary.md"
    md.write_text(markdown_table(rows), encoding="utf-8")
    styles = method_styles(r["method"] for r in rows)   # one look per method across the plots
    plots = plot_niah_heatmaps(rows, out) + plot_score_vs_budget(rows, out, styles)
    cstats = cell_stats(rows)
    for p in (plot_memory(rows, out), plot_accuracy_vs_kv(rows, out, cstats, styles),
              plot_kept_vs_kv(rows, out, cstats, styles=styles), plot_niah_grid(rows, out, heatmap_budget)):
        if p is not None:
            plots.append(p)
    return {"markdown": md, "plots": plots, "rows": len(rows)}
