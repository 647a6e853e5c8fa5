"""bench/cache_warm.py on a tiny model: both runs give the same greedy tokens, the warm one copies
more chunks at the first step and fewer after it, and bad options are refused first."""

from __future__ import annotations

import json

import pytest

from bench import cache_warm


def test_cache_warm_counts_the_copies_per_step(tmp_path, default_tokenizer):
    from kvsift.models.tiny import save_tiny_model

    mdir = save_tiny_model(tmp_path / "tiny", seed=1, tokenizer=default_tokenizer)
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"Sentence {i} tells of the {i % 7}th gate and its {i % 5}th key." for i in range(60)))
    out = tmp_path / "w.json"
    rc = cache_warm.main(["--model", str(mdir), "--device", "cpu", "--prompt-file", str(doc), "--budget", "96",
                          "--cache-chunks", "12", "--max-tokens", "10", "--out", str(out)])
    d = json.loads(out.read_text())
    assert rc == 0 and d["tokens_equal"]
    cold, warm = d["runs"]["cold"], d["runs"]["warm"]
    assert len(cold["misses"]) == len(warm["misses"]) == 9      # 10 tokens: the first from the prefill
    assert d["first_step_misses"]["warm"] > d["first_step_misses"]["cold"] == cold["lookups"][0]
    assert d["later_misses"]["warm"] <= d["later_misses"]["cold"]
    assert all(0 <= m <= n for m, n in zip(cold["misses"], cold["lookups"]))


@pytest.mark.parametrize("bad", [["--prompt-file", "/nonexistent"], ["--prompt-file", __file__, "--cache-chunks", "0"],
                                 ["--prompt-file", __file__, "--max-tokens", "1"]])
def test_cache_warm_rejects_bad_options(bad, capsys):
    with pytest.raises(SystemExit) as e:
        cache_warm.main(bad)
    assert e.value.code == 2 and "error" in capsys.readouterr().err
