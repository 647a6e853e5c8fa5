"""Eval at scale: batched backends, N samples per task, suites, --max-minutes, intervals and reports."""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics

import pytest

from kvsift.eval import stats
from kvsift.eval.cli import add_bench_parser, resolve_plan, run_bench
from kvsift.eval.fakes import ReadingBackend, WordTokenizer
from kvsift.eval.report import (bar_markdown, bar_rows, baselines_markdown, cell_stats, kept_points, leaderboard,
                                 markdown_table, write_report)
from kvsift.eval.runner import (BenchConfig, BaseBackend, estimate_batch_size, load_rows, run_cell, run_grid)
from kvsift.eval.tasks import TASKS, TaskBuilder, TaskConfig
from tests.conftest import random_prompt


def _parser():
    ap = argparse.ArgumentParser()
    add_bench_parser(ap.add_subparsers(dest="command"))
    return ap


# ---- intervals ---------------------------------------------------------------------------------

def test_wilson_known_values():
    # reference values (Wilson score interval, z = 1.96)
    assert stats.wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert stats.wilson(15, 30) == pytest.approx((0.3315, 0.6685), abs=1e-4)
    assert stats.wilson(0, 30) == pytest.approx((0.0, 0.1135), abs=1e-4)
    assert stats.wilson(30, 30) == pytest.approx((0.8865, 1.0), abs=1e-4)
    m, lo, hi, kind = stats.mean_ci([1] * 8 + [0] * 2)
    assert (m, kind) == (0.8, "wilson") and (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    with pytest.raises(ValueError):
        stats.wilson(3, 2)


def test_bootstrap_interval_matches_normal_theory_and_is_seeded():
    xs = [(i % 5) / 4 for i in range(400)]  # fractional scores 0, .25, .5, .75, 1
    m = statistics.fmean(xs)
    half = 1.96 * statistics.pstdev(xs) / math.sqrt(len(xs))
    mean, lo, hi, kind = stats.mean_ci(xs)
    assert kind == "bootstrap" and mean == pytest.approx(0.5)
    assert lo == pytest.approx(m - half, abs=0.006) and hi == pytest.approx(m + half, abs=0.006)
    assert stats.bootstrap_ci(xs) == stats.bootstrap_ci(xs)            # fixed seed: reproducible
    assert stats.bootstrap_ci(xs, seed=1) != stats.bootstrap_ci(xs)
    assert stats.bootstrap_ci([0.5] * 7) == (0.5, 0.5)
    # perplexity: interval of exp(mean NLL)
    lo, hi = stats.bootstrap_ci([2.0, 2.2, 1.8, 2.1], "exp_mean")
    assert lo < math.exp(2.025) < hi


def test_pooled_paired_diff_keeps_each_task_in_its_stratum():
    # task 1: A wins 10 of 20; task 2: equal on 40 -> +10/60 overall
    t1 = ([1.0] * 10 + [0.0] * 10, [0.0] * 20)
    t2 = ([0.5] * 40, [0.5] * 40)
    d = stats.pooled_paired_diff([t1, t2])
    assert d["diff"] == pytest.approx(10 / 60) and d["n"] == 60 and d["significant"] and 0 < d["lo"] < d["hi"] < 1
    # a replicate never moves samples between tasks: task 2 (no difference) only dilutes
    assert d["hi"] <= 20 / 60 + 1e-9
    assert stats.pooled_paired_diff([t2]) == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "n": 40, "significant": False}
    assert stats.pooled_paired_diff([t1]) == stats.pooled_paired_diff([t1])   # seeded: reproducible
    for bad in ([], [([1.0], [1.0, 0.0])], [([], [])]):
        with pytest.raises(ValueError):
            stats.pooled_paired_diff(bad)


