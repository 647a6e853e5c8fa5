"""``chunked(<scorer>)``: keep-as-you-go prefill. The device never holds the prompt's whole KV: after
each prefill chunk the layer keeps ``hold * budget`` slots, and the prefill buffers are sized for that
plus one chunk."""

import pytest

from kvsift import LLM, SamplingParams, build_method
from kvsift.cache.layer import SiftLayer
from kvsift.errors import MethodOptionError
from kvsift.models import tiny_model
from tests.conftest import random_prompt

CHUNK = 64


@pytest.fixture(scope="module")
def llm():
    return LLM.from_model(tiny_model("llama", seed=1), None, chunk_size=CHUNK, decode_mode="eager")


def _largest_buffer(monkeypatch, llm, ids, **kw):
    """Generate, and return the largest KV buffer any layer allocated (slots) with the result."""
    seen = [0]
    orig = SiftLayer._alloc

    def spy(self, b, h, cap, d, dtype, device):
        seen[0] = max(seen[0], cap)
        return orig(self, b, h, cap, d, dtype, device)

    monkeypatch.setattr(SiftLayer, "_alloc", spy)
    out = llm.generate(ids, SamplingParams(max_tokens=6, ignore_eos=True), **kw)
    monkeypatch.setattr(SiftLayer, "_alloc", orig)
    return seen[0], out


@pytest.mark.parametrize("prefill_mode", ["batch", "rows"])
def test_device_kv_during_prefill_is_bounded_by_what_is_kept_plus_a_chunk(monkeypatch, llm, prefill_mode):
    ids = [random_prompt(1500, seed=1), random_prompt(1100, seed=2)]
    llm.runner.prefill_mode = prefill_mode
    try:
        big, _ = _largest_buffer(monkeypatch, llm, ids, method="snapkv", budget=64)
        small, out = _largest_buffer(monkeypatch, llm, ids, method="chunked(snapkv)", budget=64)
    finally:
        llm.runner.prefill_mode = "auto"
    assert big >= 1500                       # snapkv: the whole prompt first, compressed at the end
    # chunked: budget + one chunk, plus the buffer's growth margin (x1.5 + 16) and the decode reserve
    assert small <= 1.5 * (64 + CHUNK) + 16 + 16
    assert out[0].stats.kv_kept_bytes == llm.generate(ids, SamplingParams(max_tokens=6, ignore_eos=True),
                                                      method="snapkv", budget=64)[0].stats.kv_kept_bytes


def test_hold_keeps_more_between_chunks(monkeypatch, llm):
    ids = [random_prompt(1500, seed=3)]
    one, _ = _largest_buffer(monkeypatch, llm, ids, method="chunked(snapkv)", budget=64)
    four, _ = _largest_buffer(monkeypatch, llm, ids, method="chunked(snapkv)", budget=64,
                              method_kwargs={"hold": 4.0})
    assert one < four <= 1.5 * (4 * 64 + CHUNK) + 32


@pytest.mark.parametrize("scorer", ["snapkv", "streaming", "tova", "expected_attention", "pyramidkv"])
def test_a_budget_of_the_whole_prompt_gives_the_full_tokens(llm, scorer):
    ids = [random_prompt(400, seed=4), random_prompt(330, seed=5)]
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    full = [x.token_ids for x in llm.generate(ids, p)]
    assert [x.token_ids for x in llm.generate(ids, p, method=f"chunked({scorer})", budget=1.0)] == full


def test_streaming_chunked_keeps_what_streaming_keeps(llm):
    """Sinks and the most recent tokens are what streaming keeps whether it looks at the prompt at
    the end or after every chunk: the same tokens."""
    ids = [random_prompt(700, seed=6)]
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    a = llm.generate(ids, p, method="streaming", budget=100)[0].token_ids
    assert llm.generate(ids, p, method="chunked(streaming)", budget=100)[0].token_ids == a


def test_rows_and_batch_prefill_agree(llm):
    ids = [random_prompt(600, seed=7), random_prompt(300, seed=8), random_prompt(90, seed=9)]
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    out = {}
    for mode in ("batch", "rows"):
        llm.runner.prefill_mode = mode
        try:
            out[mode] = [x.token_ids for x in llm.generate(ids, p, method="chunked(snapkv)", budget=48)]
        finally:
            llm.runner.prefill_mode = "auto"
    assert out["rows"] == out["batch"]


def test_options_and_scorers_are_checked():
    assert build_method("chunked", 64).spec == "chunked(snapkv)"
    assert build_method("chunked(snapkv)+kivi", 64).stages[0].spec == "chunked(snapkv)"
    for spec in ("chunked(h2o)", "chunked(kvzip)", "chunked(duo)", "chunked(sentencekv)"):
        with pytest.raises(MethodOptionError):
            build_method(spec, 64)
    for kw, word in [({"hold": 0.5}, "hold"), ({"hold": True}, "hold"), ({"window": 0}, "window")]:
        with pytest.raises(MethodOptionError, match=word):
            build_method("chunked", 64, **kw)


def test_cli_rejects_bad_options_before_loading(tmp_path, capsys):
    from kvsift.cli import main

    doc = tmp_path / "doc.txt"
    doc.write_text("hello world")
    for opts, word in [(["--method", "chunked(h2o)"], "per-slot"), (["--method-opt", "hold=0.5"], "hold")]:
        assert main(["generate", "--prompt-file", str(doc), "--method", "chunked", "--budget", "64", *opts]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvsift: error:") and word in err
