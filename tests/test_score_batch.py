"""Batched teacher-forced scoring (``LLM.score_batch``) and the eval runner's batched ppl cells:
a batch scores every row as it scores alone."""

from __future__ import annotations

import pytest

from kvsift.eval.fakes import ReadingBackend, WordTokenizer
from kvsift.eval.runner import BenchConfig, load_rows, run_cell, run_grid
from kvsift.eval.tasks import TaskBuilder, TaskConfig
from tests.conftest import random_prompt


def _rows(n_ctx: int, n_cont: int, b: int = 3, seed: int = 40):
    ids = [random_prompt(n_ctx + n_cont, seed=seed + i) for i in range(b)]
    return [x[:n_ctx] for x in ids], [x[n_ctx:] for x in ids]


@pytest.mark.parametrize("method, budget, kw, prefill_mode", [
    ("full", None, None, "auto"),
    ("snapkv", 0.5, None, "auto"),      # row_prefill_ok: prefilled row by row, then stacked
    ("snapkv", 0.5, None, "batch"),     # the same rows prefilled together
    ("snapkv", 0.5, None, "prefix"),    # row by row from a prefix store: the batch reads what the rows stored
    ("quest", 32, {"page": 8}, "auto"),  # decode-time page selection: 4 of 12 pages per step
    ("streaming", 32, None, "auto"),    # rolling eviction at every decode step
])
def test_score_batch_equals_one_row_at_a_time(tiny_llm, method, budget, kw, prefill_mode):
    """Three contexts of one length scored as one batch give each row's ``score`` (fp32 CPU), and
    each row's stats are that row's part of the batch (KV bytes, prefill time) with its own counts."""
    from kvsift.engine.prefix import PrefixStore

    ctxs, conts = _rows(96, 12)
    runner = tiny_llm.runner
    saved = tiny_llm.prefill_mode
    store = PrefixStore(2**26) if prefill_mode == "prefix" else None
    tiny_llm.prefill_mode = "auto" if store is not None else prefill_mode
    runner.prefix_store = store
    try:
        one = [tiny_llm.score(c, x, method=method, budget=budget, method_kwargs=kw) for c, x in zip(ctxs, conts)]
        both = tiny_llm.score_batch(ctxs, conts, method=method, budget=budget, method_kwargs=kw)
    finally:
        tiny_llm.prefill_mode, runner.prefix_store = saved, None
    if store is not None:
        assert (store.stats.stored, store.stats.hits) == (3, 3)
    assert len(both) == 3
    for (nll_1, st_1), (nll_b, st_b) in zip(one, both):
        assert nll_b == pytest.approx(nll_1, rel=1e-4)
        assert (st_b.prompt_tokens, st_b.generated_tokens, st_b.decode_steps) == (96, 12, 11)
        assert (st_b.kv_kept_bytes, st_b.kv_full_bytes, st_b.kv_device_bytes) == \
            (st_1.kv_kept_bytes, st_1.kv_full_bytes, st_1.kv_device_bytes)
        assert st_b.method == st_1.method and st_b.prefill_s > 0 and st_b.decode_s > 0
    # rows differ (each its own text), so a batch mixing them up would show
    assert len({round(nll, 3) for nll, _ in both}) == 3
    if method == "full":
        assert both[0][1].kv_kept_bytes == both[0][1].kv_full_bytes
    else:
        assert [nll for nll, _ in both] != pytest.approx([nll for nll, _ in tiny_llm.score_batch(ctxs, conts)],
                                                         rel=1e-4)


def test_score_batch_checks_shapes_before_any_forward(tiny_llm, monkeypatch):
    """Contexts or continuations of different lengths, a count mismatch, an empty continuation or
    batch, or a row past the model's positions: ``ValueError`` and no forward pass."""
    ran = []
    monkeypatch.setattr(tiny_llm.runner, "prefill", lambda *a, **k: ran.append("prefill"))
    monkeypatch.setattr(tiny_llm.runner, "forward", lambda *a, **k: ran.append("forward"))
    ctxs, conts = _rows(40, 4)
    limit = tiny_llm.info.max_positions
    for bad_ctx, bad_cont, match in (
            ([ctxs[0], ctxs[1][:-1], ctxs[2]], conts, "contexts of one length"),
            (ctxs, [conts[0], conts[1] + [7], conts[2]], "continuations of one length"),
            (ctxs, conts[:2], "3 contexts but 2 continuations"),
            (ctxs, [[], [], []], "non-empty continuation"),
            ([], [], "at least one context"),
            ([[5] * limit] * 2, [[6]] * 2, "exceeds the model's limit")):
        with pytest.raises(ValueError, match=match):
            tiny_llm.score_batch(bad_ctx, bad_cont)
    assert ran == []


def _ppl_config(**kw):
    base = dict(tasks=["ppl"], methods=["full", "snapkv"], budgets=["0.25", "64"], lengths=[300, 500], seeds=[0],
                task_config=TaskConfig(samples=5, ppl_tokens=16))
    base.update(kw)
    return BenchConfig(**base)


_TIMING = {"wall_s", "time", "batch_size"}


def _same_rows(path):
    return sorted(((({k: v for k, v in r.items() if k not in _TIMING and k != "samples"},
                     [{k: v for k, v in e.items() if k != "batch"} for e in r["samples"]])
                    for r in load_rows(path))), key=repr)


