"""bench/join_step_profile.py on a tiny model: narrow prefill forwards (joiners') against one prompt at
a time (FIFO), each forward's host and wall time, the profiled forwards' ops; bad options exit 2."""

from __future__ import annotations

import json
import math

import pytest

from bench import join_step_profile


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_tokenizer):
    from kvsift.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=1, tokenizer=default_tokenizer)


@pytest.mark.parametrize("method", ["full", "sentencekv"])
def test_narrow_forwards_against_fifo_with_a_profile(tiny_dir, tmp_path, capsys, method):
    out = tmp_path / "p.json"
    args = ["--model", str(tiny_dir), "--method", method, "--rows", "1,3", "--prompt", "96", "--width", "32",
            "--chunk-size", "64", "--profile", "--profile-steps", "2", "--out", str(out)]
    if method == "sentencekv":
        args += ["--budget", "48"]
    assert join_step_profile.main(args) == 0
    res = json.loads(out.read_text())["results"]
    assert [r["rows"] for r in res] == [1, 3]
    for r in res:
        if method == "full":   # one padded batch: each prompt gets width // rows tokens a forward, at least 16
            assert r["forwards"] == math.ceil(96 / max(16, 32 // r["rows"]))
        else:                  # a compressing method's prompts go one at a time, each at the whole width
            assert r["forwards"] == r["rows"] * math.ceil(96 / 32)
        assert r["fifo_forwards"] == 2            # 96 tokens in chunks of 64
        assert 0 < r["host_ms_p50"] <= r["wall_ms_p50"] + 1e-6 and 0 < r["host_share"] <= 1
        assert r["narrow_over_fifo"] == pytest.approx(r["us_per_token"] / r["fifo_us_per_token"], rel=0.01)
    assert "profile" not in res[0]                # only the largest --rows is profiled
    prof = res[1]["profile"]
    assert prof["forwards"] == 2 and prof["device_ms_per_forward"] is None   # no device on the CPU
    assert prof["top_host"] and all(e["calls"] >= 1 and e["self_host_ms"] >= 0 for e in prof["top_host"])
    assert "narrow/FIFO" in capsys.readouterr().out


@pytest.mark.parametrize("bad, message", [
    (["--rows", "0"], "--rows"), (["--rows", "a"], "--rows"), (["--width", "0"], "--width"),
    (["--random-8b", "0"], "--random-8b"), (["--method", "snapkv", "--budget", "32"], "chunk size"),
])
def test_bad_options_exit_2(tiny_dir, bad, message, capsys):
    with pytest.raises(SystemExit) as e:
        join_step_profile.main(["--model", str(tiny_dir)] + bad)
    assert e.value.code == 2 and message in capsys.readouterr().err
