"""Offline continuous batching (``LLM.generate_requests``) and the eval grid's ``group_budgets``
(``kvsift bench run --group-budgets``): a method's cells at several budgets over one prompt set run
as one batch of requests, each prefilled on its own, and give the answers of the cells run one by
one."""

import pytest

from kvsift import LLM, SamplingParams
from kvsift.errors import KVMemoryError
from kvsift.models import tiny_model
from tests.conftest import random_prompt


@pytest.fixture(scope="module")
def llm(default_tokenizer):
    return LLM.from_model(tiny_model("qwen2", seed=1), default_tokenizer, name="tiny", chunk_size=64)


def _prompts():
    return [random_prompt(300 + i % 3, seed=40 + i) for i in range(6)]   # three lengths


@pytest.mark.parametrize("spec,together", [
    ("snapkv", 12),      # state after the prefill is its kept KV: every budget and length joins
    ("full", 12),
    ("adakv(snapkv)", 12),
    ("quest", 4),        # its steps read the resolved budget: same budget, any length
    ("tova", 4),         # evicts while decoding: rows at the same resolved budget
    ("sentencekv", 4),
])
def test_requests_decode_together_and_answer_as_alone(llm, spec, together):
    params = SamplingParams(max_tokens=8, temperature=0.0)
    budgets = [None] if spec == "full" else [0.1, 0.25]
    items = [(p, b) for b in budgets for p in _prompts()]
    if spec == "full":
        items = items + items
    alone = [llm.generate([p], params, method=spec, budget=b, progress=False)[0].token_ids for p, b in items]
    reqs = [llm.request([p], params, method=spec, budget=b) for p, b in items]
    outs = llm.generate_requests(reqs, max_batch=16)
    assert [o[0].token_ids for o in outs] == alone
    rows = [o[0].stats.batch_rows for o in outs]
    assert max(rows) <= together and max(rows) >= min(together, 4), rows
    if together == 12:
        assert max(rows) == 12   # the first batch's rows and all the others' in one decode batch
    # each answer's prefill time is for the rows prefilled with it: its own, or its first group's
    # (full pads exactly: every prompt in the first group; the others: prompts of one length)
    assert all(1 <= o[0].stats.prefill_rows <= (12 if spec == "full" else 2) for o in outs)


def test_generate_requests_limits(llm):
    params = SamplingParams(max_tokens=4, temperature=0.0)
    reqs = [llm.request([p], params, method="snapkv", budget=0.25) for p in _prompts()]
    outs = llm.generate_requests(reqs, max_batch=2)
    assert max(o[0].stats.batch_rows for o in outs) <= 2
    with pytest.raises(ValueError, match="max_batch"):
        llm.generate_requests(reqs, max_batch=0)
    with pytest.raises(KVMemoryError):
        llm.generate_requests(reqs, kv_memory=1)
    assert llm.generate_requests([]) == []


