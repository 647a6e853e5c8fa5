"""Runner (grid, resumability, schema), reports, the bench CLI and teacher-forced scoring."""

from __future__ import annotations

import argparse
import gzip
import json
import math

import pytest
import torch

from kvsift.eval.cli import add_bench_parser, run_bench
from kvsift.eval.fakes import ReadingBackend, WordTokenizer
from kvsift.eval.report import markdown_table, write_report
from kvsift.eval.runner import (BenchConfig, budget_label, cell_key, kept_tokens, load_rows, parse_budget,
                                run_grid)
from kvsift.eval.tasks import TaskConfig


def _config(**kw):
    base = dict(tasks=["niah", "ppl"], methods=["full", "snapkv"], budgets=["0.25", "0.5", "64"], lengths=[300, 500],
                seeds=[0], task_config=TaskConfig(depths=(0.0, 0.5, 1.0), ppl_tokens=16))
    base.update(kw)
    return BenchConfig(**base)


def _c(counts):
    return {k: counts[k] for k in ("run", "skipped", "errors")}


def test_budget_parsing_and_keys():
    assert parse_budget("0.25") == 0.25 and parse_budget("25%") == 0.25 and parse_budget("256") == 256
    assert parse_budget("full") is None and parse_budget(512.0) == 512
    for bad in ("0", "1.5", "-3", "abc", True):
        with pytest.raises(ValueError):
            parse_budget(bad)
    assert budget_label(None) == "full" and budget_label(0.1) == "0.1" and budget_label(64) == "64"
    assert kept_tokens(0.25, 970) == 243 and kept_tokens(64, 50) == 50 and kept_tokens(None, 7) == 7
    assert cell_key("niah", "snapkv", 0.25, 1024, 0) == "niah|snapkv|0.25|1024|0"
    with pytest.raises(ValueError, match="unknown task"):
        _config(tasks=["nope"])
    with pytest.raises(ValueError, match="need at least one budget"):
        _config(budgets=["full"])
    cells = _config().cells()
    assert len(cells) == 2 * 2 * (1 + 3)  # full runs once per (task, length, seed)


def test_grid_rows_and_resume(tmp_path):
    out = tmp_path / "r.jsonl"
    backend = ReadingBackend(WordTokenizer())
    cfg = _config()
    counts = run_grid(backend, cfg, out, progress=False)
    assert _c(counts) == {"run": 16, "skipped": 0, "errors": 0}
    rows = load_rows(out)
    assert len(rows) == 16 and len({r["key"] for r in rows}) == 16
    niah_full = next(r for r in rows if r["key"] == "niah|full|full|500|0")
    assert niah_full["score"] == 1.0 and niah_full["n_samples"] == 3
    assert [s["depth"] for s in niah_full["samples"]] == [0.0, 0.5, 1.0]
    assert niah_full["kv_kept_bytes"] == niah_full["kv_full_bytes"]
    small = next(r for r in rows if r["key"] == "niah|snapkv|0.25|500|0")
    assert small["score"] < 1.0 and small["kv_kept_bytes"] < small["kv_full_bytes"]
    ppl = next(r for r in rows if r["key"] == "ppl|full|full|300|0")
    assert ppl["score"] is None and ppl["ppl"] == pytest.approx(math.exp(2.0))
    for r in rows:
        for k in ("task", "method", "budget", "length", "seed", "backend", "model", "kv_device_bytes",
                  "kv_host_bytes", "prefill_s", "decode_ms_per_token", "samples"):
            assert k in r, k

    # a rerun skips every finished cell and calls the model zero times
    calls = backend.calls
    assert _c(run_grid(backend, cfg, out, progress=False)) == {"run": 0, "skipped": 16, "errors": 0}
    assert backend.calls == calls
    # an interrupted run (last row lost, a torn line left behind) is completed by the rerun
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    assert _c(run_grid(backend, cfg, out, progress=False)) == {"run": 1, "skipped": 15, "errors": 0}
    assert len(load_rows(out)) == 16
    # a wider grid only runs the new cells
    assert run_grid(backend, _config(lengths=[300, 500, 700]), out, progress=False)["run"] == 8


