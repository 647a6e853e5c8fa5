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
