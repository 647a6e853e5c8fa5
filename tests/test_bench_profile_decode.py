"""bench/profile_decode.py on the CPU: per method, the decode steps' wall time and a table of the
ops that ran in the profiled steps (CUDA kernels on a GPU)."""

from __future__ import annotations

import json

import pytest

from bench import profile_decode


def test_profile_decode_runs_on_the_cpu(tmp_path):
    out = tmp_path / "prof.json"
    assert profile_decode.main(["--ctx", "96", "--layers", "1", "--warm", "2", "--steps", "2", "--chunk", "64",
                                "--methods", "full,kivi", "--top", "500", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"full", "kivi"}
    for r in rows.values():
        assert r["mode"] == "static" and r["wall_ms_per_step"] > 0 and r["kernel_us_per_step"] > 0
        # the first step (set-up: compiling, recording) apart from the timed warm steps after it
        assert r["first_step_ms"] > 0 and len(r["warm_steps_ms"]) == 1 and r["prefill_s"] > 0
        assert r["wall_ms_per_step"] == pytest.approx(r["warm_steps_ms"][0])
        assert 0 < len(r["top"]) <= 500 and all(x["us_per_step"] > 0 and 0 < x["share"] <= 1 for x in r["top"])
        assert sum(x["share"] for x in r["top"]) <= 1 + 1e-9
    # kivi's steps run its quantized attention (the reference takes a log-sum-exp per block of
    # slots, to merge them: the log of its exp pass's sums); full's do not
    names = {m: {x["name"] for x in r["top"]} for m, r in rows.items()}
    assert "aten::log" in names["kivi"] and "aten::log" not in names["full"]
    assert rows["kivi"]["method_stats"] == {"kv_bits": 4}

def test_profile_decode_refuses_bad_counts(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        profile_decode.main(["--steps", "0"])
    assert e.value.code == 2 and "--steps must be >= 1" in capsys.readouterr().err