def test_grid_grouped_by_budget_gives_the_rows_of_cells_one_by_one(default_tokenizer, tmp_path):
    """The grid with ``group_budgets``: same predictions as cell by cell (with a prefix store, as
    the suite runs), one ``generate_many`` call per method and prompt set for the groupable
    samples; ``ppl`` cells run as before; rows say how many cells ran together."""
    from kvsift.eval.runner import BenchConfig, KvsiftBackend, load_rows, run_grid
    from kvsift.eval.tasks import TaskConfig

    m = tiny_model("llama", seed=4)
    cfg = BenchConfig(tasks=["niah", "cwe", "ppl"], methods=["full", "snapkv", "quest", "tova", "kvzip"],
                      budgets=["0.25", "0.5"], lengths=[512],
                      task_config=TaskConfig(depths=(0.0, 1.0), samples=2, ppl_tokens=16))

    def backend():
        return KvsiftBackend(LLM.from_model(m, default_tokenizer, name="tiny", chunk_size=64),
                             share_prefix_bytes=1 << 30)

    one, grouped = backend(), backend()
    calls = []
    many = grouped.generate_many
    grouped.generate_many = lambda items, method: (calls.append((method, len(items))), many(items, method))[-1]
    run_grid(one, cfg, tmp_path / "one.jsonl", progress=False)
    run_grid(grouped, cfg, tmp_path / "grouped.jsonl", progress=False, group_budgets=True)
    a = {r["key"]: r for r in load_rows(tmp_path / "one.jsonl")}
    b = {r["key"]: r for r in load_rows(tmp_path / "grouped.jsonl")}
    assert a.keys() == b.keys() and len(a) == 3 * (1 + 2 * 4)
    for k in a:
        assert not b[k].get("error"), b[k].get("error")
        if b[k]["task"] == "ppl":
            assert b[k]["ppl"] == pytest.approx(a[k]["ppl"], rel=1e-4) and "grouped_cells" not in b[k]["settings"]
            continue
        assert [e["prediction"] for e in a[k]["samples"]] == [e["prediction"] for e in b[k]["samples"]], k
        grouped_cells = b[k]["settings"].get("grouped_cells")
        assert grouped_cells == (None if b[k]["method"] == "full" else 2), k
        if grouped_cells:
            assert b[k]["wall_s"] == pytest.approx(b[k]["group_wall_s"] / 2)
    # niah and cwe: one call per budgeted method, each sample at both budgets
    assert sorted(calls) == sorted((m_, 4) for m_ in ("snapkv", "quest", "tova", "kvzip") for _ in range(2))


def test_grid_falls_back_to_cells_one_by_one(tmp_path):
    """A group that fails (here: out of memory past two rows) runs its cells one by one, which
    give the rows they give without grouping."""
    from kvsift.eval.fakes import ReadingBackend, WordTokenizer
    from kvsift.eval.runner import BenchConfig, load_rows, run_grid
    from kvsift.eval.tasks import TaskConfig

    cfg = BenchConfig(tasks=["niah"], methods=["snapkv", "streaming"], budgets=["0.25", "0.5", "1.0"],
                      lengths=[200], task_config=TaskConfig(depths=(0.0, 1.0), samples=2))
    ok, failing, plain = (ReadingBackend(WordTokenizer()), ReadingBackend(WordTokenizer(), max_rows=2),
                          ReadingBackend(WordTokenizer()))
    logs = []
    run_grid(plain, cfg, tmp_path / "plain.jsonl", progress=False, log=None)
    run_grid(ok, cfg, tmp_path / "ok.jsonl", progress=False, log=None, group_budgets=True)
    run_grid(failing, cfg, tmp_path / "failing.jsonl", progress=False, log=logs.append, group_budgets=True)
    assert ok.many == [6, 6] and not ok.batches and failing.many == [] and failing.freed == 2
    assert sum("running them one by one" in x for x in logs) == 2
    rows = {n: {r["key"]: r for r in load_rows(tmp_path / f"{n}.jsonl")} for n in ("plain", "ok", "failing")}
    assert rows["plain"].keys() == rows["ok"].keys() == rows["failing"].keys() and len(rows["plain"]) == 6
    for k, r in rows["plain"].items():
        for n in ("ok", "failing"):
            assert [e["prediction"] for e in rows[n][k]["samples"]] == [e["prediction"] for e in r["samples"]]
        assert rows["ok"][k]["settings"]["grouped_cells"] == 3
        assert "grouped_cells" not in rows["failing"][k]["settings"]


def test_grid_time_limit_counts_a_group_as_one_unit(tmp_path):
    """``max_minutes`` with groups: the first group always runs whole; the next one does not start
    when the slowest group so far would end past the limit."""
    from kvsift.eval.fakes import ReadingBackend, WordTokenizer
    from kvsift.eval.runner import BenchConfig, run_grid
    from kvsift.eval.tasks import TaskConfig

    t = [0.0]
    backend = ReadingBackend(WordTokenizer())
    many = backend.generate_many

    def slow(items, method):
        t[0] += 50.0   # each group "takes" 50 s
        return many(items, method)

    backend.generate_many = slow
    cfg = BenchConfig(tasks=["niah"], methods=["snapkv", "streaming"], budgets=["0.25", "0.5"], lengths=[200],
                      task_config=TaskConfig(depths=(0.0,), samples=1))
    counts = run_grid(backend, cfg, tmp_path / "r.jsonl", progress=False, log=None, max_minutes=1.5,
                      clock=lambda: t[0], group_budgets=True)
    assert counts["run"] == 2 and counts["stopped"] and counts["left"] == 2   # 50 + 50 > 90 s