def test_fake_grid_ppl_batches_give_the_same_rows(tmp_path):
    """A ppl grid over the fake backend in batches (fixed, automatic, halved after running out of
    memory) writes the rows of one sample at a time, but for timings and batch sizes."""
    tok = WordTokenizer()
    one = ReadingBackend(tok)
    run_grid(one, _ppl_config(), tmp_path / "one.jsonl", progress=False, batch_size=1)
    assert one.score_batches == [1] * 5 * 6
    two = ReadingBackend(tok)
    counts = run_grid(two, _ppl_config(), tmp_path / "two.jsonl", progress=False, batch_size=2)
    assert counts["run"] == 6 and counts["errors"] == 0
    assert two.score_batches == [2, 2, 1] * 6 and two.calls == one.calls == 30
    assert _same_rows(tmp_path / "two.jsonl") == _same_rows(tmp_path / "one.jsonl")
    rows = load_rows(tmp_path / "two.jsonl")
    assert {r["batch_size"] for r in rows} == {2}
    assert all([e["batch"] for e in r["samples"]] == [2, 2, 2, 2, 1] for r in rows)
    assert all(set(e) >= {"nll_sum", "n_tokens", "ppl", "kv_kept_bytes", "prefill_s"} for r in rows
               for e in r["samples"])

    auto = ReadingBackend(tok, auto_batch=3)
    run_grid(auto, _ppl_config(), tmp_path / "auto.jsonl", progress=False)
    assert auto.score_batches == [3, 2] * 6
    assert _same_rows(tmp_path / "auto.jsonl") == _same_rows(tmp_path / "one.jsonl")

    small = ReadingBackend(tok, max_rows=2)   # the runner's one retry loop halves ppl batches as generation's
    run_grid(small, _ppl_config(), tmp_path / "small.jsonl", progress=False, batch_size=5)
    assert small.score_batches == [2, 2, 1] * 6 and small.freed == 2 * 6
    assert {r["batch_size"] for r in load_rows(tmp_path / "small.jsonl")} == {2}
    assert _same_rows(tmp_path / "small.jsonl") == _same_rows(tmp_path / "one.jsonl")

    class Plain:  # a backend with no score_batch: one score per sample, and its rows say so
        name, model_name, tokenizer = "plain", "m", tok
        score = ReadingBackend(tok).score
    samples = TaskBuilder(tok, _ppl_config().task_config).build("ppl", 300, 0)
    row = run_cell(Plain(), samples, "ppl", "full", None, 300, 0, batch_size=4)
    assert row["batch_size"] == 1 and row["ppl"] == next(r for r in load_rows(tmp_path / "one.jsonl")
                                                         if r["key"] == "ppl|full|full|300|0")["ppl"]


def test_run_cell_ppl_batch_equals_one_at_a_time_on_a_tiny_model(tiny_llm, default_tokenizer):
    """``KvsiftBackend`` scores a ppl cell's samples as one ``LLM.score_batch``: every sample's NLL and
    KV bytes are those it gets alone."""
    from kvsift.eval.runner import KvsiftBackend

    backend = KvsiftBackend(tiny_llm)
    samples = TaskBuilder(default_tokenizer, TaskConfig(samples=3, ppl_tokens=8)).build("ppl", 96, 0)
    assert len({len(s.context_ids) for s in samples}) == 1
    for method, budget in (("full", None), ("snapkv", 0.5)):
        r1 = run_cell(backend, samples, "ppl", method, budget, 96, 0, batch_size=1)
        r3 = run_cell(backend, samples, "ppl", method, budget, 96, 0, batch_size=3)
        assert r1["batch_size"] == 1 and r3["batch_size"] == 3
        assert [e["batch"] for e in r3["samples"]] == [3, 3, 3] and [e["batch"] for e in r1["samples"]] == [1] * 3
        assert [e["sample_id"] for e in r3["samples"]] == [s.sample_id for s in samples]
        for a, b in zip(r1["samples"], r3["samples"]):
            assert b["nll_sum"] == pytest.approx(a["nll_sum"], rel=1e-4) and b["n_tokens"] == a["n_tokens"] == 8
            assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-4)
            assert (b["kv_kept_bytes"], b["kv_full_bytes"], b["prompt_tokens"]) == \
                (a["kv_kept_bytes"], a["kv_full_bytes"], a["prompt_tokens"])
        assert r3["ppl"] == pytest.approx(r1["ppl"], rel=1e-4) and set(r3) == set(r1)


COMPOSED = ["snapkv+quest", "adakv(h2o)", "snapkv+kivi"]


def test_every_method_scores_a_batch_as_its_rows_alone(tiny_llm):
    """Every registered method (and a few compositions), at half the context: ``score_batch`` of
    three contexts equals each row's ``score`` (fp32 CPU, 1e-4 relative): eviction at the prefill,
    per-step selection and eviction while decoding, offloading and quantization all keep rows
    apart in a batch."""
    from kvsift.eval.runner import budgetless
    from kvsift.methods import available_methods

    ctxs, conts = _rows(96, 6, seed=70)
    for spec in sorted(available_methods()) + COMPOSED:
        budget = None if budgetless(spec) else 48
        one = [tiny_llm.score(c, x, method=spec, budget=budget)[0] for c, x in zip(ctxs, conts)]
        both = [nll for nll, _ in tiny_llm.score_batch(ctxs, conts, method=spec, budget=budget)]
        assert both == pytest.approx(one, rel=1e-4), spec
