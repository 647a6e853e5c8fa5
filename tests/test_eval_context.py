"""The query-agnostic setting (``kvsift bench run --compress context``): the context / question
split, the runner with the fake backend and with the tiny model through kvsift's engine (every
registered method), the kvpress worker's context path, and reports that keep the two settings
apart."""

from __future__ import annotations

import argparse
import json

import pytest

from kvsift.eval.cli import add_bench_parser, run_bench
from kvsift.eval.fakes import ReadingBackend, WordTokenizer
from kvsift.eval.report import baseline_of, cell_stats, markdown_table, mode_rows, write_report
from kvsift.eval.runner import (BaseBackend, BenchConfig, KvsiftBackend, cell_key, kept_tokens, load_rows, run_cell,
                                run_grid)
from kvsift.eval.tasks import TASKS, TaskBuilder, TaskConfig, split_context_question

GEN_TASKS = [t for t in TASKS if t != "ppl"]


def _check_split(tok, samples, decode):
    for s in samples:
        ctx, q = split_context_question(tok, s)
        assert decode(ctx + q) == s.prompt, s.sample_id          # the concatenation is the prompt
        assert decode(ctx).endswith(s.context), s.sample_id      # the context part ends with the context
        assert decode(q).lstrip().startswith(s.question), s.sample_id
        assert abs(len(ctx) + len(q) - s.prompt_tokens) <= 2


def test_split_context_question_word_tokenizer():
    tok = WordTokenizer()
    b = TaskBuilder(tok, TaskConfig(samples=2))
    for task in GEN_TASKS:
        _check_split(tok, b.build(task, 400, 0), tok.decode)
    ppl = b.build("ppl", 200, 0)[0]
    with pytest.raises(ValueError, match="no context text"):
        split_context_question(tok, ppl)
    s = b.build("niah", 300, 0)[0]
    s.prompt = s.prompt.replace(s.context[:50], "")
    with pytest.raises(ValueError, match="not in the rendered prompt"):
        split_context_question(tok, s)


def test_split_context_question_chat_template(default_tokenizer):
    """With a real tokenizer and its chat template: the context part stops right after the context
    text, the question part holds the end of the user turn, the assistant opener and the prefix."""
    tok = default_tokenizer
    assert tok.chat_template
    b = TaskBuilder(tok, TaskConfig(samples=2, depths=(0.0, 1.0)))
    dec = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    for task in GEN_TASKS:
        samples = b.build(task, 600, 0)
        _check_split(tok, samples, dec)
        ctx, q = split_context_question(tok, samples[0])
        assert "assistant" in dec(q) and dec(q).endswith(samples[0].answer_prefix)


def _cfg(**kw):
    base = dict(tasks=["niah"], methods=["full", "snapkv"], budgets=["0.25"], lengths=[400], seeds=[0],
                task_config=TaskConfig(depths=(0.0, 0.5, 1.0), samples=6))
    base.update(kw)
    return BenchConfig(**base)


