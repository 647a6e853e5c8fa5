"""bench/minference_coverage.py on a tiny model: the mask of some rows equals the whole mask's rows,
every key listed holds all attention, a coverage lists fewer keys, bad options exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from bench import minference_coverage as mc
from kvsift.kernels.sparse_prefill_attention import selected_mask
from kvsift.methods.minference import blocks_to_index, vertical_slash_index


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_tokenizer):
    from kvsift.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=1, tokenizer=default_tokenizer)


@pytest.mark.parametrize("L,n,block", [(64, 160, 16), (45, 45, 16), (40, 130, 32)])
def test_selected_mask_of_some_rows_is_those_rows_of_the_whole_mask(L, n, block):
    torch.manual_seed(0)
    q, k = torch.randn(1, 3, L, 8) * 2, torch.randn(1, 1, n, 8) * 2
    bm, cols = vertical_slash_index(q, k, n, 16, 7, 3, block, 0.3, 0.8)
    bi = blocks_to_index(bm)
    rows = torch.tensor([0, 5, L // 2, L - 1])
    assert torch.equal(selected_mask(bi, cols, L, n, block, rows), selected_mask(bi, cols, L, n, block)[:, :, rows])
    att = mc.attention_rows(q, k, rows, L, 0.3)
    assert torch.allclose(att.sum(-1), torch.ones(1, 3, 4)) and (att[..., n - L + int(rows[0]) + 1:][:, :, 0] == 0).all()


def test_every_key_listed_holds_all_attention_and_coverage_lists_fewer(tiny_dir, tmp_path, capsys):
    def run(*extra):
        out = tmp_path / "c.json"
        assert mc.main(["--model", str(tiny_dir), "--lengths", "300", "--tasks", "niah", "--chunk", "128",
                        "--block", "16", "--rows", "16", "--tail", "8", "--out", str(out), *extra]) == 0
        return {r["setting"]: r for r in json.loads(out.read_text())["rows"]}

    fixed = run("--coverages", "none")["fixed"]        # the default sizes list every key of 300
    assert fixed["density"] == pytest.approx(1.0) and fixed["recall"] == pytest.approx(1.0, abs=1e-5)
    assert fixed["tail_recall"] == pytest.approx(1.0, abs=1e-5) and fixed["chunk_layers"] > 0
    rows = run("--coverages", "none,0.3", "--slash", "2", "--settings", "vertical=8;coverage=0.3,vertical=8")
    fixed, cov = rows["fixed"], rows["coverage=0.3"]            # few diagonals: the columns decide
    assert cov["density"] < fixed["density"] and 0 < cov["recall"] <= fixed["recall"] + 1e-6
    assert cov["tail_recall"] is not None and fixed["chunk_layers"] == cov["chunk_layers"]
    assert rows["vertical=8"]["density"] < fixed["density"]     # fewer columns, the same diagonals
    assert rows["coverage=0.3,vertical=8"]["density"] <= rows["vertical=8"]["density"] + 1e-6
    meta = json.loads((tmp_path / "c.json").read_text())["meta"]
    assert meta["settings"]["vertical=8"]["vertical"] == 8 and meta["settings"]["vertical=8"]["slash"] == 2
    assert "coverage=0.3" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--coverages", "1.5"], ["--coverages", "x"], ["--block", "24"],
                                 ["--settings", "vertical"], ["--settings", "slash=0"], ["--settings", "nope=1"],
                                 ["--coverages", "", "--settings", ""]])
def test_bad_options_exit_2_before_loading_a_model(bad, capsys):
    assert mc.main(["--model", "/nonexistent/model", *bad]) == 2
    assert "minference_coverage: error:" in capsys.readouterr().err
