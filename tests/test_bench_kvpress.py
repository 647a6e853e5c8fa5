"""bench/vs_kvpress.py's press table (built against a stand-in kvpress module: no kvpress needed
here) and bench/headwise_memory.py's cells and table."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


vk = _load("vs_kvpress")
hm = _load("headwise_memory")


class _Press:
    def __init__(self, **kw):
        self.kw = kw


def _fake_kvpress():
    mod = types.SimpleNamespace()
    for spec in vk.PRESSES.values():
        if spec.cls:
            setattr(mod, spec.cls, type(spec.cls, (_Press,), {}))
    return mod


def test_every_press_builds_with_its_budget_argument():
    kp = _fake_kvpress()
    n, keep = 4095, 1023
    for name, spec in vk.PRESSES.items():
        p = vk.build_press(kp, name, keep, n, keep_total=keep + 1)
        if spec.cls is None:
            assert p is None
            continue
        assert type(p).__name__ == spec.cls
        if spec.budget == "ratio" and spec.inner is None:
            r = p.kw["compression_ratio"]
            assert int(n * (1 - r)) == keep  # kvpress's compute_n_kept
    ada = vk.build_press(kp, "adakv", keep, n)
    assert type(ada.kw["press"]).__name__ == "SnapKVPress" and int(n * (1 - ada.kw["press"].kw["compression_ratio"])) == keep
    assert type(vk.build_press(kp, "adakv(tova)", keep, n).kw["press"]).__name__ == "TOVAPress"
    dec = vk.build_press(kp, "decoding(knorm)", keep, n, keep_total=keep + 1, decoding_interval=4)
    assert dec.kw["target_size"] == keep + 1 and dec.kw["compression_interval"] == 4
    assert type(dec.kw["base_press"]).__name__ == "KnormPress" and dec.kw["base_press"].kw == {}
    duo = vk.build_press(kp, "duo", keep, n)
    assert duo.kw["on_the_fly_scoring"] is True
    h = duo.kw["head_compression_ratio"]  # streaming heads keep sink + recent, retrieval heads all n
    assert math.isclose(n - h * (n - vk.DUO_SINK - vk.DUO_RECENT), keep)


def test_duo_head_ratio_limits():
    assert vk.duo_head_ratio(100, 300) == 0.0        # prompt within sink + recent: nothing to mask
    assert vk.duo_head_ratio(100, 1000) == 1.0       # keep < 384: every head streaming, still above keep
    assert vk.duo_head_ratio(1000, 1000) == 0.0


def test_parse_press_errors():
    assert vk.parse_press("kvpress:adakv")[2] == "snapkv"
    assert vk.parse_press("decoding")[2] == "tova"
    for bad, msg in [("nope", "unknown press"), ("snapkv(tova)", "take a scorer"),
                     ("decoding(snapkv)", "decoding takes one of"), ("adakv(h2o)", "adakv takes one of")]:
        with pytest.raises(ValueError, match=msg):
            vk.parse_press(bad)
    with pytest.raises(SystemExit):
        vk.parse_args(["--presses", "full,nope"])
    assert vk.parse_args(["--presses", "all"]).presses.split(",") == list(vk.PRESSES)


def test_duo_corpus_stands_in_for_booksum():
    texts = vk.duo_corpus()
    assert len(texts) == 50 and all(len(t) == 4000 for t in texts)
    got = vk._LocalTexts(texts).to_pandas().sample(50, random_state=42)["chapter"].tolist()
    assert got == texts


def test_headwise_cells_table_and_default_presses():
    cells = hm.cells(["full", "snapkv"], [512, 1024], [0.25, 128])
    assert cells[:2] == [("full", 512, None), ("full", 1024, None)] and len(cells) == 6
    assert hm.default_presses("full,snapkv,quest,adakv(snapkv),decoding(snapkv)") == "full,snapkv,adakv(snapkv)"
    ok = hm.row("kvpress", "adakv", 1024, 0.25, kv_device_bytes=2 << 20, kv_kept_bytes=1 << 19,
                kv_full_bytes=2 << 20, kv_device_bytes_end=2 << 20, decode_ms_per_token=3.0)
    bad = hm.row("kvsift", "duo", 1024, 0.25, error="UnknownMethodError: unknown method 'duo'")
    assert ok["held_fraction"] == 1.0 and ok["attended_fraction"] == 0.25
    text = hm.table([ok, bad])
    assert "100.0%" in text and "25.0%" in text and "n/a" in text and "unknown method 'duo'" in text


def test_compress_option_parses():
    assert vk.parse_args([]).compress == "prompt"
    assert vk.parse_args(["--compress", "context"]).compress == "context"
    with pytest.raises(SystemExit):
        vk.parse_args(["--compress", "question"])


def _kvpress_backend(llm):
    """A KvpressBackend over an already loaded model (no model directory, no kvpress: ``full`` needs
    no press)."""
    import torch

    from kvsift.eval import runner

    be = object.__new__(vk.KvpressBackend)
    cfg = llm.model.config
    be.torch, be.runner, be.device, be.elt = torch, runner, torch.device("cpu"), 4
    be.tokenizer, be.model, be.model_name = llm.tokenizer, llm.model, "tiny"
    be.layers, be.kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    be.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    be.decoding_interval, be.eos = 1, set(llm.eos_ids)
    return be


def test_worker_context_path_matches_kvsift_full(tiny_llm, monkeypatch):
    """The worker's --compress context path (context prefill, then the question at positions c..,
    then greedy decoding) gives kvsift's tokens with the full cache, and its KV bytes are the
    context's."""
    from kvsift.eval.runner import KvsiftBackend
    from kvsift.eval.tasks import TaskBuilder, TaskConfig, split_context_question

    monkeypatch.setitem(sys.modules, "kvpress", _fake_kvpress())
    s = TaskBuilder(tiny_llm.tokenizer, TaskConfig(depths=(0.5,), samples=1)).build("niah", 260, 0)[0]
    ctx, q = split_context_question(tiny_llm.tokenizer, s)
    kp = _kvpress_backend(tiny_llm).generate_context(ctx, q, "full", None, 6)
    ks = KvsiftBackend(tiny_llm).generate_context(ctx, q, "full", None, 6)
    assert kp.text == ks.text and kp.prompt_tokens == ks.prompt_tokens == len(ctx) + len(q)
    assert kp.kv_device_bytes == kp.kv_full_bytes == ks.kv_full_bytes
    assert vk.KvpressBackend.context_settings(None, "decoding")["press_scope"].startswith("context prefilled without")