def test_context_mode_fake_backend(tmp_path):
    out = tmp_path / "r.jsonl"
    be = ReadingBackend(WordTokenizer())
    assert run_grid(be, _cfg(), out, progress=False, compress="context", log=None)["run"] == 2
    rows = {r["key"]: r for r in load_rows(out)}
    assert set(rows) == {"niah|full|full|400|0|context", "niah|snapkv|0.25|400|0|context"}
    assert cell_key("niah", "snapkv", 0.25, 400, 0, "context") == "niah|snapkv|0.25|400|0|context"
    snap = rows["niah|snapkv|0.25|400|0|context"]
    assert snap["compress"] == "context" and snap["settings"] == {"compress": "context"}
    assert len(be.context_calls) == 12 and be.batches == []  # one sample at a time, never the prompt path
    samples = TaskBuilder(be.tokenizer, _cfg().task_config).build("niah", 400, 0)
    for e, s, (nc, nq) in zip(snap["samples"], samples, be.context_calls[6:]):
        ctx, q = split_context_question(be.tokenizer, s)
        assert (e["context_tokens"], e["question_tokens"]) == (len(ctx), len(q)) == (nc, nq)
        assert e["prompt_tokens"] == nc + nq
        assert e["kv_kept_bytes"] == kept_tokens(0.25, nc) * 100  # the budget resolves against the context
        assert e["kv_full_bytes"] == nc * 100                     # nothing counted for the question
    # the needle at the end of the context stays in the kept tail; at 0 and 0.5 it is lost
    assert [e["score"] for e in snap["samples"]] == [0.0, 0.0, 1.0] * 2
    # the prompt setting goes to the same file under its own keys; reruns skip both
    assert run_grid(be, _cfg(), out, progress=False, log=None)["run"] == 2
    assert run_grid(be, _cfg(), out, progress=False, compress="context", log=None)["skipped"] == 2
    prompt = {r["key"]: r for r in load_rows(out)}["niah|snapkv|0.25|400|0"]
    assert prompt["compress"] == "prompt" and prompt["settings"] == {"compress": "prompt"}
    with pytest.raises(ValueError, match="compress must be one of"):
        run_grid(be, _cfg(), out, progress=False, compress="question")


def test_report_keeps_the_settings_apart(tmp_path):
    out = tmp_path / "r.jsonl"
    be = ReadingBackend(WordTokenizer())
    run_grid(be, _cfg(), out, progress=False, log=None)
    run_grid(be, _cfg(), out, progress=False, compress="context", log=None)
    rows = load_rows(out)
    assert sorted(r["method"] for r in mode_rows(rows)) == ["full", "full [ctx]", "snapkv", "snapkv [ctx]"]
    assert baseline_of("kvzip [ctx]") == "full [ctx]" and baseline_of("kvpress:kvzip [ctx]") == "kvpress:full [ctx]"
    assert baseline_of("kvpress:kvzip") == "kvpress:full"
    cs = {(d["method"], d["budget"]): d for d in cell_stats(rows)}
    assert cs[("snapkv [ctx]", "0.25")]["baseline"] == "full [ctx]" and cs[("snapkv", "0.25")]["baseline"] == "full"
    assert cs[("snapkv [ctx]", "0.25")]["value"] == pytest.approx(2 / 6)
    by_key = {r["key"]: r for r in rows}
    assert cs[("snapkv", "0.25")]["value"] == pytest.approx(by_key["niah|snapkv|0.25|400|0"]["score"])
    assert cs[("snapkv [ctx]", "0.25")]["n"] == 6 and cs[("snapkv", "0.25")]["n"] == 6
    md = markdown_table(rows)
    assert "| 400 | snapkv [ctx] | 0.25 | 6 |" in md and "| 400 | snapkv | 0.25 | 6 |" in md
    # kvpress rows without their own full cache fall back to kvsift's full in the same mode
    peer = tmp_path / "peer.jsonl"
    with peer.open("w") as f:
        for r in rows:
            if r["method"] == "snapkv":
                f.write(json.dumps(dict(r, method="kvpress:snapkv", key="kvpress:" + r["key"])) + "\n")
    cs = {(d["method"], d["budget"]): d for d in cell_stats(load_rows([out, peer]))}
    assert cs[("kvpress:snapkv [ctx]", "0.25")]["baseline"] == "full [ctx]"
    assert cs[("kvpress:snapkv", "0.25")]["baseline"] == "full"
    res = write_report([out, peer], tmp_path / "rep")
    assert any(p.name == "niah_heatmap_snapkv_ctx_.png" for p in res["plots"])


def test_backend_without_context_support_gives_an_error_row(tmp_path):
    class PromptOnly(BaseBackend):
        name, tokenizer = "prompt-only", WordTokenizer()
    out = tmp_path / "r.jsonl"
    counts = run_grid(PromptOnly(), _cfg(methods=["full"]), out, progress=False, compress="context", log=None)
    assert counts["errors"] == 1
    row = load_rows(out)[0]
    assert "does not support --compress context" in row["error"] and row["key"].endswith("|context")


