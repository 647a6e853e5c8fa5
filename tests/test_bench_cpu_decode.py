"""bench/cpu_decode.py on a tiny model: every method's context prefilled once and its question
answered in rounds, full's decode the baseline of the ratios; bad options refused before the model
loads."""

from __future__ import annotations

import json

import pytest

from bench import cpu_decode


def test_cpu_decode_times_each_method_over_its_context(tmp_path, default_tokenizer):
    from kvsift.models.tiny import save_tiny_model

    mdir = save_tiny_model(tmp_path / "tiny", seed=1, tokenizer=default_tokenizer)
    doc = tmp_path / "doc.txt"
    doc.write_text("\n\n".join(f"Sentence {i} tells of the {i % 7}th gate and its {i % 5}th key." for i in range(40)))
    out = tmp_path / "d.json"
    rc = cpu_decode.main(["--model", str(mdir), "--prompt-file", str(doc), "--length", "200", "--methods",
                          "sentencekv,kivi", "--budget", "0.5", "--max-tokens", "4", "--rounds", "2", "--out", str(out)])
    d = json.loads(out.read_text())
    rows = {r["method"]: r for r in d["rows"]}
    assert rc == 0 and list(rows) == ["full", "sentencekv", "kivi"]          # full first: the baseline
    assert rows["full"]["ratio_vs_full"] == 1.0 and rows["full"]["same_answer_as_full"]
    assert rows["sentencekv"]["budget"] == "0.5" and rows["kivi"]["budget"] is None   # kivi takes no budget
    for r in rows.values():
        assert len(r["decode_ms_per_token"]) == 2 and r["decode_median"] > 0 and r["context_prefill_s"] > 0
        assert r["ratio_vs_full"] == pytest.approx(rows["full"]["decode_median"] / r["decode_median"])
    assert 0 < d["meta"]["document_tokens"] <= 200 and d["meta"]["rounds"] == 2


@pytest.mark.parametrize("bad, msg", [(["--methods", "full,bogus"], "unknown method 'bogus'"),
                                      (["--rounds", "0"], "--rounds must be >= 1"),
                                      (["--prompt-file", "/nonexistent"], "no such file")])
def test_cpu_decode_rejects_bad_options(bad, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cpu_decode.main(bad)
    assert e.value.code == 2 and msg in capsys.readouterr().err