def test_worker_scores_a_ppl_batch_as_its_rows_alone(tiny_llm, monkeypatch):
    """kvpress's side scores ``ppl`` samples of one length as one batch (one prefill, one
    ``(batch, 1)`` step per token): each row's NLL equals its ``score`` alone and kvsift's with the
    full cache; each row gets its share of the batch's KV bytes."""
    import pytest

    from tests.conftest import random_prompt

    monkeypatch.setitem(sys.modules, "kvpress", _fake_kvpress())
    be = _kvpress_backend(tiny_llm)
    rows = [random_prompt(112, seed=60 + i) for i in range(3)]
    ctxs, conts = [r[:100] for r in rows], [r[100:] for r in rows]
    alone = [be.score(c, x, "full", None) for c, x in zip(ctxs, conts)]
    both = be.score_batch(ctxs, conts, "full", None)
    mine = [tiny_llm.score(c, x, method="full")[0] for c, x in zip(ctxs, conts)]
    assert [s.nll_sum for s in both] == pytest.approx([s.nll_sum for s in alone], rel=1e-4)
    assert [s.nll_sum for s in both] == pytest.approx(mine, rel=1e-4)
    assert all(s.batch == 3 and s.n_tokens == 12 for s in both)
    assert [s.kv_device_bytes for s in both] == [alone[0].kv_device_bytes] * 3
    with pytest.raises(ValueError, match="one length"):
        be.score_batch([ctxs[0], ctxs[1][:90]], conts[:2], "full", None)


