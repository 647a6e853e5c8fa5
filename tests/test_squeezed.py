"""squeezed: k-means clusters of a context, cluster-sorted slots, reuse and persistence."""

import pytest
import torch

from kvsift import SamplingParams
from kvsift.methods import build_method
from kvsift.methods.squeezed import kmeans_directions
from kvsift.server.contexts import load_context, save_context
from tests.conftest import random_prompt

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


def test_kmeans_recovers_separated_directions():
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1) * 5
    truth = torch.arange(64) % 4
    keys = (dirs[truth] + 0.05 * torch.randn(64, 16, generator=g))[None, None]
    valid = torch.ones(1, 1, 64, dtype=torch.bool)
    valid[..., -3:] = False
    labels, means = kmeans_directions(keys, valid, 4, iters=10)
    lab = labels[0, 0, :-3]
    assert bool((labels[0, 0, -3:] == -1).all())
    for c in range(4):  # every true group maps to one cluster, and the clusters are distinct
        assert lab[truth[:-3] == c].unique().numel() == 1
    assert lab.unique().numel() == 4
    torch.testing.assert_close(means[0, 0, lab[0]], keys[0, 0, :-3][lab == lab[0]].mean(0))


def test_slots_are_sorted_by_cluster(tiny_llm):
    ctx = tiny_llm.prefill_context(random_prompt(200, seed=61), method="squeezed", budget=64,
                                   method_kwargs={"cluster_size": 16})
    for layer in ctx.cache.layers:
        st = layer.state["squeezed"]
        assert st.n == 200 and st.centroids.shape[2] == 200 // 16
        lab = st.labels
        assert bool((lab[..., 1:] >= lab[..., :-1]).all())            # contiguous clusters
        assert sorted(layer.positions[0, 0].tolist()) == list(range(200))


def test_context_answers_use_the_clusters_and_equal_full_at_full_budget(tiny_llm, tmp_path):
    doc, q = random_prompt(240, seed=62), random_prompt(12, seed=63)
    full = tiny_llm.generate(doc + q, GREEDY)[0].token_ids
    ctx = tiny_llm.prefill_context(doc, method="squeezed", budget=1.0)
    assert ctx.needs_planner
    assert tiny_llm.generate(q, GREEDY, context=ctx)[0].token_ids == full
    # a compressed selection still answers, and the clusters persist with the context
    small = tiny_llm.prefill_context(doc, method="squeezed", budget=48)
    a = tiny_llm.generate(q, GREEDY, context=small)[0]
    save_context(small, tmp_path / "c", {"kv_method": small.method, "kv_budget": 48, "kv_options": {},
                                         "stats": small.stats.to_dict()})
    loaded, _ = load_context(tmp_path / "c", tiny_llm)
    st0, st1 = small.cache.layers[0].state["squeezed"], loaded.cache.layers[0].state["squeezed"]
    assert st1.n == st0.n and torch.equal(st0.labels, st1.labels) and torch.equal(st0.centroids, st1.centroids)
    assert tiny_llm.generate(q, GREEDY, context=loaded)[0].token_ids == a.token_ids


def test_a_batch_of_questions_over_a_squeezed_context(tiny_llm):
    ctx = tiny_llm.prefill_context(random_prompt(200, seed=64), method="squeezed", budget=64)
    qs = [random_prompt(8, seed=65), random_prompt(11, seed=66)]
    outs = tiny_llm.generate(qs, GREEDY, context=ctx)
    assert [o.token_ids for o in outs] == [tiny_llm.generate(x, GREEDY, context=ctx)[0].token_ids for x in qs]


@pytest.mark.parametrize("kw,msg", [({"cluster_size": 1}, "cluster_size"), ({"iters": -1}, "iters"),
                                    ({"page": 0}, "page"), ({"reduce": "x"}, "reduce")])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_method("squeezed", 64, **kw)