def test_cli_refuses_group_budgets_with_what_it_does_not_batch(capsys):
    from kvsift.cli import main

    for extra in (["--compress", "context"], ["--batch-padding"], ["--batch-size", "4"]):
        assert main(["bench", "run", "--backend", "fake", "--group-budgets", "--dry-run", *extra]) == 2
        assert "--group-budgets runs each method's budgets as one continuous batch" in capsys.readouterr().err


def test_decode_wait_is_the_joiners_prefill(llm):
    """Rows decoding while requests join wait on those prefills: ``decode_wait_s`` counts it (the
    first batch's rows waited, the joiners did not), and ``steady_ms_per_token`` leaves it out."""
    params = SamplingParams(max_tokens=6, temperature=0.0)
    ps = _prompts()
    reqs = [llm.request([p], params, method="snapkv", budget=b) for b in (0.1, 0.25) for p in ps]
    outs = [o[0].stats for o in llm.generate_requests(reqs, max_batch=16)]
    first = [s for s in outs if s.prefill_rows == 2][:2]   # the first group: two prompts of one length
    joined = [s for s in outs if s.prefill_rows == 1]
    assert first and joined and all(s.decode_wait_s > 0 for s in first)
    assert all(s.decode_wait_s == 0 for s in joined)
    for s in first:
        assert s.decode_wait_s < s.decode_s
        steps = s.decode_steps - (s.decode_setup_steps or (1 if s.decode_setup_s else 0))
        assert s.steady_ms_per_token == pytest.approx(1000 * (s.decode_s - s.decode_setup_s - s.decode_wait_s) / steps)


def test_generate_many_halves_its_batch_after_running_out_of_memory(default_tokenizer):
    """An out-of-memory error in a grouped call (the admission's estimate was short) frees memory
    and runs the call again with half the sequences at a time; the answers are the same."""
    from kvsift.eval.runner import KvsiftBackend

    llm = LLM.from_model(tiny_model("qwen2", seed=1), default_tokenizer, name="tiny", chunk_size=64)
    backend = KvsiftBackend(llm, max_batch=8)
    items = [(p, b, 6) for b in (0.1, 0.25) for p in _prompts()]
    want = [g.text for g in backend.generate_many(items, "snapkv")]
    tried = []
    real = llm.generate_requests

    def flaky(reqs, max_batch, kv_memory=None, progress=None):
        tried.append(max_batch)
        if max_batch > 2:
            raise RuntimeError("CUDA out of memory (fake)")
        return real(reqs, max_batch=max_batch, kv_memory=kv_memory)

    llm.generate_requests = flaky
    got = backend.generate_many(items, "snapkv")
    assert tried == [8, 4, 2] and [g.text for g in got] == want and max(g.batch for g in got) <= 2
    llm.generate_requests = lambda *a, **k: (_ for _ in ()).throw(ValueError("not memory"))
    with pytest.raises(ValueError, match="not memory"):
        backend.generate_many(items, "snapkv")


def test_generate_many_draws_no_prefill_bars(default_tokenizer, capsys):
    """A grouped call prints nothing (the suite's logs had a prefill bar per joining row): prompts
    of 8 chunks and more, which draw a bar by default, draw none through ``generate_many``."""
    from kvsift.eval.runner import KvsiftBackend

    llm = LLM.from_model(tiny_model("qwen2", seed=1), default_tokenizer, name="tiny", chunk_size=16)
    prompts = _prompts()
    llm.generate([prompts[0]], SamplingParams(max_tokens=2), method="snapkv", budget=0.25)
    assert "prefill" in capsys.readouterr().err   # a 300-token prompt in 16-token chunks: a bar by default
    got = KvsiftBackend(llm, max_batch=8).generate_many([(p, b, 2) for b in (0.1, 0.25) for p in prompts], "snapkv")
    assert len(got) == 12
    assert capsys.readouterr().err == ""