def test_gzip_results_resume_in_place(tmp_path, capsys):
    """A ``.jsonl.gz`` results file (how large committed results are kept) is appended to as gzip
    members, resumes like a plain one (a torn member is cut, the cell rerun), and one that holds
    plain rows after its members is refused before any work, losing nothing."""
    out = tmp_path / "r.jsonl.gz"
    backend = ReadingBackend(WordTokenizer())
    assert _c(run_grid(backend, _config(), out, progress=False)) == {"run": 16, "skipped": 0, "errors": 0}
    plain = gzip.decompress(out.read_bytes()).decode().splitlines()   # a standard reader sees every row
    assert len(plain) == 16 and {json.loads(x)["key"] for x in plain} == {r["key"] for r in load_rows(out)}
    assert _c(run_grid(backend, _config(), out, progress=False)) == {"run": 0, "skipped": 16, "errors": 0}
    # an append cut mid-member (the process killed): the rows before it are kept, the lost one rerun
    out.write_bytes(out.read_bytes()[:-7])
    assert len(load_rows(out)) == 15
    assert _c(run_grid(backend, _config(), out, progress=False)) == {"run": 1, "skipped": 15, "errors": 0}
    assert len(gzip.decompress(out.read_bytes()).decode().splitlines()) == 16
    # plain text after the members (appended by an older kvsift): a clear error, the file untouched
    before = out.read_bytes() + b'{"key": "x|full|full|1|0"}\n'
    out.write_bytes(before)
    ap = argparse.ArgumentParser()
    add_bench_parser(ap.add_subparsers(dest="command"))
    with pytest.raises(ValueError, match="not gzip data"):
        run_bench(ap.parse_args(["bench", "run", "--backend", "fake", "--tasks", "niah", "--methods", "full",
                                   "--lengths", "300", "--out", str(out)]))
    assert out.read_bytes() == before


def test_errors_are_recorded_and_retried(tmp_path):
    out = tmp_path / "r.jsonl"
    backend = ReadingBackend(WordTokenizer())
    cfg = _config(tasks=["niah"], lengths=[20], budgets=["0.5"])  # too short for the task's prompt
    counts = run_grid(backend, cfg, out, progress=False, log=None)
    assert counts["errors"] == 2 and counts["run"] == 0
    rows = load_rows(out)
    assert all("too short" in r["error"] for r in rows)
    assert run_grid(backend, cfg, out, progress=False, log=None)["errors"] == 2  # failed cells are retried
    assert "2 cell(s) failed" in markdown_table(rows)


def test_report_files(tmp_path):
    out = tmp_path / "r.jsonl"
    run_grid(ReadingBackend(WordTokenizer()), _config(), out, progress=False)
    # rows of a peer (another backend) in another file appear in the same table
    peer = tmp_path / "peer.jsonl"
    rows = load_rows(out)
    with peer.open("w") as f:
        for r in rows:
            if r["method"] == "snapkv":
                r = dict(r, method="kvpress:snapkv", backend="kvpress",
                         key=r["key"].replace("|snapkv|", "|kvpress:snapkv|"))
                f.write(json.dumps(r) + "\n")
    res = write_report([out, peer], tmp_path / "rep")
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert res["rows"] == 16 + 12
    assert "### niah" in md and "### ppl" in md
    for m in ("| full |", "| snapkv |", "| kvpress:snapkv |"):
        assert m in md
    assert md.count("| niah | 500 |") == 1 + 3 + 3
    names = sorted(p.name for p in res["plots"])
    assert names == sorted(["niah_heatmap_full.png", "niah_heatmap_snapkv.png", "niah_heatmap_kvpress_snapkv.png",
                            "niah_vs_budget.png", "ppl_vs_budget.png", "memory.png", "accuracy_vs_kv.png", "kept_vs_kv.png",
                            "niah_heatmaps_0.25.png"])
    for p in res["plots"]:
        assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"


def test_bench_cli(tmp_path, capsys):
    ap = argparse.ArgumentParser()
    add_bench_parser(ap.add_subparsers(dest="command"))
    out = tmp_path / "res.jsonl"
    args = ap.parse_args(["bench", "run", "--backend", "fake", "--tasks", "niah,mk_niah", "--methods", "full,snapkv",
                          "--budgets", "0.5", "--lengths", "400", "--depths", "0.5", "--samples", "1", "--out", str(out),
                          "--report", str(tmp_path / "rep"), "--no-progress"])
    assert run_bench(args) == 0
    assert len(load_rows(out)) == 4 and (tmp_path / "rep" / "niah_heatmap_snapkv.png").exists()
    args = ap.parse_args(["bench", "report", str(out), "--out", str(tmp_path / "rep2")])
    assert run_bench(args) == 0
    assert "| mk_niah | 400 | snapkv | 0.5 |" in capsys.readouterr().out
    assert run_bench(ap.parse_args(["bench", "tasks"])) == 0
    assert "cwe" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ap.parse_args(["bench", "run", "--lengths", "1k"])


