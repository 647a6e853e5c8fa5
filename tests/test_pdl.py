"""Programmatic dependent launch (kvsift/kernels/_triton.py): the switch (off by default, an
environment variable and a ``with`` block), that it never applies off CUDA or where Triton or the
GPU lacks it, and on a Hopper GPU that the decode selection chains launched with it (Quest's page
scores, top-k and sparse attention; TokenSelect's votes, blocked top-k and attention; the exact
slot scores of Quest's ``refine``), captured in CUDA graphs, give exactly what they give without
it, as does a whole generation in graph mode (sentencekv's included, whose fetches run on a
second stream). That each kernel compiles with it for a Hopper target, without a GPU:
tests/test_compile_sm90.py."""

from __future__ import annotations

import pytest
import torch

from kvsift import LLM, SamplingParams
from kvsift.kernels import _triton
from kvsift.kernels import dispatch
from kvsift.kernels._triton import pdl, pdl_launch, pdl_supported
from kvsift.kernels.chunk_scores import page_summaries
from kvsift.models import tiny_model
from tests.conftest import random_prompt


def test_the_switch_is_off_by_default_scoped_and_never_applies_off_cuda(monkeypatch):
    for value, on in (("1", True), ("on", True), ("", False), ("0", False), ("no", False)):
        monkeypatch.setenv("KVSIFT_PDL", value)
        assert _triton._env_pdl() is on
    before = _triton._PDL["on"]
    cpu = torch.zeros(1)
    with pdl(True):
        assert _triton._PDL["on"] is True
        assert pdl_launch(cpu) == {"PDL": False} and not pdl_supported(cpu.device)   # the CPU: never
        with pdl(False):
            assert _triton._PDL["on"] is False
        assert _triton._PDL["on"] is True
    assert _triton._PDL["on"] is before
    with pytest.raises(RuntimeError):
        with pdl(True):
            raise RuntimeError("restored even so")
    assert _triton._PDL["on"] is before


hopper = pytest.mark.skipif(not (torch.cuda.is_available() and pdl_supported(torch.device("cuda"))),
                            reason="needs a CUDA GPU of compute capability >= 9 and a Triton with PDL")


def _graphed(fn, on: bool):
    """``fn()`` captured in a CUDA graph with PDL on or off, replayed twice; its output."""
    with pdl(on):
        fn()                       # compile and warm up outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
        g.replay()
        g.replay()
        torch.cuda.synchronize()
    return out.clone()


def _case(b=2, hq=32, hk=8, n=131072 // 8, d=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, hk, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, hk, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


@hopper
@pytest.mark.parametrize("pages_k", [16, 128])
def test_quest_chain_under_a_graph_is_unchanged(pages_k):
    q, k, v = _case()
    summ = page_summaries(k, 16, "minmax")

    def step():
        sc = dispatch.chunk_scores(q, summ, "max")
        pages = dispatch.select_chunks(sc, 16, pages_k * 16)
        return dispatch.sparse_decode_attention(q, k, v, pages, 0.088, page=16)

    assert torch.equal(_graphed(step, True), _graphed(step, False))


@hopper
def test_tokenselect_chain_and_refine_slots_under_a_graph_are_unchanged():
    q, k, v = _case(n=32768)
    b, hk, n = k.shape[:3]
    pos = torch.arange(n, device="cuda", dtype=torch.int32).expand(b, hk, n)
    limit = torch.full((b,), n, device="cuda")
    skip = torch.tensor([False, True], device="cuda")

    def tokens():
        votes = dispatch.token_votes(q, k, pos, limit, "group", float("-inf"), skip)
        idx = dispatch.topk_select(votes, 1024, torch.int64, skip, out=torch.zeros(b, hk, 1024, dtype=torch.int64,
                                                                                   device="cuda"))
        return dispatch.sparse_decode_attention(q, k, v, idx, 0.088)

    assert torch.equal(_graphed(tokens, True), _graphed(tokens, False))
    cand = torch.randint(-1, n, (b, hk, 4096), device="cuda")
    for reduce in ("max", "votes"):
        def scores(reduce=reduce):
            return dispatch.slot_scores(q, k, pos, cand, reduce)

        assert torch.equal(_graphed(scores, True), _graphed(scores, False))


@hopper
@pytest.mark.parametrize("spec,budget,kw", [("quest", 64, None), ("quest", 64, {"refine": 3, "refine_rank": "votes"}),
                                            ("tokenselect", 48, None), ("sentencekv", 96, None)])
def test_graph_decode_with_pdl_gives_the_same_tokens(spec, budget, kw):
    """sentencekv too: its chunk scores launch with PDL among fetches on a second stream, whose
    event waits must still hold (a race would show as other tokens, if not every time)."""
    m = tiny_model("llama", seed=1).to("cuda")
    ids = [random_prompt(300, seed=8), random_prompt(260, seed=9)]
    p = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = {}
    for on in (False, True):
        with pdl(on):
            llm = LLM.from_model(m, None, chunk_size=64, decode_mode="graph")
            outs[on] = [o.token_ids for o in llm.generate(ids, p, method=spec, budget=budget, method_kwargs=kw)]
    assert outs[True] == outs[False]