def test_bench_cli_compress_context(tmp_path, capsys):
    ap = argparse.ArgumentParser()
    add_bench_parser(ap.add_subparsers(dest="command"))
    out = tmp_path / "res.jsonl"
    for mode in ("context", "prompt"):
        args = ap.parse_args(["bench", "run", "--backend", "fake", "--tasks", "niah", "--methods", "full,snapkv",
                              "--budgets", "0.5", "--lengths", "400", "--samples", "3", "--compress", mode,
                              "--out", str(out), "--no-progress"])
        assert run_bench(args) == 0
    assert sorted(r["compress"] for r in load_rows(out)) == ["context"] * 2 + ["prompt"] * 2
    assert run_bench(ap.parse_args(["bench", "report", str(out), "--out", str(tmp_path / "rep")])) == 0
    text = capsys.readouterr().out
    assert "| snapkv [ctx] |" in text and "| full [ctx] |" in text
    with pytest.raises(SystemExit):
        ap.parse_args(["bench", "run", "--compress", "question"])


def test_context_mode_every_method_on_the_tiny_model(tiny_llm, tmp_path):
    """Every registered method runs in the query-agnostic setting through prefill_context +
    generate(context=ctx): KV bytes are the context's, decode-time selection and planner methods
    answer with their own method; full answers as in the prompt setting when the split ids are the
    prompt's ids; a budget the context cannot hold gives a clear error row."""
    from kvsift.methods import available_methods, method_class

    be = KvsiftBackend(tiny_llm)
    methods = ["full"] + sorted(m for m in available_methods() if m != "full")
    cfg = BenchConfig(tasks=["niah"], methods=methods, budgets=[0.25], lengths=[260], seeds=[0],
                      task_config=TaskConfig(depths=(0.5,), samples=1))
    samples = TaskBuilder(be.tokenizer, cfg.task_config).build("niah", 260, 0)
    for s in samples:
        s.max_new_tokens = 4
    ctx, q = split_context_question(be.tokenizer, samples[0])
    own = {"quest", "tokenselect", "sentencekv", "squeezed", "shadowkv"}   # decode-time or host-offloaded KV
    for m in methods:
        b = None if m == "full" else 0.25
        row = run_cell(be, samples, "niah", m, b, 260, 0, compress="context")
        e = row["samples"][0]
        assert row["settings"]["compress"] == "context" and row["key"].endswith("|context")
        assert row["settings"]["answer_method"] == (m if m in own else "full"), m
        assert e["prompt_tokens"] == len(ctx) + len(q) and e["batch"] == 1
        ref = tiny_llm.prefill_context(ctx, method=m, budget=b)
        assert e["kv_device_bytes"] == ref.stats.kv_device_bytes, m   # the context's cache, nothing for q
        assert e["kv_full_bytes"] == ref.stats.kv_full_bytes
        if m == "full":
            full_ctx = e
        elif method_class(m).attention_only:  # minference: sparse prefill, every token kept
            assert e["kv_kept_bytes"] == full_ctx["kv_kept_bytes"], m
        elif m not in ("quest", "tokenselect", "squeezed"):
            assert e["kv_kept_bytes"] < full_ctx["kv_kept_bytes"], m
    whole = list(be.tokenizer.encode(samples[0].prompt, add_special_tokens=False))
    if whole == ctx + q:
        prompt = run_cell(be, samples, "niah", "full", None, 260, 0)
        assert prompt["samples"][0]["prediction"] == full_ctx["prediction"]
    out = tmp_path / "r.jsonl"
    counts = run_grid(be, BenchConfig(tasks=["niah"], methods=["snapkv"], budgets=[100000], lengths=[260],
                                      task_config=cfg.task_config), out, progress=False, compress="context", log=None)
    assert counts["errors"] == 1
    err = load_rows(out)[0]["error"]
    assert err.startswith("ContextModeError: --compress context: prefill_context with method 'snapkv' failed")