def test_venv_hides_a_kernels_package_that_breaks_its_transformers(tmp_path):
    """The machine's ``kernels`` (newer than the pinned transformers knows) made ``import
    transformers`` fail in the kvpress venv; a stand-in that raises ImportError shadows it there,
    and only when the probe fails on it."""
    site = tmp_path / "site"
    site.mkdir()
    fake = tmp_path / "python"
    state = tmp_path / "broken"
    state.write_text("1")
    fake.write_text(f"""#!/bin/sh
case "$2" in
  *hub_kernels*) if [ "$(cat {state})" = 1 ]; then echo "ValueError: kernels LayerRepository wants a revision" >&2; exit 1; fi; exit 0;;
  *sysconfig*) echo {site};;
esac
""")
    fake.chmod(0o755)
    vk._hide_breaking_kernels(fake)
    stub = site / "kernels" / "__init__.py"
    assert stub.is_file()
    with pytest.raises(ImportError, match="hidden"):
        exec(compile(stub.read_text(), str(stub), "exec"), {})
    stub.unlink()
    state.write_text("0")   # transformers imports: nothing is written
    vk._hide_breaking_kernels(fake)
    assert not stub.exists()


def test_press_options_in_brackets(monkeypatch):
    """``snapkv[window_size=32]``: the options go to the press (to the scorer of a wrapper), the whole
    label names the rows, commas inside brackets stay in one label, and a press that does not take
    an option is an error before the model loads."""
    from dataclasses import dataclass

    kp = _fake_kvpress()
    assert vk.split_presses("full,snapkv[window_size=32,kernel_size=7],adakv(tova)") == [
        "full", "snapkv[window_size=32,kernel_size=7]", "adakv(tova)"]
    assert vk.parse_press("kvpress:snapkv[window_size=32]")[:1] == ("snapkv",)
    p = vk.build_press(kp, "snapkv[window_size=32,kernel_size=7]", 1023, 4095)
    assert p.kw["window_size"] == 32 and p.kw["kernel_size"] == 7 and "compression_ratio" in p.kw
    ada = vk.build_press(kp, "adakv(snapkv)[window_size=32]", 1023, 4095)
    assert ada.kw["press"].kw["window_size"] == 32 and "window_size" not in ada.kw
    dec = vk.build_press(kp, "decoding(tova)[window_size=8]", 10, 100, keep_total=11)
    assert dec.kw["base_press"].kw == {"window_size": 8}
    with pytest.raises(ValueError, match="no options"):
        vk.build_press(kp, "full[window_size=32]", 10, 100)
    assert vk.parse_args(["--presses", "full,snapkv[window_size=32,kernel_size=7]"]).presses

    @dataclass
    class SnapKVPress:   # the real press's fields (kvpress 0.5.5)
        compression_ratio: float = 0.0
        window_size: int = 64
        kernel_size: int = 5

    kp.SnapKVPress = SnapKVPress
    monkeypatch.setitem(sys.modules, "kvpress", kp)
    assert vk.check_press_options(["full", "snapkv", "snapkv[window_size=32]"]) is None
    assert "window" in vk.check_press_options(["snapkv[window=32]"])


def test_worker_prompt_path_whole_prompt_gives_kvsifts_tokens(tiny_llm, monkeypatch):
    """A prefill press takes the whole prompt (its scoring queries end at the last prompt token, as
    kvsift's) and the first token comes from that forward's last position: with no press doing
    anything, the tokens are kvsift's full-cache tokens, as on the ``n - 1``-then-feed path that
    ``full`` and decode-time presses keep. Rows say which path ran."""
    from kvsift import SamplingParams
    from tests.conftest import random_prompt

    monkeypatch.setitem(sys.modules, "kvpress", _fake_kvpress())
    be = _kvpress_backend(tiny_llm)
    ids = random_prompt(90, seed=7)
    want = tiny_llm.generate([ids], SamplingParams(max_tokens=6, ignore_eos=True), method="full")[0].token_ids
    fed = be.run_prompts([ids], "full", None, 6, ignore_eos=True)["ids"][0]
    monkeypatch.setattr(vk, "press_scores_prompt", lambda name: True)
    whole = be.run_prompts([ids], "full", None, 6, ignore_eos=True)["ids"][0]
    assert fed == whole == list(want)
    monkeypatch.undo()
    assert vk.press_scores_prompt("tova") and vk.press_scores_prompt("snapkv[window_size=32]")
    assert not vk.press_scores_prompt("full") and not vk.press_scores_prompt("decoding(tova)")
    assert vk.KvpressBackend.prompt_settings(None, "tova") == {"press_prefill": "whole prompt"}
