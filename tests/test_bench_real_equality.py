"""bench/real_equality.py on the small real model (CPU): HF generate == kvsift full in every mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import SMALL_MODEL, needs_model

pytestmark = [pytest.mark.real, needs_model(SMALL_MODEL)]
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "real_equality.py"


def _load():
    spec = importlib.util.spec_from_file_location("real_equality", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_first_diff():
    mod = _load()
    assert mod.first_diff([1, 2, 3], [1, 2, 3]) == 3
    assert mod.first_diff([1, 2, 3], [1, 5, 3]) == 1
    assert mod.first_diff([1, 2], [1, 2, 3]) == 2


def test_full_equals_hf_generate_in_every_mode(tmp_path, capsys):
    out = tmp_path / "eq.json"
    assert _load().main(["--model", SMALL_MODEL, "--length", "160", "--new-tokens", "6", "--device", "cpu",
                         "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["system"] for r in res["rows"]] == ["hf_generate", "kvsift full (eager)", "kvsift full (static)"]
    assert all(r["tokens"] == 6 for r in res["rows"])
    assert res["all_equal"], res
    assert res["mode_pairs"] == {"eager==static": 6}
    assert "kvsift full (static)" in capsys.readouterr().out