def test_teacher_forced_scoring_matches_plain_forward(tiny_llm):
    """Full cache: the NLL over the engine's cache equals one plain forward over the whole text;
    a compressed cache changes it and holds fewer KV bytes."""
    from kvsift.eval.perplexity import score_continuation

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (1, 160), generator=g)
    ctx, cont = ids[0, :128].tolist(), ids[0, 128:].tolist()
    with torch.no_grad():
        logits = tiny_llm.model(input_ids=ids).logits[0, 127:-1].float()
    ref = -torch.log_softmax(logits, -1).gather(-1, ids[0, 128:, None]).sum().item()
    full = score_continuation(tiny_llm, ctx, cont, "full")
    assert full.n_tokens == 32 and full.nll_sum == pytest.approx(ref, rel=1e-4)
    snap = score_continuation(tiny_llm, ctx, cont, "snapkv", 0.25)
    assert snap.kv_kept_bytes < full.kv_kept_bytes and snap.nll_sum != pytest.approx(ref, rel=1e-4)
    with pytest.raises(ValueError):
        score_continuation(tiny_llm, [], cont)


@pytest.mark.real
def test_real_model_niah_end_to_end(real_llm, tmp_path):
    """The small real model finds a needle in a 512-token haystack with the full cache; a compressed
    run records fewer KV bytes; the report has both rows."""
    from kvsift.eval.runner import KvsiftBackend

    out = tmp_path / "r.jsonl"
    cfg = BenchConfig(tasks=["niah"], methods=["full", "snapkv"], budgets=[0.5], lengths=[512], seeds=[0],
                      task_config=TaskConfig(depths=(0.5,)))
    assert run_grid(KvsiftBackend(real_llm), cfg, out, progress=False)["run"] == 2
    rows = {r["method"]: r for r in load_rows(out)}
    assert rows["full"]["score"] == 1.0, rows["full"]["samples"]
    assert rows["snapkv"]["kv_kept_bytes"] < 0.6 * rows["full"]["kv_kept_bytes"]
    assert rows["full"]["prefill_s"] > 0 and rows["full"]["decode_ms_per_token"] > 0
    assert rows["full"]["settings"]["prefill_attention"] == "sdpa"   # the CPU; "cudnn" or "flash" on CUDA
    assert 0 < rows["full"]["steady_ms_per_token"] and all(s["steady_ms_per_token"] > 0 for s in rows["full"]["samples"])
    md = (write_report(out, tmp_path / "rep")["markdown"]).read_text()
    assert "| niah | 512 | snapkv | 0.5 |" in md


def test_rows_carry_the_methods_counters(tiny_llm, tmp_path):
    """A method's own counters (the engine's ``stats.method_stats``) reach each sample and the cell's
    row, averaged over the samples: TokenSelect's selection cache at a threshold every query passes
    reuses at every step after a layer's first; at one none passes, it never does; ``full`` has none."""
    from kvsift.eval.runner import KvsiftBackend

    cfg = BenchConfig(tasks=["niah"], methods=["full", "tokenselect[reuse_threshold=-1.0]",
                                               "tokenselect[reuse_threshold=1.0]"], budgets=["0.5"],
                      lengths=[200], seeds=[0], task_config=TaskConfig(depths=(0.5,), samples=2))
    out = tmp_path / "stats.jsonl"
    assert run_grid(KvsiftBackend(tiny_llm), cfg, out, progress=False)["run"] == 3
    rows = {r["method"]: r for r in load_rows(out)}
    always, never = rows["tokenselect[reuse_threshold=-1.0]"], rows["tokenselect[reuse_threshold=1.0]"]
    assert all(s["method_stats"]["reuse_rate"] > 0.5 for s in always["samples"])
    assert always["method_stats"]["reuse_rate"] == pytest.approx(
        sum(s["method_stats"]["reuse_rate"] for s in always["samples"]) / 2)
    assert never["method_stats"] == {"reuse_rate": 0.0}
    assert "method_stats" not in rows["full"] and all("method_stats" not in s for s in rows["full"]["samples"])

