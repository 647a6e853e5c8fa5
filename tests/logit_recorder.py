"""A tiny random Llama whose last-position logits are recorded at every forward, and helpers to run
it: shared by the method test files that compare logits step by step (sentencekv, shadowkv)."""

import torch

from kvsift.engine.llm import LLM
from kvsift.engine.params import SamplingParams
from kvsift.models.tiny import tiny_model

VOCAB = 300
GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)


def recording_llm() -> LLM:
    """A tiny random Llama (2 layers, 4 q heads, 2 kv heads of 16) whose lm_head logits
    ``(batch, vocab)`` are appended to ``llm.logits``."""
    model = tiny_model("llama", seed=0, vocab_size=VOCAB)
    llm = LLM.from_model(model, None, "tiny", chunk_size=64)
    llm.logits = []
    model.lm_head.register_forward_hook(lambda m, i, o: llm.logits.append(o[:, -1].detach().clone()))
    return llm


def prompt(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def run(llm, ids, method="full", budget=None, params=GREEDY, **kw):
    """``(output, logits (steps, batch, vocab))``; logits None when rows were prefilled one at a
    time (no single stack)."""
    llm.logits.clear()
    out = llm.generate(ids, params, method=method, budget=budget, method_kwargs=kw)
    if len({x.shape for x in llm.logits}) > 1:
        return out, None
    return out, torch.stack(llm.logits)


def check_padded_batch_exact(llm, method, prefill_mode, **kw):
    """A left-padded batch of two prompts prefilled at once (``batch``) or one row at a time
    (``rows``) under ``method`` at a full budget: the same tokens and decode logits as ``full``."""
    batch = [prompt(200, seed=3), prompt(150, seed=4)]
    ref, ref_logits = run(llm, batch)
    llm.prefill_mode = prefill_mode
    try:
        out, _ = run(llm, batch, method, 1.0, **kw)
        decode_logits = torch.stack([x for x in llm.logits if x.shape[0] == 2][-3:])  # the 3 decode steps
    finally:
        llm.prefill_mode = "auto"
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    torch.testing.assert_close(decode_logits, ref_logits[-3:], atol=1e-4, rtol=1e-4)
