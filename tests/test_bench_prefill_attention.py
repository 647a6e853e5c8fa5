"""bench/prefill_attention.py on the CPU: every row written, the split-and-merge of the chunk's
past and own keys equal to one bottom-right causal call."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_cpu_run_writes_rows_and_the_split_agrees(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prefill_attention", BENCH / "prefill_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "p.json"
    assert mod.main(["--cases", "96:32,40:40", "--reps", "1", "--heads", "4,2,16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["n"], r["L"], r["variant"]) for r in rows] == [
        (96, 32, "flash_lr"), (96, 32, "engine"), (96, 32, "math_split"),
        (40, 40, "flash_lr"), (40, 40, "engine"), (40, 40, "math_split")]
    for r in rows:
        assert r["ms"] > 0 and r["first_ms"] > 0 and r["max_abs_diff"] < 1e-5, r
    assert "math_split" in capsys.readouterr().out