def test_bench_compare_pairs_two_methods(tmp_path, capsys):
    """kvsift bench compare: A against B on the samples both ran, per length, B at A's budget or at
    its only one (full)."""
    from kvsift.cli import main
    from kvsift.eval.report import paired_comparison

    def row(task, method, budget, length, scores, start=0):
        samples = [{"sample_id": f"{task}-{start + i}", "score": v} for i, v in enumerate(scores)]
        return {"key": f"{task}|{method}|{budget}|{length}|0", "task": task, "method": method, "budget": budget,
                "length": length, "seed": 0, "compress": "prompt", "backend": "kvsift", "n_samples": len(scores),
                "score": sum(scores) / len(scores), "samples": samples}

    rows = [row("niah", "a[x=1]", "0.1", 100, [1, 1, 0, 1]), row("niah", "b", "0.1", 100, [1, 0, 0, 0, 1, 1], start=0),
            row("qa", "a[x=1]", "0.1", 100, [0.5, 0.5]), row("qa", "b", "0.1", 100, [0.5, 0.0]),
            row("niah", "full", "full", 100, [1, 1, 1, 1]), row("niah", "a[x=1]", "0.1", 200, [1, 0]),
            row("niah", "b", "0.5", 200, [0, 0])]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    comp = paired_comparison(load_rows(path), "a[x=1]", "b")
    assert [(c["length"], c["budget"], c["n"]) for c in comp] == [(100, "0.1", 6), (200, "0.1", 2), ("all", "0.1", 8)]
    c = comp[0]
    assert c["tasks"]["niah"] == (4, 0.75, 0.25) and c["tasks"]["qa"] == (2, 0.5, 0.25)
    assert c["diff"] == pytest.approx((3 - 1 + 1.0 - 0.5) / 6) and c["a"] == pytest.approx(4 / 6)
    # the lengths pooled: every (task, length) cell a stratum, the task columns over both lengths
    pool = comp[2]
    assert pool["tasks"]["niah"] == (6, pytest.approx(4 / 6), pytest.approx(1 / 6)) and pool["tasks"]["qa"] == (2, 0.5, 0.25)
    assert pool["diff"] == pytest.approx((3 - 1 + 1.0 - 0.5 + 1) / 8) and pool["lo"] <= pool["diff"] <= pool["hi"]
    # B's budget named: at 200 tokens B ran only 0.5, so no pair there
    assert [c["length"] for c in paired_comparison(load_rows(path), "a[x=1]", "b", budget_b="0.1")] == [100]
    vs_full = paired_comparison(load_rows(path), "a[x=1]", "full")
    assert [(c["length"], c["n"], c["diff"]) for c in vs_full] == [(100, 4, pytest.approx(-0.25))]
    assert main(["bench", "compare", "a[x=1]", "b", str(path), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "| 100 | 0.1 | 6 |" in out and "| all | 0.1 | 8 |" in out and "A = `a[x=1]`, B = `b`" in out
    assert json.loads((tmp_path / "c.json").read_text())[0]["n"] == 6
    assert main(["bench", "compare", "a[x=1]", "nope", str(path)]) == 2
    assert "kvsift: error: no samples that both" in capsys.readouterr().err
    assert main(["bench", "compare", "a", "b", str(tmp_path / "missing.jsonl")]) == 2
    # only some tasks / lengths: the 'all' row pools just those cells
    only = paired_comparison(load_rows(path), "a[x=1]", "b", tasks=["niah"], lengths=[100])
    assert [(c["length"], c["n"], set(c["tasks"])) for c in only] == [(100, 4, {"niah"})]
    assert only[0]["diff"] == pytest.approx(0.5)
    assert main(["bench", "compare", "a[x=1]", "b", str(path), "--tasks", "niah", "--lengths", "100,200"]) == 0
    out = capsys.readouterr().out
    assert "| 100 | 0.1 | 4 |" in out and "| all | 0.1 | 6 |" in out and "qa" not in out
    assert main(["bench", "compare", "a[x=1]", "b", str(path), "--tasks", "nope"]) == 2
    assert "kvsift: error: unknown task(s) nope; available:" in capsys.readouterr().err
    assert main(["bench", "compare", "a[x=1]", "b", str(path), "--lengths", "300"]) == 2
    assert "(only lengths 300)" in capsys.readouterr().err
    assert main(["bench", "compare", "a[x=1]", "b", str(path), "--lengths", "0"]) == 2


def test_bench_compare_pairs_perplexity_rows(tmp_path, capsys):
    """The perplexity task: paired on each sample's NLL per token, reported as A's perplexity over
    B's with the bootstrap interval mapped through exp; kept apart from the scores' table."""
    from kvsift.cli import main
    from kvsift.eval.report import paired_comparison

    def row(task, method, budget, values):
        key = "nll_sum" if task == "ppl" else "score"
        samples = [{"sample_id": f"{task}-{i}", key: v, "n_tokens": 4} for i, v in enumerate(values)]
        return {"key": f"{task}|{method}|{budget}|100|0", "task": task, "method": method, "budget": budget,
                "length": 100, "seed": 0, "compress": "prompt", "backend": "kvsift", "n_samples": len(values),
                "samples": samples}

    a_nll, b_nll = [4.0, 8.0, 6.0, 10.0], [4.0, 6.0, 4.0, 8.0]   # per token: a 1, 2, 1.5, 2.5; b 1, 1.5, 1, 2
    rows = [row("ppl", "a", "0.1", a_nll), row("ppl", "full", "full", b_nll), row("niah", "a", "0.1", [1, 0]),
            row("niah", "full", "full", [1, 1])]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [c["tasks"].keys() for c in paired_comparison(load_rows(path), "a", "full")] == [{"niah"}]
    (c,) = paired_comparison(load_rows(path), "a", "full", perplexity=True)
    assert c["n"] == 4 and c["diff"] == pytest.approx(0.375)
    assert c["a_ppl"] == pytest.approx(math.exp(1.75)) and c["b_ppl"] == pytest.approx(math.exp(1.375))
    assert c["ratio"] == pytest.approx(math.exp(0.375)) and c["ratio_lo"] == pytest.approx(math.exp(c["lo"]))
    assert 1 < c["ratio_lo"] <= c["ratio"] <= c["ratio_hi"] and c["significant"]
    assert main(["bench", "compare", "a", "full", str(path), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "| 100 | 0.1 | 2 |" in out and f"| 100 | 0.1 | 4 | {math.exp(1.75):.3f} | {math.exp(1.375):.3f} | " in out
    assert [("ratio" in c) for c in json.loads((tmp_path / "c.json").read_text())] == [False, True]
    # only perplexity rows: the perplexity table alone
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert main(["bench", "compare", "a", "full", str(path)]) == 0
    assert "A perplexity" in (out := capsys.readouterr().out) and "A - B" not in out


def test_paired_significance():
    full = [1.0] * 30
    same = stats.paired_bootstrap(full, full)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "significant": False}
    one = stats.paired_bootstrap([0.0] + [1.0] * 29, full)     # one sample lost: not significant
    assert one["diff"] == pytest.approx(-1 / 30) and not one["significant"] and one["hi"] == 0.0
    ten = stats.paired_bootstrap([0.0] * 10 + [1.0] * 20, full)
    assert ten["significant"] and ten["hi"] < 0
    # same mean, different samples: pairing sees the difference is zero on average
    a, b = [1, 0] * 15, [0, 1] * 15
    assert not stats.paired_bootstrap(a, b)["significant"]
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1, 0], [1])


def test_kept_fraction():
    v, lo, hi = stats.kept_fraction([0.5] * 10, [1.0] * 10)
    assert (v, lo, hi) == (0.5, 0.5, 0.5)
    v, lo, hi = stats.kept_fraction([2.2] * 4, [2.0] * 4, "exp_mean", higher_is_better=False)  # ppl
    assert v == pytest.approx(math.exp(-0.2))
    assert math.isnan(stats.kept_fraction([1.0], [0.0])[0])
    pooled = stats.pooled_kept_fraction([([0.5] * 4, [1.0] * 4), ([1.0] * 4, [1.0] * 4), ([1.0] * 4, [0.0] * 4)])
    assert pooled["value"] == pytest.approx(0.75) and pooled["cells"] == 2


# ---- samples and suites ------------------------------------------------------------------------

def test_n_samples_for_every_task_and_deterministic_by_index():
    tok = WordTokenizer()
    b7 = TaskBuilder(tok, TaskConfig(samples=7, depths=(0.0, 0.5, 1.0), ppl_tokens=16))
    b4 = TaskBuilder(WordTokenizer(), TaskConfig(samples=4, depths=(0.0, 0.5, 1.0), ppl_tokens=16))
    for task in TASKS:
        s7, s4 = b7.build(task, 400, 0), b4.build(task, 400, 0)
        assert len(s7) == 7 and len({s.sample_id for s in s7}) == 7, task
        # sample i does not depend on how many samples were asked for
        assert [s.prompt for s in s7[:4]] == [s.prompt for s in s4], task
    niah = b7.build("niah", 400, 0)
    assert [s.meta["depth"] for s in niah] == [0.0, 0.5, 1.0] * 2 + [0.0]
    assert [s.meta["repeat"] for s in niah] == [0, 0, 0, 1, 1, 1, 2]
    assert len({s.answers[0] for s in niah}) == 7  # every repeat has its own needle
    # the first pass over the grid is what one-sample-per-depth runs (samples=None) built
    old = TaskBuilder(WordTokenizer(), TaskConfig(depths=(0.0, 0.5, 1.0))).build("niah", 400, 0)
    assert [s.sample_id for s in old] == [s.sample_id for s in niah[:3]] == \
        ["niah/L400/s0/d0", "niah/L400/s0/d0.5", "niah/L400/s0/d1"]
    assert [s.prompt for s in old] == [s.prompt for s in niah[:3]]
    assert niah[3].sample_id == "niah/L400/s0/d0/r1"
    assert TaskConfig().n_samples("niah") == 5 and TaskConfig().n_samples("qa") == 2
    with pytest.raises(ValueError):
        TaskConfig(samples=0)


def test_suite_expansion_and_narrowing():
    from kvsift.methods import available_methods

    ap = _parser()
    methods = list(available_methods())
    plan = resolve_plan(ap.parse_args(["bench", "run", "--suite", "standard"]))
    assert plan["tasks"] == ["niah", "mk_niah", "mv_niah", "vt", "qa", "cwe", "ppl"]
    assert plan["lengths"] == [4096, 8192, 16384, 30000] and plan["budgets"] == ["0.02", "0.05", "0.1", "0.25"]
    assert plan["methods"] == methods and plan["samples"] == 30
    cfg = BenchConfig(tasks=plan["tasks"], methods=plan["methods"], budgets=plan["budgets"],
                      lengths=plan["lengths"], seeds=plan["seeds"])
    from kvsift.eval.runner import budgetless

    once = [m for m in methods if budgetless(m)]   # full, and kivi/minference: a budget changes nothing
    assert {"full", "kivi", "minference"} <= set(once)
    assert len(cfg.cells()) == 7 * 4 * (len(once) + 4 * (len(methods) - len(once)))
    narrow = resolve_plan(ap.parse_args(["bench", "run", "--suite", "standard", "--tasks", "niah", "--lengths",
                                         "4096", "--methods", "full,snapkv", "--budgets", "0.05"]))
    assert (narrow["tasks"], narrow["lengths"], narrow["methods"], narrow["budgets"], narrow["samples"]) == \
        (["niah"], [4096], ["full", "snapkv"], ["0.05"], 30)
    quick = resolve_plan(ap.parse_args(["bench", "run", "--suite", "quick"]))
    assert quick["lengths"] == [4096] and quick["methods"] == methods and quick["samples"] >= 3
    plain = resolve_plan(ap.parse_args(["bench", "run"]))  # no suite: the old defaults
    assert plain["tasks"] == ["niah"] and plain["methods"] == ["full", "snapkv"] and plain["samples"] is None
    with pytest.raises(SystemExit):
        ap.parse_args(["bench", "run", "--suite", "nope"])
    with pytest.raises(SystemExit):
        ap.parse_args(["bench", "run", "--batch-size", "0"])


# ---- batching ----------------------------------------------------------------------------------

def _niah_samples(n=6, length=400):
    tok = WordTokenizer()
    return tok, TaskBuilder(tok, TaskConfig(samples=n, depths=(0.0, 0.5, 1.0))).build("niah", length, 0)


def _strip(row):
    return [{k: v for k, v in e.items() if k != "batch"} for e in row["samples"]]


def test_run_cell_batches_keep_results_and_schema():
    tok, samples = _niah_samples(7)
    one = ReadingBackend(tok)
    r1 = run_cell(one, samples, "niah", "snapkv", 0.5, 400, 0, batch_size=1)
    four = ReadingBackend(tok)
    r4 = run_cell(four, samples, "niah", "snapkv", 0.5, 400, 0, batch_size=4, pad=True)
    assert four.batches == [4, 3] and r4["batch_size"] == 4 and r1["batch_size"] == 1
    assert _strip(r1) == _strip(r4) and [e["batch"] for e in r4["samples"]] == [4] * 4 + [3] * 3
    assert set(r1) == set(r4) and [set(e) for e in r1["samples"]] == [set(e) for e in r4["samples"]]
    auto = ReadingBackend(tok, auto_batch=3)
    run_cell(auto, samples, "niah", "snapkv", 0.5, 400, 0, pad=True)  # batch_size None: the backend's estimate
    assert auto.batches == [3, 3, 1]
    # by default a batch holds prompts of one length only (no padding)
    lengths = [s.prompt_tokens for s in samples]
    exact = ReadingBackend(tok)
    assert _strip(run_cell(exact, samples, "niah", "snapkv", 0.5, 400, 0, batch_size=7)) == _strip(r1)
    assert sorted(exact.batches) == sorted(lengths.count(n) for n in set(lengths))

    class Plain:  # a backend without generate_batch: one generate per sample
        name, model_name, tokenizer = "plain", "m", tok
        generate = ReadingBackend(tok).generate
    rp = run_cell(Plain(), samples, "niah", "snapkv", 0.5, 400, 0, batch_size=4, pad=True)
    assert _strip(rp) == _strip(r1)


def test_out_of_memory_halves_the_batch():
    tok, samples = _niah_samples(6)
    be = ReadingBackend(tok, max_rows=2)   # a batch of 3 or more: out of memory
    row = run_cell(be, samples, "niah", "full", None, 400, 0, batch_size=6, pad=True)
    assert be.batches == [2, 2, 2] and be.freed == 2 and row["batch_size"] == 2
    assert _strip(row) == _strip(run_cell(ReadingBackend(tok), samples, "niah", "full", None, 400, 0))

    class Broken(ReadingBackend):
        def generate_batch(self, prompts, method, budget, max_new_tokens):
            raise RuntimeError("not memory")
    with pytest.raises(RuntimeError, match="not memory"):
        run_cell(Broken(tok), samples, "niah", "full", None, 400, 0, batch_size=6, pad=True)


def test_estimate_batch_size():
    shape = dict(num_layers=28, num_kv_heads=2, head_dim=128, dtype_bytes=2, num_q_heads=12)  # Qwen2.5-1.5B, bf16
    from kvsift.engine.attention import MASK_ELEMENTS

    per_seq = 2 * 28 * 2 * 128 * 2 * 30017 + 16 * 12 * 128 * 2 * 512   # full KV + one chunk's activations
    free = 100 * 2**30
    # no per-sequence mask: an unpadded batch builds none, a padded one at most MASK_ELEMENTS per call
    assert estimate_batch_size(free, 30000, 16, **shape) == int((0.5 * free - 3 * MASK_ELEMENTS) // per_seq) == 59
    assert estimate_batch_size(free, 30000, 16, fraction=0.25, **shape) == \
        int((0.25 * free - 3 * MASK_ELEMENTS) // per_seq)
    assert estimate_batch_size(free, 4096, 16, cap=16, **shape) == 16
    assert estimate_batch_size(2**20, 30000, 16, **shape) == 1
    assert estimate_batch_size(0, 30000, 16, **shape) == 1


def test_estimate_batch_size_with_the_methods_own_kv():
    """With the engine's estimate of a method's KV (``kv_bytes(rows)``), the largest batch whose
    device bytes (plus one row's activations when prefilled row by row, else every row's) and host
    bytes fit: an eviction method at 5% gets far more rows of 30k than the full-KV count."""
    from kvsift.engine.attention import MASK_ELEMENTS

    shape = dict(num_layers=28, num_kv_heads=2, head_dim=128, dtype_bytes=2, num_q_heads=12)
    free, tok = 20 * 2**30, 2 * 28 * 2 * 128 * 2
    act = 16 * 12 * 128 * 2 * 512
    room = 0.5 * free - 3 * MASK_ELEMENTS
    full_kv = estimate_batch_size(free, 30000, 16, **shape)
    evict = lambda rows: ((30000 + (rows - 1) * 1500) * tok, 0, True)   # noqa: E731 - one whole row, the rest kept
    n = estimate_batch_size(free, 30000, 16, kv_bytes=evict, **shape)
    assert full_kv == int(room // (30017 * tok + act)) == 11 and n == 64 and evict(64)[0] + act <= room   # capped at 64
    assert estimate_batch_size(free, 30000, 16, kv_bytes=evict, cap=30, **shape) == 30
    # every row's whole KV, prefilled as one batch: every row's activations too, as without kv_bytes
    whole = lambda rows: (rows * 30017 * tok, 0, False)   # noqa: E731
    assert estimate_batch_size(free, 30000, 16, kv_bytes=whole, **shape) == full_kv
    # an offloading method: the host bytes bind (half of 10 GiB over 0.86 GB a row: 6 rows)
    host = lambda rows: (rows * 1500 * tok, rows * 30000 * tok, True)   # noqa: E731
    assert estimate_batch_size(free, 30000, 16, kv_bytes=host, free_host=10 * 2**30, **shape) == 6
    assert estimate_batch_size(free, 30000, 16, kv_bytes=host, free_host=0, **shape) == 1
    assert estimate_batch_size(0, 30000, 16, kv_bytes=evict, **shape) == 1


def test_kv_estimate_is_the_schedulers_charge(tiny_llm):
    """``LLM.kv_estimate`` (the eval's batch sizing) charges what ``LLM.request`` charges the
    scheduler for the same prompts; a decode-time selection keeps the whole prompt per row, also
    when prefilled row by row (a prefix store), where its budget was counted as kept before."""
    from kvsift import SamplingParams
    from kvsift.engine.prefix import PrefixStore

    per_tok = tiny_llm.kv_bytes_per_token
    ids = [[5] * 300] * 4
    try:
        for store in (None, PrefixStore(1 << 30)):
            tiny_llm.runner.prefix_store = store
            for spec, b in (("full", None), ("snapkv", 0.1), ("quest", 0.1), ("snapkv+quest", 0.1),
                            ("sentencekv", 0.1), ("kivi", None)):
                req = tiny_llm.request(ids, SamplingParams(max_tokens=8), method=spec, budget=b)
                est = tiny_llm.kv_estimate(4, 300, 8, method=spec, budget=b)
                assert est == (req.kv_bytes, req.host_bytes, tiny_llm.runner.rows_prefill(req.method, 4, None)), spec
            quest = tiny_llm.kv_estimate(4, 300, 8, method="quest", budget=0.1)
            assert quest[0] >= 4 * 300 * per_tok and quest[2] == (store is not None)
            assert tiny_llm.kv_estimate(4, 300, 8, method="snapkv", budget=0.1)[0] < 2 * 300 * per_tok
    finally:
        tiny_llm.runner.prefix_store = None
    # what a row keeps on the device after its prefill, against what it holds (stats): shadowkv's
    # factors and landmarks of every token count (before: its budget alone, a third of it here)
    p = [random_prompt(1000, seed=1)]
    for spec, b in (("shadowkv", 0.05), ("snapkv", 0.05), ("quest", 0.05), ("full", None)):
        held = tiny_llm.generate(p, SamplingParams(max_tokens=2, ignore_eos=True), method=spec,
                                 budget=b)[0].stats.kv_device_bytes
        kept = tiny_llm.request(p, SamplingParams(max_tokens=2), method=spec, budget=b).kept_tokens * per_tok
        assert 0.9 * held <= kept <= 1.1 * held, (spec, kept, held)
    with pytest.raises(ValueError):
        tiny_llm.kv_estimate(0, 300, 8)
    with pytest.raises(ValueError):
        tiny_llm.kv_estimate(2, 300, 8, method="nope")


def test_batched_equals_unbatched_on_a_tiny_model(tiny_llm, default_tokenizer):
    """Same tokens and scores whether the cell's samples go one by one or in one batch: padded
    batches (prompts of different lengths: left padding; sentencekv prefills row by row into one
    host store) for methods that do not depend on padding, and a batch of equal lengths (the
    default grouping) for quest, whose pages shift with left padding."""
    from kvsift.eval.runner import KvsiftBackend

    backend = KvsiftBackend(tiny_llm)
    assert backend.auto_batch_size(200, 16, "full", None) == 1  # CPU: one at a time
    builder = TaskBuilder(default_tokenizer, TaskConfig(samples=3, depths=(0.0, 0.5, 1.0)))
    mixed = builder.build("niah", 180, 0)[:1] + builder.build("niah", 220, 0)[1:]
    equal = builder.build("niah", 200, 0)
    assert len({s.prompt_tokens for s in mixed}) == 3 and len({s.prompt_tokens for s in equal}) == 1
    for s in mixed + equal:
        s.max_new_tokens = 6  # keeps the test fast; the answers still have to match token for token
    for method, budget, samples, pad in (("full", None, mixed, True), ("sentencekv", 0.25, mixed, True),
                                         ("quest", 0.25, equal, False)):
        r1 = run_cell(backend, samples, "niah", method, budget, 200, 0, batch_size=1)
        r3 = run_cell(backend, samples, "niah", method, budget, 200, 0, batch_size=3, pad=pad)
        assert r3["batch_size"] == 3 and [e["batch"] for e in r3["samples"]] == [3, 3, 3]
        assert r3["settings"] == {"chunk_size": 64, "prefill_mode": "auto", "decode_mode": "auto",
                                  "dtype": "float32", "device": "cpu", "prefill_attention": "sdpa",
                                  "batch_padding": pad, "compress": "prompt"}
        assert [e["prediction"] for e in r1["samples"]] == [e["prediction"] for e in r3["samples"]], method
        assert [e["score"] for e in r1["samples"]] == [e["score"] for e in r3["samples"]], method
        assert [e["kv_full_bytes"] for e in r1["samples"]] == [e["kv_full_bytes"] for e in r3["samples"]]
        assert [e["prompt_tokens"] for e in r3["samples"]] == [s.prompt_tokens for s in samples]
    # without padding allowed, mixed lengths are never batched together
    assert run_cell(backend, mixed, "niah", "full", None, 200, 0, batch_size=3)["batch_size"] == 1


# ---- resumable parts ---------------------------------------------------------------------------

class _Clock:
    """Advances 10 s per reading."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 10.0
        return self.t


def test_max_minutes_stops_and_resumes_without_duplicates(tmp_path):
    out = tmp_path / "r.jsonl"
    cfg = BenchConfig(tasks=["niah", "mk_niah"], methods=["full", "snapkv", "streaming"], budgets=["0.25", "0.5"],
                      lengths=[300], task_config=TaskConfig(samples=2, depths=(0.5,)))
    total = len(cfg.cells())  # 2 tasks x (1 + 2 x 2) = 10
    backend = ReadingBackend(WordTokenizer())
    logs: list[str] = []
    first = run_grid(backend, cfg, out, progress=False, max_minutes=1.0, clock=_Clock(), log=logs.append)
    assert first["stopped"] and 0 < first["run"] < total and first["left"] == total - first["run"]
    assert sum(line.startswith("[bench] ") and " s" in line for line in logs) >= first["run"]
    assert any("stopped after --max-minutes 1" in line and f"{first['left']} cell(s) left" in line for line in logs)
    second = run_grid(backend, cfg, out, progress=False, max_minutes=1.0, clock=_Clock(), log=None)
    rest = run_grid(backend, cfg, out, progress=False, log=None)
    assert not rest["stopped"] and rest["left"] == 0
    assert first["run"] + second["run"] + rest["run"] == total
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == total  # no cell ran twice
    assert run_grid(backend, cfg, out, progress=False, log=None)["run"] == 0


def test_cli_parts_and_report(tmp_path, capsys):
    ap = _parser()
    out = tmp_path / "r.jsonl"
    argv = ["bench", "run", "--backend", "fake", "--suite", "quick", "--tasks", "niah,mv_niah", "--lengths", "400",
            "--methods", "full,snapkv", "--samples", "4", "--out", str(out), "--no-progress", "--max-minutes", "0"]
    assert run_bench(ap.parse_args(argv)) == 0
    err = capsys.readouterr().err
    assert "suite quick: 6 cell(s)" in err and "stopped after --max-minutes 0" in err and "5 left" in err
    assert len(load_rows(out)) == 1
    assert run_bench(ap.parse_args(argv[:-2] + ["--report", str(tmp_path / "rep")])) == 0
    rows = load_rows(out)
    assert len(rows) == 6 and all(r["n_samples"] == 4 for r in rows)
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert "### Leaderboard: fraction of the full-cache score kept" in md and "| snapkv |" in md
    assert (tmp_path / "rep" / "accuracy_vs_kv.png").exists()
    assert (tmp_path / "rep" / "niah_heatmaps_0.05.png").exists()


def test_a_ppl_row_scored_on_another_text_is_run_again(tmp_path):
    """Rows carry their ppl text; a row made on another one (older rows: chapters I-III) is not the
    cell, so the rerun replaces it and the other tasks' rows stay done."""
    out = tmp_path / "r.jsonl"
    cfg = BenchConfig(tasks=["ppl", "niah"], methods=["full"], budgets=[], lengths=[300],
                      task_config=TaskConfig(samples=2, ppl_tokens=8))
    backend = ReadingBackend(WordTokenizer())
    assert run_grid(backend, cfg, out, progress=False)["run"] == 2
    rows = load_rows(out)
    assert [r["settings"].get("ppl_text") for r in rows if r["task"] == "ppl"] == ["alice"]
    assert run_grid(backend, cfg, out, progress=False)["run"] == 0
    old = [dict(r, settings={k: v for k, v in r["settings"].items() if k != "ppl_text"}) for r in rows]
    out.write_text("".join(json.dumps(r) + "\n" for r in old))   # as before the field existed
    counts = run_grid(backend, cfg, out, progress=False)
    assert counts["run"] == 1 and counts["skipped"] == 1
    assert {r["task"]: r["settings"].get("ppl_text") for r in load_rows(out)} == {"ppl": "alice", "niah": None}


def test_ppl_longer_than_its_text_is_not_an_error(tmp_path):
    out = tmp_path / "r.jsonl"
    text = tmp_path / "short.txt"
    text.write_text("Alice was tired. " * 60)
    cfg = BenchConfig(tasks=["ppl"], methods=["full"], budgets=[], lengths=[100, 5000],
                      task_config=TaskConfig(samples=2, ppl_tokens=8, ppl_text=str(text)))
    logs: list[str] = []
    counts = run_grid(ReadingBackend(WordTokenizer()), cfg, out, progress=False, log=logs.append)
    assert counts["run"] == 1 and counts["errors"] == 0 and counts["unavailable"] == 1
    assert [r["length"] for r in load_rows(out)] == [100]
    assert any("not available" in line and "--ppl-text" in line for line in logs)


# ---- report ------------------------------------------------------------------------------------

def _row(method, budget, scores, task="niah", length=1000, kv=1000):
    return {"key": f"{task}|{method}|{budget}|{length}|0", "task": task, "method": method, "budget": budget,
            "budget_value": None if budget == "full" else float(budget), "length": length, "seed": 0,
            "budget_kind": "full" if budget == "full" else "ratio", "n_samples": len(scores),
            "score": sum(scores) / len(scores), "kv_device_bytes": kv, "kv_host_bytes": 0,
            "samples": [{"sample_id": f"{task}/{i}", "score": s, "depth": (i % 3) / 2} for i, s in enumerate(scores)]}


def test_report_intervals_significance_and_leaderboard(tmp_path):
    rows = [
        _row("full", "full", [1.0] * 30, kv=2**20 * 100),
        _row("snapkv", "0.1", [1.0, 0.0] * 15, kv=2**20 * 10),          # half: significant loss
        _row("streaming", "0.1", [0.0] + [1.0] * 29, kv=2**20 * 10),    # one sample lost: n.s.
        _row("full", "full", [0.0] * 30, task="qa", kv=2**20 * 100),    # the model cannot do it
        _row("snapkv", "0.1", [0.0] * 30, task="qa", kv=2**20 * 10),
        _row("kvpress:full", "full", [1.0] * 30),
        _row("kvpress:snapkv", "0.1", [1.0] * 20 + [0.0] * 10),
    ]
    cs = {(d["task"], d["method"], d["budget"]): d for d in cell_stats(rows)}
    snap = cs[("niah", "snapkv", "0.1")]
    assert (snap["lo"], snap["hi"]) == pytest.approx(stats.wilson(15, 30)) and snap["kind"] == "wilson"
    assert snap["kept"] == 0.5 and snap["significant"] and snap["baseline"] == "full"
    assert not cs[("niah", "streaming", "0.1")]["significant"]
    assert cs[("niah", "kvpress:snapkv", "0.1")]["baseline"] == "kvpress:full"
    assert cs[("niah", "full", "full")]["baseline"] is None
    lb = leaderboard(list(cs.values()))
    assert lb[("snapkv", "0.1")]["value"] == 0.5 and lb[("snapkv", "0.1")]["left_out"] == 1  # qa: full is 0
    md = markdown_table(rows)
    assert "### Leaderboard: fraction of the full-cache score kept" in md
    assert re.search(r"\| snapkv \| 0\.50 \[0\.3\d, 0\.6\d\] \|", md)
    assert re.search(r"\| 1000 \| snapkv \| 0\.1 \| 30 \| 0\.500 \[0\.332, 0\.668\] \| 1\.000 \[0\.886, 1\.000\] \| "
                     r"0\.50 \[0\.3\d, 0\.6\d\] \| worse \|", md)
    assert "| 1000 | streaming | 0.1 | 30 | 0.967 [0.833, 0.994] | 1.000 [0.886, 1.000] |" in md and "| n.s. |" in md
    assert "### GPU KV MiB per sequence after prefill (1000-token prompts" in md
    assert "| full | 100 |" in md
    res = write_report(_write(tmp_path, rows), tmp_path / "rep", heatmap_budget="0.1")
    names = {p.name for p in res["plots"]}
    assert {"accuracy_vs_kv.png", "kept_vs_kv.png", "niah_heatmaps_0.1.png", "memory.png"} <= names
    # the kept-vs-KV plot's points: snapkv keeps 0.5 of niah; qa is left out (full scores 0 there),
    # so niah is every task the full cache counts at that length and the point is not partial
    pts = kept_points(list(cs.values()))
    (x, y, lo, hi, partial), = pts[(1000, "snapkv")][0]
    assert y == 0.5 and lo < 0.5 < hi and not partial and pts[(1000, "snapkv")][1] == 1
    assert (1000, "full") not in pts
    with pytest.raises(ValueError, match="no rows at budget"):
        write_report(_write(tmp_path, rows), tmp_path / "rep2", heatmap_budget="0.3")


def test_the_bar_table_says_where_each_method_stands():
    """At 5% and 16k/30k: a method keeping everything is above the bar, one keeping half clearly
    below, one missing a cell incomplete; the full cache's own scores are listed per length."""
    rows = []
    for L in (16384, 30000):
        rows += [_row("full", "full", [1.0] * 30, length=L), _row("keeps", "0.05", [1.0] * 30, length=L),
                 _row("half", "0.05", [1.0, 0.0] * 15, length=L), _row("tenth", "0.1", [1.0] * 30, length=L)]
    rows += [_row("short", "0.05", [1.0] * 30, length=16384), _row("full", "full", [1.0] * 30, length=4096),
             _row("keeps", "0.05", [0.0] * 30, length=4096)]          # another length: not the bar's
    by = {r["method"]: r for r in bar_rows(cell_stats(rows))}
    assert set(by) == {"keeps", "half", "short"}                      # 0.1 is another budget
    assert by["keeps"]["verdict"] == "above" and by["keeps"]["all"]["value"] == 1.0
    assert by["keeps"][16384]["cells"] == by["keeps"][30000]["cells"] == 1
    assert by["half"]["verdict"] == "clearly below" and by["half"]["all"]["value"] == 0.5
    assert by["short"]["verdict"] == "incomplete" and by["short"]["missing"] == 1
    md = bar_markdown(cell_stats(rows))
    assert "### The bar: 0.95 of the full-cache score kept at 0.05, at 16384, 30000 tokens" in md
    assert "| short | 1.00 [1.00, 1.00] (1) | - | 1.00 [1.00, 1.00] | incomplete (1 cell missing) |" in md
    assert "| 16384 | 1.000 [0.886, 1.000] |" in md
    assert "### The bar" in markdown_table(rows)


def test_the_bar_second_half_against_kvpress():
    """With kvpress rows, the bar's table adds its second half, at the bar's budget and lengths only:
    a method keeping the full score where kvpress's best within its bytes keeps half meets the whole
    bar; one equal to kvpress keeps the score but is not above it; one holding fewer bytes than any
    press has no comparison (open); one keeping half does not meet it; kvpress's own rows get no
    second half, and a 4k cell where kvpress wins changes nothing."""
    mb = 2**20
    rows = []
    for L in (16384, 30000):
        rows += [_row("full", "full", [1.0] * 30, length=L, kv=100 * mb),
                 _row("kvpress:full", "full", [1.0] * 30, length=L, kv=100 * mb),
                 _row("kvpress:snapkv", "0.05", [1.0, 0.0] * 15, length=L, kv=5 * mb),
                 # wins the 16k cell alone, and over both cells (2/3 against snapkv's 1/2)
                 _row("kvpress:tova", "0.05", [1.0] * 30 if L == 16384 else [1.0, 0.0, 0.0] * 10, length=L, kv=5 * mb),
                 _row("keeps", "0.05", [1.0] * 30, length=L, kv=5 * mb),
                 _row("same", "0.05", [1.0, 0.0] * 15 if L == 0 else [1.0] * 30, length=L, kv=100 * mb),
                 _row("tiny", "0.05", [1.0] * 30, length=L, kv=1 * mb),
                 _row("half", "0.05", [1.0, 0.0] * 15, length=L, kv=5 * mb)]
    rows += [_row("kvpress:snapkv", "0.25", [1.0] * 30, length=16384, kv=25 * mb),   # at 16k only
             _row("big", "0.05", [1.0] * 30, length=16384, kv=30 * mb),
             _row("big", "0.05", [1.0] * 30, length=30000, kv=30 * mb),
             _row("full", "full", [1.0] * 30, length=4096, kv=100 * mb),
             _row("keeps", "0.05", [0.0] * 30, length=4096, kv=5 * mb),
             _row("kvpress:snapkv", "0.05", [1.0] * 30, length=4096, kv=5 * mb)]
    by = {r["method"]: r for r in bar_rows(cell_stats(rows), rows=rows)}
    keeps = by["keeps"]
    # the best press: one entry for both cells (not the 4k cell, where kvpress's snapkv scores 1.0)
    assert keeps["peer"]["cells"] == 2 and keeps["peer"]["best"] == {"tova@0.05": 2}
    assert keeps["peer"]["diff"] == pytest.approx(1 / 3) and keeps["peer_verdict"] == "above" and keeps["bar"] == "met"
    # per cell: tova at 16k, snapkv at 30k
    assert keeps["peer_cell"]["best"] == {"tova@0.05": 1, "snapkv@0.05": 1}
    assert keeps["peer_cell"]["diff"] == pytest.approx(0.25)
    assert by["same"]["peer"]["best"] == {"full@full": 2} and by["same"]["peer_verdict"] == "n.s."
    assert by["same"]["verdict"] == "above" and by["same"]["bar"] == "kept, not above kvpress"
    assert by["tiny"]["peer_verdict"] == "no kvpress entry" and by["tiny"]["bar"] == "open"
    # kvpress's 25% fits under big's bytes but ran at 16k only: big beats the best press, yet stays open;
    # under same's bytes the full cache is larger than that 25% entry, so it does not count there
    assert by["big"]["peer"]["best"] == {"tova@0.05": 2} and by["big"]["peer_verdict"] == "above"
    assert by["big"]["peer"]["unmeasured_larger"] == ["snapkv@0.25"] and by["big"]["bar"] == "open"
    assert by["same"]["peer"]["unmeasured_larger"] == [] and by["keeps"]["peer"]["unmeasured_larger"] == []
    assert by["half"]["verdict"] == "clearly below" and by["half"]["bar"] == "not met"
    # kvpress's tova measured at 16k only: the best press covers one bar cell of two, so the bar is open
    part = [r for r in rows if not (r["method"] == "kvpress:snapkv" or (r["method"] == "kvpress:tova"
                                                                         and r["length"] == 30000))]
    one = {r["method"]: r for r in bar_rows(cell_stats(part), rows=part)}["keeps"]
    assert one["peer"]["cells"] == 1 and one["peer"]["no_peer"] == 1 and one["bar"] == "open"
    assert "(1, 1 without; tova@0.05)" in bar_markdown(cell_stats(part), rows=part)
    assert "bar" not in by["kvpress:snapkv"]
    md = bar_markdown(cell_stats(rows), rows=rows)
    assert "| verdict | vs kvpress's best press (points, cells) | per-cell best | bar |" in md
    assert re.search(r"\| keeps \| .* \| above \| \+33\.3 \[\+\d+\.\d, \+\d+\.\d\] above \(2; tova@0\.05\) \| "
                     r"\+25\.0 \[\+\d+\.\d, \+\d+\.\d\] \(2\) \| met \|", md), md
    assert "| no kvpress entry | - | open |" in md and "(2; tova@0.05; not all run: snapkv@0.25)" in md
    assert re.search(r"\| kvpress:snapkv \| .* \| clearly below \|  \|  \|  \|$", md, re.M)
    # without kvpress rows: one verdict column, as before
    plain = [r for r in rows if not r["method"].startswith("kvpress:")]
    assert "vs kvpress" not in bar_markdown(cell_stats(plain), rows=plain)
    assert all("bar" not in r for r in bar_rows(cell_stats(plain), rows=plain))


def test_full_cache_baselines_per_task_and_length():
    """The baselines table: one per full-cache run (kvsift's, then kvpress's), a row per length, a
    column per task (ppl last, as a perplexity with its interval); the bar's table uses the same rows."""
    def ppl_row(method, length, nll):
        r = _row(method, "full", [0.0] * 4, task="ppl", length=length)
        r["samples"] = [{"sample_id": f"ppl/{i}", "nll_sum": x * 8, "n_tokens": 8} for i, x in enumerate(nll)]
        return r

    rows = [_row("full", "full", [1.0] * 30, length=16384), _row("full", "full", [1.0, 0.0] * 15, task="qa", length=16384),
            _row("full", "full", [0.0] * 30, length=4096), ppl_row("full", 4096, [2.0] * 4),
            _row("kvpress:full", "full", [1.0] * 30, length=4096), _row("snapkv", "0.05", [1.0] * 30, length=16384),
            _row("kivi", "full", [1.0] * 30, length=16384)]                   # a budgetless method: not a baseline
    md = baselines_markdown(cell_stats(rows))
    assert md.index("`full`:") < md.index("`kvpress:full`:") and "`kivi`" not in md
    assert "| length | niah | qa | ppl |" in md
    assert f"| 4096 | 0.000 [0.000, 0.114] | - | {math.exp(2.0):.2f} [{math.exp(2.0):.2f}, {math.exp(2.0):.2f}] |" in md
    assert "| 16384 | 1.000 [0.886, 1.000] | 0.500 [0.332, 0.668] | - |" in md
    assert "| length | niah |\n|---|---|\n| 4096 | 1.000 [0.886, 1.000] |" in md   # kvpress's own
    assert "### Full-cache baselines per task and length" in markdown_table(rows)
    bar = bar_markdown(cell_stats(rows))                                   # the bar's lengths, no ppl
    assert "| length | niah | qa |" in bar and "| 16384 | 1.000 [0.886, 1.000] | 0.500 [0.332, 0.668] |" in bar
    assert "| 4096 |" not in bar
    assert baselines_markdown(cell_stats([_row("snapkv", "0.1", [1.0] * 30)])) == ""


def test_leaderboard_marks_entries_over_fewer_cells():
    """A method measured on fewer tasks or lengths than the others says so beside its value."""
    rows = [_row("full", "full", [1.0] * 30), _row("full", "full", [1.0] * 30, task="qa"),
            _row("snapkv", "0.1", [1.0] * 30), _row("snapkv", "0.1", [1.0] * 29 + [0.0], task="qa"),
            _row("streaming", "0.1", [1.0] * 15 + [0.0] * 15)]
    md = markdown_table(rows)
    assert re.search(r"\| streaming \| 0\.50 \[0\.\d\d, 0\.\d\d\] \(1/2\) \|", md), md
    assert re.search(r"\| snapkv \| 0\.98 \[0\.\d\d, 1\.00\] \|", md), md
    assert "`(n/2)`: an entry over fewer cells" in md


def test_against_kvpress_best_at_no_more_kv_bytes():
    """Each kvsift entry against kvpress's best press among those holding no more GPU KV: chosen
    per cell, samples paired, cells pooled; a method that keeps every byte meets kvpress's full
    cache; one that holds less than any press has no comparison; the section is absent without
    kvpress rows."""
    from kvsift.eval.report import vs_peer_at_kv

    mb = 2**20
    rows = [_row("full", "full", [1.0] * 30, kv=100 * mb), _row("kvpress:full", "full", [1.0] * 30, kv=100 * mb),
            _row("snapkv", "0.1", [1.0] * 27 + [0.0] * 3, kv=10 * mb),
            _row("kvpress:snapkv", "0.1", [1.0] * 15 + [0.0] * 15, kv=10 * mb),
            _row("kvpress:streaming", "0.1", [1.0] * 5 + [0.0] * 25, kv=10 * mb),
            _row("kvpress:adakv", "0.1", [1.0] * 29 + [0.0], kv=100 * mb),    # masks only: every byte held
            _row("quest", "0.1", [1.0] * 30, kv=100 * mb),
            _row("sentencekv", "0.1", [1.0] * 30, kv=1 * mb),
            # a second task: kvpress's snapkv wins there, by a little (not significant over both)
            _row("full", "full", [1.0] * 30, task="qa", kv=100 * mb),
            _row("snapkv", "0.1", [1.0] * 20 + [0.0] * 10, task="qa", kv=10 * mb),
            _row("kvpress:snapkv", "0.1", [1.0] * 22 + [0.0] * 8, task="qa", kv=int(10.1 * mb)),   # within 2%
            _row("kvpress:streaming", "0.1", [1.0] * 30, task="qa", kv=11 * mb)]                  # more bytes
    comp = {(d["method"], d["budget"]): d for d in vs_peer_at_kv(rows)}
    snap = comp[("snapkv", "0.1")]
    assert snap["cells"] == 2 and snap["n"] == 60 and snap["best"] == {"snapkv@0.1": 2}
    assert snap["ours"] == pytest.approx(47 / 60) and snap["theirs"] == pytest.approx(37 / 60)
    assert snap["diff"] == pytest.approx(10 / 60) and snap["significant"] and snap["lo"] > 0
    quest = comp[("quest", "0.1")]
    assert quest["best"] == {"full@full": 1} and quest["diff"] == 0 and not quest["significant"]
    assert comp[("sentencekv", "0.1")]["cells"] == 0 and comp[("sentencekv", "0.1")]["no_peer"] == 1
    assert ("full", "full") not in comp and not any(m.startswith("kvpress:") for m, _ in comp)
    md = markdown_table(rows)
    assert "### Against kvpress's best at no more GPU KV bytes" in md
    assert re.search(r"\| snapkv \| 0\.1 \| 2 \| 60 \| 78\.3 \| 61\.7 \| \+16\.7 \[\+\d+\.\d, \+\d+\.\d\] \| above \| "
                     r"snapkv@0\.1 \(2\) \| 0 \|", md), md
    assert "| sentencekv | 0.1 | 0 | - | - | - | - | - | - | 1 |" in md
    assert "Against kvpress" not in markdown_table([r for r in rows if not r["method"].startswith("kvpress:")])
    with pytest.raises(ValueError, match="pick must be"):
        vs_peer_at_kv(rows, pick="best")


def _write(tmp_path, rows):
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_base_backend_default_batch_loops():
    class One(BaseBackend):
        def generate(self, prompt_ids, method, budget, max_new_tokens):
            return len(prompt_ids)
    assert One().generate_batch([[1], [1, 2]], "full", None, 4) == [1, 2]
    assert One().auto_batch_size(100, 4, "full", None) == 1


def test_cli_model_by_path(tmp_path, default_tokenizer):
    """`bench run --model DIR` loads an HF model directory (here a tiny random one) through kvsift's
    engine, with the bench's chunk size and prefill mode, and records the settings."""
    from kvsift.models.tiny import save_tiny_model

    mdir = save_tiny_model(tmp_path / "tiny-model", family="qwen2", seed=1, tokenizer=default_tokenizer)
    out = tmp_path / "r.jsonl"
    args = _parser().parse_args(["bench", "run", "--model", str(mdir), "--device", "cpu", "--tasks", "niah",
                                 "--lengths", "200", "--samples", "2", "--depths", "0.5", "--methods", "full,snapkv",
                                 "--budgets", "0.5", "--chunk-size", "64", "--batch-size", "2", "--out", str(out),
                                 "--no-progress"])
    assert run_bench(args) == 0
    rows = {r["method"]: r for r in load_rows(out)}
    assert set(rows) == {"full", "snapkv"} and all(r["n_samples"] == 2 for r in rows.values())
    assert rows["full"]["model"] == "tiny-model" and rows["full"]["backend"] == "kvsift"
    assert rows["snapkv"]["settings"]["chunk_size"] == 64 and rows["snapkv"]["settings"]["device"] == "cpu"
    assert rows["snapkv"]["kv_kept_bytes"] < rows["full"]["kv_kept_bytes"]