def test_method_labels_carry_options_and_name_their_rows(tiny_llm, tmp_path):
    """``kivi[bits=2]`` builds kivi with bits=2 and names its own rows (so int4 and int2 are two
    cells of one grid); codecs that keep every token (kivi alone) run once, at no budget, like full;
    the label's options override --method-opt's; a bad label is an error before anything runs."""
    from kvsift.eval.cli import _csv
    from kvsift.eval.runner import KvsiftBackend, budgetless, method_options, split_label

    assert _csv("full,kivi[bits=2,group=64],adakv(snapkv)") == ["full", "kivi[bits=2,group=64]", "adakv(snapkv)"]
    assert split_label("kivi[bits=2, group=64]") == ("kivi", {"bits": 2, "group": 64})
    assert split_label("snapkv[pooling=max]") == ("snapkv", {"pooling": "max"})
    assert split_label("adakv(snapkv)") == ("adakv(snapkv)", {})
    assert method_options("kivi[bits=2]", {"kivi": {"bits": 4, "residual": 32}}) == ("kivi", {"bits": 2, "residual": 32})
    for bad in ("kivi[bits]", "kivi[bits=2", "kivi[=2]"):
        with pytest.raises(ValueError, match="method label|option"):
            split_label(bad)
    assert budgetless("full") and budgetless("kvpress:full") and budgetless("kivi[bits=2]") and budgetless("minference")
    assert not budgetless("duo")   # needs no budget but uses one
    assert not budgetless("snapkv+kivi") and not budgetless("snapkv") and not budgetless("kvpress:snapkv")

    cfg = BenchConfig(tasks=["niah"], methods=["kivi", "kivi[bits=2]", "snapkv[window=8]"], budgets=["0.5"],
                      lengths=[200], seeds=[0], task_config=TaskConfig(depths=(0.5,), samples=1))
    assert [(c[3], c[4]) for c in cfg.cells()] == [("kivi", None), ("kivi[bits=2]", None), ("snapkv[window=8]", 0.5)]
    assert BenchConfig(tasks=["niah"], methods=["kivi"], budgets=["full"], lengths=[200]).cells()  # no budget needed

    out = tmp_path / "labels.jsonl"
    assert run_grid(KvsiftBackend(tiny_llm), cfg, out, progress=False)["run"] == 3
    rows = {r["method"]: r for r in load_rows(out)}
    assert rows["kivi[bits=2]"]["key"] == "niah|kivi[bits=2]|full|200|0"
    s4, s2 = rows["kivi"]["samples"][0], rows["kivi[bits=2]"]["samples"][0]
    assert s2["kv_device_bytes"] < s4["kv_device_bytes"]   # really built with bits=2
    assert rows["snapkv[window=8]"]["samples"][0]["kv_kept_bytes"] < s4["kv_full_bytes"]

    ap = argparse.ArgumentParser()
    add_bench_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["bench", "run", "--tasks", "niah", "--methods", "kivi[bits=3]", "--budgets", "full",
                          "--lengths", "200", "--out", str(tmp_path / "bad.jsonl")])
    with pytest.raises(Exception, match="bits"):
        run_bench(args)
    assert not (tmp_path / "bad.jsonl").exists()


def test_grid_encodes_each_prompt_once_per_prompt_set(tmp_path):
    """Every cell of a prompt set reuses its samples' token ids (a 30k prompt is ~70 ms to encode):
    each prompt is encoded once per set, not once per (method, budget), and the rows are unchanged."""
    from collections import Counter

    from kvsift.eval.tasks import TaskBuilder

    class CountingTokenizer(WordTokenizer):
        def __init__(self):
            super().__init__()
            self.texts = Counter()

        def encode(self, text, add_special_tokens=False):
            self.texts[text] += 1
            return super().encode(text, add_special_tokens)

    cfg = _config(tasks=["niah"], lengths=[300, 500])
    built = CountingTokenizer()  # the builder's own encodes (it fits each prompt to its length)
    prompts = [s.prompt for n in (300, 500) for s in TaskBuilder(built, cfg.task_config).build("niah", n, 0)]
    counting = CountingTokenizer()
    run_grid(ReadingBackend(counting), cfg, tmp_path / "a.jsonl", progress=False)
    assert len(prompts) == 6 and len(cfg.cells()) == 8
    # beyond the builder's, the runner encodes each prompt once for all 4 cells of its set
    assert [counting.texts[p] - built.texts[p] for p in prompts] == [1] * 6
    run_grid(ReadingBackend(WordTokenizer()), cfg, tmp_path / "b.jsonl", progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_s", "time")} for r in rows]  # noqa: E731
    assert strip(load_rows(tmp_path / "a.jsonl")) == strip(load_rows(tmp_path / "b.jsonl"))
