"""tokenselect: soft votes pick the tokens the heads attend to; the selection cache; options."""

import pytest
import torch

from kvsift import SamplingParams
from kvsift.methods import build_method
from tests.conftest import random_prompt
from tests.test_quest import _decoded


def test_selection_contains_the_token_the_query_matches(tiny_llm):
    ids = random_prompt(150, seed=51)
    m = build_method("tokenselect", 8, local=4)
    cache, run, ctx = _decoded(tiny_llm, m, ids, steps=1)
    layer = cache.layers[0]
    target = 61
    q = layer.keys[:, :, target].repeat_interleave(2, dim=1)[:, :, None] * 50
    own = m.plan(run, layer, q, ctx).own                         # (1, kv_heads, 8 + 4)
    assert own.shape[-1] == 12 and bool((own[..., :8] == target).any(-1).all())
    newest = layer.length - 1
    assert own[..., 8:].tolist() == [[list(range(newest - 3, newest + 1))] * 2]


@pytest.mark.parametrize("vote", ["group", "layer"])
def test_layer_vote_shares_one_selection(tiny_llm, vote):
    ids = random_prompt(120, seed=52)
    m = build_method("tokenselect", 16, vote=vote)
    cache, run, ctx = _decoded(tiny_llm, m, ids, steps=1)
    q = torch.randn(1, 4, 1, tiny_llm.info.head_dim)
    own = m.plan(run, cache.layers[0], q, ctx).own
    same = torch.equal(own[:, 0].sort().values, own[:, 1].sort().values)
    assert same if vote == "layer" else own.shape[1] == 2


def test_selection_cache_reuses_while_queries_stay_alike(tiny_llm):
    ids = random_prompt(160, seed=53)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    always = tiny_llm.generate(ids, p, method="tokenselect", budget=32, method_kwargs={"reuse_threshold": -1.0})[0]
    never = tiny_llm.generate(ids, p, method="tokenselect", budget=32, method_kwargs={"reuse_threshold": 1.0})[0]
    assert always.stats.method_stats["reuse_rate"] == pytest.approx(6 / 7)   # every step after the first
    assert never.stats.method_stats["reuse_rate"] < 0.5


@pytest.mark.parametrize("kw,msg", [({"local": 0}, "local"), ({"vote": "x"}, "vote"),
                                    ({"reuse_threshold": 2.0}, "reuse_threshold"), ({"local": 1.5}, "local")])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_method("tokenselect", 64, **kw)