def test_run_batch_reports_each_change_of_rows(llm):
    """``run_batch(on_rows_changed=...)``: called with the host seconds of each change of the running
    rows that running rows waited on (here: a request joining at the first step boundary, then the
    first one leaving a step before the joiner ends); not called when the rows never change."""
    params = SamplingParams(max_tokens=6, temperature=0.0)
    ps = _prompts()
    a, b = (llm.request([p], params, method="snapkv", budget=0.25) for p in ps[:2])
    seen = []
    asked = []
    join = lambda running, rows: asked.append(rows) or ([b] if len(asked) == 1 else [])  # noqa: E731
    list(llm.run_batch([a], join=join, on_rows_changed=seen.append))
    assert len(seen) == 2 and min(seen) > 0
    seen.clear()
    list(llm.run_batch([llm.request([ps[2]], params, method="snapkv", budget=0.25)], on_rows_changed=seen.append))
    assert seen == []



def test_settled_batch_lets_more_requests_join(llm):
    """Once a batch is built its requests are charged its measured KV, not their prompts' prefill:
    under a KV limit that admits two prompts' prefills, a compressing method's requests keep
    joining the running batch (wider ones charged what the batch grows by), and answer as alone."""
    params = SamplingParams(max_tokens=8, temperature=0.0)
    prompts = _prompts()
    items = [(p, b) for b in (0.1, 0.5) for p in prompts]    # the wider rows join last, as in a grouped cell
    reqs = [llm.request([p], params, method="snapkv", budget=b) for p, b in items]
    assert all(0 < r.width_tokens < len(r.prompts[0]) for r in reqs)
    limit = 2 * max(r.kv_bytes for r in reqs) + 1
    alone = [llm.generate([p], params, method="snapkv", budget=b, progress=False)[0].token_ids for p, b in items]
    outs = llm.generate_requests(reqs, max_batch=16, kv_memory=limit)
    assert [o[0].token_ids for o in outs] == alone
    assert max(o[0].stats.batch_rows for o in outs) > 2


def test_scheduler_settle_charges_measured_bytes_and_joins_pay_growth():
    from kvsift.engine.scheduler import Request, Scheduler, SchedulerConfig
    from kvsift.methods import build_method

    m = build_method("snapkv", 0.1)
    sched = Scheduler(SchedulerConfig(max_batch=8, kv_memory=1000))
    mk = lambda width: Request([[1, 2, 3]], SamplingParams(), m, kv_bytes=600, width_tokens=width)  # noqa: E731
    a, b, c, d = mk(10), mk(10), mk(40), mk(10)
    for r in (a, b, c, d):
        sched.add(r)
    assert sched.schedule() == [a] and sched.kv_used == 600     # b's prefill does not fit beside a's
    sched.settle({a: 1}, 100, 10)                                # measured: 1 row x 10 slots x 10 bytes
    assert a.charged == 100 and sched.kv_used == 100
    # b: its prefill (600) is more than the growth (10 slots more); c, 40 slots wide, would pad the
    # two rows already there to 40: growth 3 x 40 x 10 - 2 x 10 x 10 = 1000, over the limit: it waits
    assert sched.join([a], 1) == [b] and sched.kv_used == 700
    sched.settle({a: 1, b: 1}, 200, 10)
    assert sched.kv_used == 200 and a.charged == b.charged == 100
    assert sched.join([a, b], 2) == []                           # c first in line: no one overtakes it
    sched.settle({a: 0, b: 1}, 100, 10)                           # a's row left: its charge goes
    assert a.charged == 0 and sched.kv_used == 100
    assert sched.join([a, b], 1) == [c] and c.charged == 700   # 10 x (2 x 40 - 1 x 10), more than its 600
    sched.finish([a, b, c])
    assert sched.kv_used == 0 and sched._batch is None
    assert sched.schedule() == [d] and d.charged == 600          # a new batch: admission charges again
    pre = Scheduler(SchedulerConfig(max_batch=8, kv_memory=1000, preempt=True))
    e = mk(10)
    pre.add(e)
    pre.schedule()
    before = e.charged
    pre.settle({e: 1}, 10, 10)
    assert e.charged == before                                   # preemption keeps its own charges
