"""bench/suite_groups.py: method groups for the suite's parallel processes, balanced by measured time."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("suite_groups", Path(__file__).parent.parent / "bench" / "suite_groups.py")
sg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sg)


def test_balance_is_longest_first_onto_the_least_loaded():
    costs = {"a": 10.0, "b": 7.0, "c": 6.0, "d": 3.0, "e": 1.0}
    assert sg.balance(costs, 2) == [["a", "d", "e"], ["b", "c"]]   # loads 14 / 13 (a tie goes to the first)
    assert sg.balance(costs, 9) == [["a"], ["b"], ["c"], ["d"], ["e"]]   # no empty group
    assert sg.balance({}, 3) == []


def test_a_method_heavier_than_a_fair_share_is_split_by_task():
    costs = {"kvzip": {"niah": 50.0, "qa": 40.0}, "snapkv": {"niah": 5.0, "qa": 5.0}, "full": {"niah": 2.0}}
    units = sg.split_heavy(costs, 3)   # fair share (102 / 3 = 34) < kvzip's 90
    assert units == {"kvzip@niah": 50.0, "kvzip@qa": 40.0, "snapkv": 10.0, "full": 2.0}
    groups = sg.balance(units, 3)
    assert groups == [["kvzip@niah"], ["kvzip@qa"], ["snapkv", "full"]]
    assert [sg.group_spec(g) for g in groups] == ["kvzip@niah", "kvzip@qa", "snapkv,full"]
    assert sg.group_spec(["h2o", "kvzip@vt", "tova", "kvzip@qa"]) == "h2o,tova;kvzip@vt;kvzip@qa"
    assert sg.split_heavy({"kvzip": {"niah": 90.0}, "full": {"niah": 1.0}}, 3) == {"kvzip": 90.0, "full": 1.0}


def test_remaining_costs_skip_measured_cells_and_scale_by_length():
    rows = [{"key": "niah|snapkv|0.05|4096|0", "method": "snapkv", "length": 4096, "wall_s": 40.96},
            {"key": "niah|full|full|4096|0", "method": "full", "length": 4096, "wall_s": 4.096}]
    costs = sg.remaining_costs(rows, "standard", tasks=["niah"], lengths=[4096, 8192], budgets=["0.05"],
                               methods=["full", "snapkv", "h2o"])
    assert costs["snapkv"] == {"niah": pytest.approx(81.92)}      # 4096 done; 8192 at 10 ms per token
    assert costs["full"] == {"niah": pytest.approx(8.192)}
    # a method not measured yet: the median rate over methods ((10 + 1) / 2 ms per token), both lengths
    assert costs["h2o"] == {"niah": pytest.approx(0.0055 * (4096 + 8192))}
    # a task the method has cells of takes that task's rate; another task, the method's mean
    rows.append({"key": "ppl|snapkv|0.05|4096|0", "method": "snapkv", "task": "ppl", "length": 4096, "wall_s": 4.096})
    rows[0]["task"] = "niah"
    costs = sg.remaining_costs(rows, "standard", tasks=["niah", "ppl", "qa"], lengths=[8192], budgets=["0.05"],
                               methods=["snapkv"])
    assert costs["snapkv"]["niah"] == pytest.approx(0.010 * 8192)
    assert costs["snapkv"]["ppl"] == pytest.approx(0.001 * 8192)
    assert costs["snapkv"]["qa"] == pytest.approx(0.0055 * 8192)      # the mean of its two rates


def test_a_methods_current_cells_replace_its_older_ones_in_the_rates():
    """Cells measured the way the suite runs now (prefix sharing: ``share_prefix_gib`` in their
    settings) rate a method alone: its older cells (no sharing, one budget at a time) ran slower."""
    now = {"share_prefix_gib": 25.0}
    rows = [{"key": "niah|kvzip|0.05|16384|0", "method": "kvzip", "task": "niah", "length": 16384, "wall_s": 351.0,
             "settings": {}},
            {"key": "ppl|kvzip|0.05|16384|0", "method": "kvzip", "task": "ppl", "length": 16384, "wall_s": 16.384,
             "settings": now},
            {"key": "niah|snapkv|0.05|16384|0", "method": "snapkv", "task": "niah", "length": 16384,
             "wall_s": 32.768, "settings": {}}]
    rate, task_rate, _ = sg.expected_seconds(rows)
    assert rate["kvzip"] == pytest.approx(0.001) and ("kvzip", "niah") not in task_rate   # the old cell dropped
    assert rate["snapkv"] == pytest.approx(0.002)          # a method with no current cells keeps its old ones
    costs = sg.remaining_costs(rows, "standard", tasks=["niah", "qa"], lengths=[16384], budgets=["0.05"],
                               methods=["kvzip"])
    assert costs["kvzip"] == {"qa": pytest.approx(16.384)}   # niah at 16k is done; qa at kvzip's current rate


def test_a_cell_whose_row_is_an_error_is_still_to_run():
    """`bench run` retries a cell whose row is an error (a kernel that failed to compile at 30k once
    stayed out of every later part's groups while its row was counted as done)."""
    rows = [{"key": "niah|snapkv|0.05|4096|0", "method": "snapkv", "length": 4096, "wall_s": 40.96},
            {"key": "niah|snapkv|0.05|8192|0", "method": "snapkv", "length": 8192, "error": "CompilationError: ..."}]
    costs = sg.remaining_costs(rows, "standard", tasks=["niah"], lengths=[4096, 8192], budgets=["0.05"],
                               methods=["snapkv"])
    assert costs == {"snapkv": {"niah": pytest.approx(81.92)}}    # the 8192 cell, at the 4096 cell's rate


def test_cli_prints_groups(tmp_path, capsys):
    assert sg.main(["--rows", str(tmp_path / "none.jsonl"), "--processes", "2", "--tasks", "niah",
                    "--lengths", "4096", "--budgets", "0.05", "--methods", "full,snapkv,h2o"]) == 0
    out = capsys.readouterr().out.split()
    assert len(out) == 2 and sorted(",".join(out).replace(";", ",").split(",")) == ["full", "h2o", "snapkv"]


def test_cli_reads_gzip_compressed_rows(tmp_path, capsys):
    """The committed suite rows are .jsonl.gz: measured cells are left out as from plain JSONL, and
    kvsift's own reader (report, resume) reads the same file."""
    import gzip
    import json

    from kvsift.eval.runner import load_rows

    rows = [{"key": f"niah|{m}|{b}|4096|0", "method": m, "length": 4096, "wall_s": 4.0}
            for m, b in (("full", "full"), ("snapkv", "0.05"))]
    plain, packed = tmp_path / "rows.jsonl", tmp_path / "rows.jsonl.gz"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write(plain.read_text() + '{"key": "cut off')                 # an interrupted last line
    assert load_rows(packed) == load_rows(plain) == rows
    args = ["--processes", "1", "--tasks", "niah", "--lengths", "4096", "--budgets", "0.05",
            "--methods", "full,snapkv,h2o"]
    assert sg.main(["--rows", str(packed), *args]) == 0
    assert capsys.readouterr().out.split() == ["h2o"]                     # full and snapkv are measured


def test_by_task_groups_run_every_method_over_their_tasks_full_first():
    """--by task: tasks balanced over the processes, each group every method with cells left on its
    tasks, ``full`` first (its cells store the shared prefixes), then the cheapest per cell among
    the methods sharing plain prefixes."""
    costs = {"full": {"niah": 1.0, "qa": 1.0}, "kvzip": {"niah": 40.0, "qa": 30.0, "vt": 30.0},
             "snapkv": {"niah": 4.0, "qa": 4.0, "vt": 4.0}, "quest": {"vt": 2.0}}
    groups = sg.by_task(costs, 2)
    assert groups == ["full,snapkv,kvzip@niah", "full,quest,snapkv,kvzip@qa,vt"]   # loads 45 / 71
    # more processes than tasks: every process busy, each (method, task) cell run by exactly one
    five = sg.by_task(costs, 5)
    assert len(five) == 5
    ran = sorted((m, t) for g in five for spec in g.split(";") for ms, ts in [spec.split("@")]
                 for m in ms.split(",") for t in ts.split(","))
    assert ran == sorted((m, t) for m, per in costs.items() for t in per)
    assert sg.by_task({}, 3) == []


def test_by_task_cuts_a_task_by_method_when_tasks_are_fewer_than_processes():
    """One task (TASKS=ppl) over three processes: three pieces of its methods, each method once,
    balanced by time, ``full`` first in its piece; two tasks over three: the heavier one cut."""
    costs = {"full": {"ppl": 1.0}, "kvzip": {"ppl": 50.0}, "snapkv": {"ppl": 10.0}, "quest": {"ppl": 12.0},
             "tova": {"ppl": 11.0}, "h2o": {"ppl": 20.0}}
    groups = sg.by_task(costs, 3)
    assert len(groups) == 3 and all(g.endswith("@ppl") and ";" not in g for g in groups)
    methods = [m for g in groups for m in g.split("@")[0].split(",")]
    assert sorted(methods) == sorted(costs)
    assert "kvzip@ppl" in groups                                            # the heaviest alone
    assert any(g.startswith("full,") for g in groups)
    costs2 = {"full": {"niah": 1.0, "ppl": 1.0}, "snapkv": {"niah": 2.0, "ppl": 30.0}, "h2o": {"ppl": 30.0}}
    groups2 = sg.by_task(costs2, 3)
    assert len(groups2) == 3
    units = [u for g in groups2 for u in g.split(";")]
    assert sum(u.endswith("@ppl") for u in units) == 3 and units.count("full,snapkv@niah") == 1
    # as many tasks as processes or more: whole tasks, as before
    assert sg.by_task({"full": {"a": 1.0, "b": 1.0}, "snapkv": {"a": 9.0, "b": 1.0}}, 2) == ["full,snapkv@a",
                                                                                              "full,snapkv@b"]


def test_by_task_orders_methods_by_what_their_prefixes_share():
    """Each kind of stored prefix runs together: full, the plain sharers, each stateful kind (h2o,
    expected_attention, adakv(h2o) with h2o's), the non-sharing methods; cheapest first in each."""
    ms = ["chunked", "h2o", "snapkv", "adakv(h2o)", "expected_attention", "quest", "full", "minference", "kvzip"]
    costs = {m: {"niah": 1.0 + i} for i, m in enumerate(ms)}
    (group,) = sg.by_task(costs, 1)
    order = group.split("@")[0].split(",")
    assert order[:4] == ["full", "snapkv", "quest", "kvzip"]                 # plain sharers by cost
    assert set(order[4:7]) == {"h2o", "adakv(h2o)", "expected_attention"}
    assert abs(order.index("h2o") - order.index("adakv(h2o)")) == 1          # one kind, together
    assert order[7:] == ["chunked", "minference"]
    assert sg.share_kind("kivi[bits=2]") == (1, "") and sg.share_kind("full") == (0, "")


def test_cli_by_task(tmp_path, capsys):
    assert sg.main(["--rows", str(tmp_path / "none.jsonl"), "--processes", "2", "--tasks", "niah,vt",
                    "--lengths", "4096", "--budgets", "0.05", "--methods", "snapkv,full,h2o", "--by", "task"]) == 0
    out = capsys.readouterr().out.split()
    assert sorted(out) == ["full,snapkv,h2o@niah", "full,snapkv,h2o@vt"]


def test_suite_script_seeds_from_the_tree_and_the_machines_kept_rows(tmp_path):
    """bench/suite_h200.sh's ``seed_rows``: a process starts from the tree's rows merged with the
    rows an earlier call kept on the machine (those win), either may be missing; the script parses."""
    import gzip
    import json
    import re
    import subprocess

    script = Path(__file__).parent.parent / "bench" / "suite_h200.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fn = re.search(r"^seed_rows\(\) \{.*?^\}$", script.read_text(), re.S | re.M).group(0)

    def gz(path, rows):
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    tree = gz(tmp_path / "tree.jsonl.gz", [{"key": "a", "v": 1}, {"key": "b", "v": 1}])
    kept = gz(tmp_path / "kept.gz", [{"key": "b", "v": 2}, {"key": "c", "v": 2}])

    def seed(*args):
        out = tmp_path / "out.jsonl"
        cmd = fn + "\nseed_rows " + " ".join(f"'{a}'" for a in (args[0], out, *args[1:]))
        subprocess.run(["bash", "-c", cmd], check=True, cwd=Path(__file__).parent.parent)
        return {r["key"]: r["v"] for r in map(json.loads, out.read_text().splitlines())}

    assert seed(tree, kept) == {"a": 1, "b": 2, "c": 2}
    assert seed(tree, tmp_path / "missing.gz") == {"a": 1, "b": 1}
    assert seed(tmp_path / "none.gz", kept) == {"b": 2, "c": 2}
    assert seed(tmp_path / "none.gz", "") == {}


def test_suite_script_counts_kvpress_setup_in_its_kill_budget():
    """Part 42 (2026-12-05) timed out with nothing returned: kvpress's venv setup ran after the kill
    budget was computed, so its processes outlived the device call. The setup now comes first, the
    processes are killed hard if the INT does not stop them, and kvpress's --max-minutes ends a
    minute before the kill."""
    script = (Path(__file__).parent.parent / "bench" / "suite_h200.sh").read_text()
    setup = script.index("vs_kvpress.py --model $M --wheels .whl/kvpress-min --setup-only")
    assert setup < script.index("KILL=$(( ${KILL_AFTER:-540}")
    assert 'STOP="timeout -s INT -k 20 $KILL"' in script
    assert "--max-minutes $KVP_MINUTES" in script and "($KILL - 60) / 60" in script


def test_a_prompt_sets_budgets_are_one_run_whose_first_budget_pays_the_set():
    """Cells of one method over one prompt set that ended one after the other are one run: its first
    budget pays the set (prefill, kvzip's reread), each further one ``EXTRA`` of it; the cells left of
    a prompt set are costed the same way (three budgets left: one first price plus two extras)."""
    t = lambda s: f"2026-12-04T12:58:{s:02d}+00:00"  # noqa: E731
    L = 16384
    rows = [{"key": f"ppl|kvzip|{b}|{L}|0", "method": "kvzip", "task": "ppl", "length": L, "wall_s": w, "time": t(s)}
            for b, w, s in (("0.02", 40.0, 10), ("0.05", 5.0, 15), ("0.1", 5.0, 20), ("0.25", 6.0, 26))]
    # one budget of another prompt set, alone (the next day)
    rows.append({"key": f"niah|kvzip|0.05|{L}|0", "method": "kvzip", "task": "niah", "length": L, "wall_s": 60.0,
                 "time": "2026-12-05T10:00:00+00:00"})
    assert sorted((n, total) for _, n, total in sg.runs(rows)) == [(1, 60.0), (4, 56.0)]
    rate, task_rate, _ = sg.expected_seconds(rows)
    assert task_rate[("kvzip", "ppl")] == pytest.approx(56.0 / (L * (1 + 3 * sg.EXTRA)))
    assert task_rate[("kvzip", "niah")] == pytest.approx(60.0 / L)
    costs = sg.remaining_costs(rows, "standard", tasks=["niah"], lengths=[L], budgets=["0.02", "0.05", "0.1", "0.25"],
                               methods=["kvzip"])
    assert costs["kvzip"]["niah"] == pytest.approx(60.0 * (1 + 2 * sg.EXTRA))    # not 3 x 60 s
    # far apart in time: separate runs, each its own first budget
    rows[1]["time"] = "2026-12-04T15:00:00+00:00"
    assert sorted(n for _, n, _ in sg.runs(rows[:4])) == [1, 3]


def test_suite_script_narrows_kvpress_on_its_own():
    """KVP_LENGTHS / KVP_BUDGETS / KVP_TASKS narrow kvpress's processes apart from kvsift's (unset:
    kvsift's narrowing; set empty: none), so one call can rerun kvsift's error cells anywhere
    beside kvpress's cells at one budget and length."""
    import re
    import subprocess

    script = (Path(__file__).parent.parent / "bench" / "suite_h200.sh").read_text()
    fn = re.search(r"^sel_args\(\) \{.*?^\}$", script, re.S | re.M).group(0)
    lines = [ln for ln in script.splitlines() if ln.startswith(("mapfile -t SEL", "mapfile -t KSEL"))]
    assert len(lines) == 2

    def sel(env):
        cmd = fn + "\n" + "\n".join(lines) + '\necho "${SEL[*]}|${KSEL[*]}"'
        out = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, check=True).stdout
        return out.strip().split("|")

    assert sel({"LENGTHS": "4096", "BUDGETS": "0.1"}) == ["--lengths 4096 --budgets 0.1"] * 2
    assert sel({"LENGTHS": "4096", "KVP_LENGTHS": "16384,30000", "KVP_BUDGETS": "0.02"}) == \
        ["--lengths 4096", "--lengths 16384,30000 --budgets 0.02"]
    assert sel({"TASKS": "qa", "KVP_TASKS": ""}) == ["--tasks qa", ""]
    assert sel({}) == ["", ""]
    assert '"${KSEL[@]}" --max-minutes $KVP_MINUTES' in script
