"""Method groups for `bench/suite_h200.sh`'s parallel processes, balanced by the time the cells
still to run are expected to take, from the rows already measured.

    python3 bench/suite_groups.py --rows bench/results/standard_qwen2.5-coder-1.5b_h200.jsonl.gz \
        --processes 6 --lengths 30000 --budgets 0.05
    # -> e.g. "h2o;kvzip@niah kvzip@mk_niah;kvzip@vt full,snapkv,... ...": METHOD_GROUPS for the script

A cell's expected time comes from that method's measured cells of its task, scaled linearly by
prompt length (the method's cells of any task where it has none of that task; the median over all
methods where a method has none yet); a method's cells measured the way the suite runs now (prefix
sharing, grouped budgets) replace its older ones. The budgets of one method over one prompt set
(task and length) run as one *run* (grouped budgets; the prefix store keeps kvzip's reread scores
and h2o's for the next budget): its first budget pays what the prompt set costs the method (its
prefill or what reuses it, kvzip's reread passes, h2o's scores), each further one about
``EXTRA`` of that. So measured rows are read as runs (a method's cells of one prompt set written
one right after the other) and the remaining cells of a prompt set are costed as one run too: a
30k prompt set with one budget measured and three left costs its first-budget price again, not
three times the first cell's wall time. Methods go, the most
expensive first, to the process with the least work so far (longest-processing-time first), so a
slow method (kvzip's reread passes, h2o's scores) is not queued behind others while processes idle;
a method whose cells alone outlast a process's fair share is split by task (``method@task`` units).
A group is whole methods (``m1,m2``), then ``method@task`` units, ``;`` between them: the script
runs them one after the other in that process.
Cells already in the rows file are left out (not those whose row is an error: `bench run` retries
them); methods with nothing left are left out too.

``--by task``: with prefix sharing (``--share-prefix-gib``) a process prefills each prompt set once,
whatever the methods it then runs over it; method groups make every process prefill every prompt
set. So here the units are tasks, balanced the same way, and each process runs all the methods
over its tasks: ``m1,m2,...@t1,t2``, ordered by what they share (:func:`share_kind`): ``full``
first (its cells store the prefixes), the methods that share its plain prefixes, then those that
carry their own prefix state (h2o, expected_attention), then those that do not share; cheapest
first within each, so a process's store holds one kind of prefix at a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvsift.eval.labels import split_items  # noqa: E402
from kvsift.eval.runner import BenchConfig, cell_key, load_rows  # noqa: E402
from kvsift.eval.suites import get_suite  # noqa: E402


def _current(r: dict) -> bool:
    """A row measured the way the suite runs now: with prefix sharing (its settings record
    ``share_prefix_gib``; since part 7, and grouped budgets, not recorded, since part 13, both
    ``suite_h200.sh``'s defaults now)."""
    return bool((r.get("settings") or {}).get("share_prefix_gib"))


EXTRA = 0.2   # a further budget of a run, against its first (ppl at 16k: kvzip 47 s then 5-6 s, snapkv 18 s then 4-5 s)


def _stamp(r: dict) -> float | None:
    """A row's ``time`` (ISO, when its cell ended) as seconds, or None."""
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(r["time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def runs(rows: list[dict]) -> list[tuple[dict, int, float]]:
    """The rows as runs: ``(first row, cells, wall seconds in all)`` per run of one method over one
    prompt set (task, length) whose cells ended one right after the other (each within its own wall
    time plus a minute of the one before: grouped budgets end together, the rest one by one). A
    row without a time is a run of its own."""
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("wall_s") and r.get("length"):
            by.setdefault((r["method"], r.get("task"), r["length"]), []).append(r)
    out = []
    for rs in by.values():
        stamped = [(_stamp(r), r) for r in rs]   # each row's time parsed once
        out += [(r, 1, r["wall_s"]) for t, r in stamped if t is None]
        cur = None
        for t, r in sorted(((t, r) for t, r in stamped if t is not None), key=lambda tr: tr[0]):
            if cur is not None and t - cur[3] <= r["wall_s"] + 60:
                cur = (cur[0], cur[1] + 1, cur[2] + r["wall_s"], t)
            else:
                if cur is not None:
                    out.append(cur[:3])
                cur = (r, 1, r["wall_s"], t)
        if cur is not None:
            out.append(cur[:3])
    return out


def expected_seconds(rows: list[dict]) -> tuple[dict[str, float], dict[tuple[str, str], float], float]:
    """Wall seconds per prompt token of a run's first budget (:func:`runs`: a run of ``n`` cells
    taking ``T`` seconds over ``L``-token prompts rates ``T / (L * (1 + EXTRA * (n - 1)))``): per
    method (the mean over its runs), per ``(method, task)`` where that pair has runs (a method's
    cost differs by task), and the median over methods for a method with none yet. A method with cells measured the current way (:func:`_current`) is
    rated from those alone: its older cells ran without prefix sharing or grouped budgets (kvzip's
    one old `niah` cell at 16k took 351 s, its `ppl` cells since 4-11 s a budget, 47 s for the
    first at 16k, which pays the scoring for the four)."""
    now = {r["method"] for r in rows if _current(r)}
    rows = [r for r in rows if r["method"] not in now or _current(r)]
    per: dict[str, list[float]] = {}
    per_task: dict[tuple[str, str], list[float]] = {}
    for r, n, total in runs(rows):
        x = total / (r["length"] * (1 + EXTRA * (n - 1)))
        per.setdefault(r["method"], []).append(x)
        if r.get("task"):
            per_task.setdefault((r["method"], r["task"]), []).append(x)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    rate = {m: mean(v) for m, v in per.items()}
    return rate, {k: mean(v) for k, v in per_task.items()}, (statistics.median(rate.values()) if rate else 1e-3)


def balance(costs: dict[str, float], processes: int) -> list[list[str]]:
    """Longest-processing-time-first assignment of units (``method`` or ``method@task``, cost each)
    to ``processes`` groups; empty groups are dropped."""
    groups: list[list[str]] = [[] for _ in range(max(1, processes))]
    load = [0.0] * len(groups)
    for m in sorted(costs, key=lambda m: (-costs[m], m)):
        i = min(range(len(groups)), key=lambda j: (load[j], j))
        groups[i].append(m)
        load[i] += costs[m]
    return [g for g in groups if g]


def split_heavy(costs: dict[str, dict[str, float]], processes: int) -> dict[str, float]:
    """Units to balance from ``costs[method][task]``: a method whose cells would take more than one
    process's fair share goes as one unit per task (``method@task``), the others whole."""
    total = sum(sum(t.values()) for t in costs.values())
    share = total / max(1, processes)
    units: dict[str, float] = {}
    for m, per_task in costs.items():
        if sum(per_task.values()) > share and len(per_task) > 1:
            units.update({f"{m}@{t}": c for t, c in per_task.items()})
        else:
            units[m] = sum(per_task.values())
    return units


def group_spec(group: list[str]) -> str:
    """A process's work for ``suite_h200.sh``: whole methods first as one ``m1,m2`` unit, then each
    ``method@task`` unit, separated by ``;`` (run one after the other)."""
    whole = [u for u in group if "@" not in u]
    parts = [",".join(whole)] if whole else []
    return ";".join(parts + [u for u in group if "@" in u])


def remaining_costs(rows: list[dict], suite: str, tasks=None, lengths=None, budgets=None,
                    methods=None) -> dict[str, dict[str, float]]:
    """Expected seconds per method and task over the suite's cells (narrowed) not yet in ``rows``:
    the cells left of one method over one prompt set as one run (its first budget at the rate of
    :func:`expected_seconds`, each further one ``EXTRA`` of it)."""
    from kvsift.methods import available_methods

    s = get_suite(suite)
    cfg = BenchConfig(tasks=list(tasks or s.tasks), methods=list(methods or s.methods or available_methods()),
                      budgets=list(budgets or s.budgets), lengths=list(lengths or s.lengths), seeds=list(s.seeds))
    done = {r["key"] for r in rows if not r.get("error")}   # an error row is retried (bench run does)
    rate, task_rate, default = expected_seconds(rows)
    left: dict[tuple, int] = {}
    for task, length, seed, method, budget in cfg.cells():
        if cell_key(task, method, budget, length, seed) not in done:
            left[(method, task, length, seed)] = left.get((method, task, length, seed), 0) + 1
    costs: dict[str, dict[str, float]] = {}
    for (method, task, length, _), k in left.items():
        per = costs.setdefault(method, {})
        first = task_rate.get((method, task), rate.get(method, default)) * length
        per[task] = per.get(task, 0.0) + first * (1 + EXTRA * (k - 1))
    return costs


def share_kind(label: str) -> tuple[int, str]:
    """Where a method label runs among a by-task group's methods: ``(0, "")`` full, ``(1, "")``
    the plain prefix sharers, ``(2, state)`` those carrying their own prefix state (grouped by it),
    ``(3, "")`` those that do not share (``KVMethod.shares_prefix`` / ``prefix_state``)."""
    from kvsift.eval.runner import method_options
    from kvsift.methods import build_method

    spec, kw = method_options(label)
    if spec == "full":
        return 0, ""
    try:
        m = build_method(spec, 0.1, **kw)
    except Exception:  # noqa: BLE001 - a label this checkout cannot build: among the plain ones
        return 1, ""
    if not m.shares_prefix():
        return 3, ""
    state = m.prefix_state()
    return (1, "") if state is None else (2, repr(state))


def by_task(costs: dict[str, dict[str, float]], processes: int) -> list[str]:
    """Groups of tasks (each with every method that has cells left there), balanced by expected time:
    ``"full,m1,m2@t1,t2"``, methods ordered by :func:`share_kind`, then by expected time per cell.

    With fewer tasks than processes (e.g. ``TASKS=ppl``), whole tasks would leave processes idle:
    each task is then cut into about ``processes * its share of the time`` pieces by method
    (balanced, at most one per method), a piece ``"m1,m2@task"`` (its own process prefills that
    task's prompts again). A process holding several units runs them one after the other, ``;``
    between them, whole tasks first."""
    per_task: dict[str, float] = {}
    for per in costs.values():
        for task, c in per.items():
            per_task[task] = per_task.get(task, 0.0) + c
    rate = {m: sum(per.values()) / max(1, len(per)) for m, per in costs.items()}

    def order(ms) -> list[str]:
        return sorted(ms, key=lambda m: (*share_kind(m), rate[m], m))

    units: dict[str, float] = {}
    pieces: dict[str, tuple[list[str], str]] = {}   # unit -> (its methods, its task)
    total = sum(per_task.values())
    for task, c in per_task.items():
        ms = [m for m in costs if task in costs[m]]
        k = min(len(ms), max(1, round(processes * c / total))) if len(per_task) < processes and total > 0 else 1
        if k == 1:
            units[task] = c
            continue
        for i, g in enumerate(balance({m: costs[m][task] for m in ms}, k)):
            units[f"{task}#{i}"] = sum(costs[m][task] for m in g)
            pieces[f"{task}#{i}"] = (g, task)
    out = []
    for group in balance(units, processes):
        whole = sorted(u for u in group if u not in pieces)
        specs = [",".join(order(m for m in costs if any(t in costs[m] for t in whole))) + "@" + ",".join(whole)] \
            if whole else []
        specs += [",".join(order(pieces[u][0])) + "@" + pieces[u][1] for u in group if u in pieces]
        out.append(";".join(specs))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=None, help="the suite's JSONL rows so far (missing: nothing measured)")
    ap.add_argument("--suite", default="standard")
    ap.add_argument("--processes", type=int, default=6)
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--lengths", default=None)
    ap.add_argument("--budgets", default=None)
    ap.add_argument("--methods", default=None)
    ap.add_argument("--by", choices=("method", "task"), default="method",
                    help="what a process's group is made of (task: each prompt set prefilled by one process)")
    ap.add_argument("--verbose", action="store_true", help="also print each group's expected seconds (stderr)")
    a = ap.parse_args(argv)
    if a.processes < 1:
        ap.error("--processes must be >= 1")
    rows = load_rows(a.rows) if a.rows and Path(a.rows).is_file() else []   # plain or .jsonl.gz
    split = lambda s: split_items(s) if s else None  # noqa: E731  (commas inside a label's brackets stay)
    costs = remaining_costs(rows, a.suite, split(a.tasks), [int(x) for x in split(a.lengths) or []] or None,
                            split(a.budgets), split(a.methods))
    if a.by == "task":
        groups_ = by_task(costs, a.processes)
        if a.verbose:
            for g in groups_:
                c = sum(costs[m].get(t, 0.0) for spec in g.split(";") for ms, ts in [spec.split("@")]
                        for m in split_items(ms) for t in ts.split(","))
                print(f"{g}: ~{c / 60:.1f} min", file=sys.stderr)
        print(" ".join(groups_))
        return 0
    units = split_heavy(costs, a.processes)
    groups = balance(units, a.processes)
    if a.verbose:
        for g in groups:
            print(f"{group_spec(g)}: ~{sum(units[u] for u in g) / 60:.1f} min", file=sys.stderr)
    print(" ".join(group_spec(g) for g in groups))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
