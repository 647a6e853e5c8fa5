"""quest: page bounds kept current on append, selection within budget, composition, options."""

import pytest
import torch

from kvsift import SamplingParams
from kvsift.methods import build_method
from kvsift.methods.quest import _bounds, refine_slots
from tests.conftest import decode_greedy, random_prompt


def _decoded(llm, m, ids, steps):
    return decode_greedy(llm, m, [ids], steps)


def test_bounds_follow_appended_tokens(tiny_llm):
    """After many decode steps (new pages filled on the way) the incrementally kept bounds equal
    bounds recomputed from the buffer."""
    m = build_method("quest", 32, page=8)
    cache, _, _ = _decoded(tiny_llm, m, random_prompt(100, seed=41), steps=21)
    for layer in cache.layers:
        st = layer.state["quest"]
        lo, hi, filled = _bounds(layer.keys, layer.positions, 8, st.pages)
        used = (layer.length + 7) // 8
        torch.testing.assert_close(st.kmin[:, :, :used], lo[:, :, :used])
        torch.testing.assert_close(st.kmax[:, :, :used], hi[:, :, :used])
        assert torch.equal(st.filled[:, :, :used], filled[:, :, :used])


@pytest.mark.parametrize("padded", [False, True])
def test_int8_bounds_follow_appended_tokens(tiny_llm, padded):
    """``bounds="int8"``: after decode steps (new pages on the way) the codes kept on append equal
    the float bounds rebuilt from the buffer, quantized outward with the layer's scales; a padded
    batch keeps them by rank the same way."""
    from kvsift.kernels.chunk_scores import quantize_bound
    from kvsift.methods.quest import _ranked

    m = build_method("quest", 32, page=8, bounds="int8")
    ids = [random_prompt(n, seed=170 + n) for n in ((70, 101) if padded else (100,))]
    cache, _, _ = decode_greedy(tiny_llm, m, ids, 21)
    for layer in cache.layers:
        st = layer.state["quest"]
        assert st.kmin.dtype == torch.int8 and (st.slot_of is not None) == padded
        if padded:
            lo, hi, filled, _, _ = _ranked(layer.keys, layer.positions, 8, st.pages, st.slot_of.shape[2])
        else:
            lo, hi, filled = _bounds(layer.keys, layer.positions, 8, st.pages)
        want_lo, want_hi = quantize_bound(lo, st.kinv, down=True), quantize_bound(hi, st.kinv, down=False)
        assert torch.equal(st.filled, filled)
        assert torch.equal(st.kmin[filled], want_lo[filled]) and torch.equal(st.kmax[filled], want_hi[filled])


def _plan_over_one_aligned_page(llm, m, first: int):
    """A 128-token prompt decoded one step, then layer 1's keys replaced by small noise except the
    16 slots from ``first``, set to the query; the method's plan for that query (summaries rebuilt
    from the buffer) and the layer."""
    return _plan_over_slots(llm, m, list(range(first, first + 16)))


def _plan_over_slots(llm, m, slots: list[int]):
    """As :func:`_plan_over_one_aligned_page`, with the query's direction at ``slots``."""
    cache, run, ctx = _decoded(llm, m, random_prompt(128, seed=42), steps=1)
    layer = cache.layers[1]
    g = torch.Generator().manual_seed(0)
    d = layer.k_buf.shape[-1]
    v = torch.randn(d, generator=g)
    with torch.inference_mode():
        layer.k_buf[:, :, :128] = 0.01 * torch.randn(layer.k_buf[:, :, :128].shape, generator=g)
        layer.k_buf[:, :, slots] = v
        del layer.state["quest"]                                      # rebuilt from the buffer
        return m.plan(run, layer, v.expand(1, 4, 1, d), ctx), layer


def test_int8_bounds_select_what_float_bounds_select_and_halve_the_summaries(tiny_llm):
    """On a prompt whose pages differ clearly (one page aligned with the query), the int8 codes
    pick the same page, and the summaries hold about half the bytes."""
    sels, nbytes = [], []
    for bounds in ("float", "int8"):
        sel, layer = _plan_over_one_aligned_page(tiny_llm, build_method("quest", 16, page=16, bounds=bounds), 80)
        sels.append(sel.own.tolist())
        st = layer.state["quest"]
        nbytes.append(st.kmin.nbytes + st.kmax.nbytes + (0 if st.kscale is None else st.kscale.nbytes + st.kinv.nbytes))
    assert sels[0] == sels[1] == [[[5, 8]] * 2]
    assert nbytes[1] < 0.6 * nbytes[0]


def test_int8_bounds_at_a_full_budget_equal_full(tiny_llm):
    ids = random_prompt(200, seed=44)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    full = tiny_llm.generate(ids, p, method="full")[0].token_ids
    assert tiny_llm.generate(ids, p, method="quest", budget=200, method_kwargs={"bounds": "int8"})[0].token_ids == full


def test_page_scores_bound_the_true_scores():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 64, 8, generator=g)
    pos = torch.arange(64, dtype=torch.int32).expand(1, 2, 64)
    lo, hi, _ = _bounds(keys, pos, 16, 4)
    q = torch.randn(1, 2, 8, generator=g)
    true = torch.einsum("bhd,bhnd->bhn", q, keys).view(1, 2, 4, 16).amax(-1)
    bound = torch.maximum(q[:, :, None] * lo, q[:, :, None] * hi).sum(-1)
    assert bool((bound >= true - 1e-5).all())


def test_selection_picks_the_page_a_query_points_at(tiny_llm):
    """Keys that are small noise except one page aligned with the query: that page is selected
    (with a budget of one page) besides the page being filled."""
    sel, _ = _plan_over_one_aligned_page(tiny_llm, build_method("quest", 16, page=16), 32)   # page indices
    assert sel.page == 16 and sel.own.tolist() == [[[2, 8]] * 2]     # page 2, then the page being filled
    own = sel.own_slots()                                             # (1, kv_heads, 16 + 16) slots
    assert own[..., :16].tolist() == [[list(range(32, 48))] * 2]
    assert own[..., 16:].tolist() == [[list(range(128, 144))] * 2]


def test_snapkv_then_quest_selects_within_the_kept_tokens(tiny_llm):
    ids = random_prompt(300, seed=43)
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    out = tiny_llm.generate(ids, p, method="snapkv+quest", budget=128, method_kwargs={"decode_budget": 64})[0]
    assert len(out.token_ids) == 6 and out.stats.kv_device_bytes < out.stats.kv_full_bytes


def test_dense_layers_attend_every_token_and_keep_no_summaries(tiny_llm):
    """``dense_layers=N``: the first N layers build no page summaries and select nothing (every
    token attended); the others select as before. With every layer dense, a one-page budget
    decodes what ``full`` decodes."""
    ids = random_prompt(240, seed=45)
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    n = tiny_llm.info.num_layers
    full = tiny_llm.generate(ids, p, method="full")[0].token_ids
    assert tiny_llm.generate(ids, p, method="quest", budget=16, method_kwargs={"dense_layers": n})[0].token_ids == full
    cache, _, _ = _decoded(tiny_llm, build_method("quest", 16, dense_layers=1), ids, steps=5)
    assert "quest" not in cache.layers[0].state
    assert all("quest" in layer.state for layer in cache.layers[1:])


@pytest.mark.parametrize("reduce,rank", [("max", "qk"), ("mean", "qk"), ("max", "votes")])
def test_refine_attends_the_best_tokens_of_the_candidate_pages(tiny_llm, reduce, rank):
    """``refine``: with a budget of one page, the tokens the query points at, scattered over eight
    pages (two a page), are all attended with the page being filled, ranked by ``q . k`` or by
    softmax votes; the paper's selection (one page) gets two of them."""
    wanted = [p * 16 + o for p in range(8) for o in (3, 11)]
    sel, layer = _plan_over_slots(tiny_llm, build_method("quest", 16, refine=8, reduce=reduce, refine_rank=rank),
                                  wanted)
    assert sel.page == 1 and sel.own.shape == (1, 2, 32)
    tail = [s for s in range(128, 144) if s < layer.length]            # the page being filled, as written
    for row in sel.own[0].tolist():
        assert [s for s in row if s >= 0] == sorted(wanted + tail)
    plain, _ = _plan_over_slots(tiny_llm, build_method("quest", 16, reduce=reduce), wanted)
    got = set(plain.own_slots()[0, 0].tolist()) & set(wanted)
    assert len(got) == 2


def test_refine_keeps_the_budget_and_equals_full_with_every_page(tiny_llm):
    """``refine`` attends at most ``budget // page * page`` tokens besides the page being filled,
    within the candidates; with a budget of the whole prompt it decodes what ``full`` decodes, in
    a padded batch as alone."""
    ids = random_prompt(200, seed=47)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    full = tiny_llm.generate(ids, p, method="full")[0].token_ids
    assert tiny_llm.generate(ids, p, method="quest", budget=200, method_kwargs={"refine": 2})[0].token_ids == full
    assert tiny_llm.generate(ids, p, method="quest", budget=200,
                             method_kwargs={"refine": 2, "refine_rank": "votes"})[0].token_ids == full
    m = build_method("quest", 40, refine=3)
    cache, run, ctx = _decoded(tiny_llm, m, ids, steps=3)
    layer = cache.layers[0]
    q = torch.randn(1, 4, 1, layer.k_buf.shape[-1])
    sel = m.plan(run, layer, q, ctx)
    assert sel.page == 1 and sel.own.shape[-1] == 32 + 16       # 2 pages' worth of tokens, then the tail page
    for row in sel.own[0]:                                      # per KV head: distinct written slots
        slots = row[row >= 0]
        assert slots.unique().numel() == slots.numel() and int(slots.max()) < layer.length
    ps = [random_prompt(n, seed=180 + n) for n in (150, 187)]
    alone = [tiny_llm.generate(x, p, method="quest", budget=40, method_kwargs={"refine": 3})[0].token_ids for x in ps]
    assert [o.token_ids for o in tiny_llm.generate(ps, p, method="quest", budget=40,
                                                   method_kwargs={"refine": 3})] == alone


def test_refine_slots_keeps_the_candidates_order_and_skips_what_cannot_be_attended():
    """``refine_slots``: the best ``keep`` candidates by the exact ``q . k`` (a GQA group reduced),
    in the candidates' own order, never a negative slot, one past the buffer or an empty slot;
    ``-1`` at the end when fewer are valid."""
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 2, 64, 8, generator=g)
    pos = torch.arange(64).expand(2, 2, 64).clone()
    pos[:, :, 40:] = -1                                               # empty slots
    q = torch.randn(2, 4, 8, generator=g)
    cand = torch.tensor([[30, 2, -1, 17, 45, 64, 9, 5]]).expand(2, 2, 8)  # -1, empty (45), past the buffer (64)
    got = refine_slots(q, keys, pos, cand, 3, "mean")
    for b in range(2):
        for h in range(2):
            ok = [s for s in cand[b, h].tolist() if 0 <= s < 40]
            s = {x: float((q[b, 2 * h:2 * h + 2] @ keys[b, h, x]).mean()) for x in ok}
            best = sorted(ok, key=lambda x: -s[x])[:3]
            assert got[b, h].tolist() == [x for x in cand[b, h].tolist() if x in best]
    assert refine_slots(q, keys, pos, cand, 8, "max")[0, 0].tolist() == [30, 2, 17, 9, 5, -1, -1, -1]


@pytest.mark.parametrize("kw,msg", [({"page": 0}, "page"), ({"reduce": "sum"}, "reduce"), ({"bounds": "fp8"}, "bounds"),
                                    ({"page": "16"}, "page"), ({"decode_budget": -1}, "decode_budget"),
                                    ({"dense_layers": -1}, "dense_layers"), ({"dense_layers": True}, "dense_layers"),
                                    ({"refine": 0}, "refine"), ({"refine": 2.0}, "refine"),
                                    ({"refine_rank": "softmax"}, "refine_rank")])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_method("quest", 64, **kw)


def test_page_selection_validates_and_expands():
    from kvsift.methods.base import Selection, top_pages

    with pytest.raises(ValueError, match="page"):
        Selection(own=torch.zeros(1, 1, 1, dtype=torch.int64), page=0)
    with pytest.raises(ValueError, match="own page indices"):
        Selection(page=16)
    sel = Selection(own=torch.tensor([[[2, -1, 0]]]), page=4)
    assert sel.own_slots().tolist() == [[[8, 9, 10, 11, -1, -1, -1, -1, 0, 1, 2, 3]]]
    scores = torch.tensor([[[0.5, float("-inf"), 2.0, 1.0]]])
    assert top_pages(scores, 2, tail_page=torch.tensor([3])).tolist() == [[[2, 3, 3]]]
    assert top_pages(scores, 0).shape == (1, 1, 0)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_quest_in_a_padded_batch_selects_as_alone(tiny_llm, default_tokenizer, mode):
    """A row's pages are counted from its first real token: in a left-padded batch (prompts of
    180, 219 and 220 tokens, pages of 16) every row selects the pages it selects alone, so its
    tokens are the ones alone; the bounds kept on append equal bounds rebuilt from the buffer."""
    from kvsift import LLM

    llm = tiny_llm if mode == "eager" else LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64,
                                                          decode_mode="static")
    ps = [random_prompt(n, seed=140 + n) for n in (180, 219, 220)]
    p = SamplingParams(max_tokens=24, ignore_eos=True)
    want = [tiny_llm.generate(x, p, method="quest", budget=48)[0].token_ids for x in ps]
    outs = llm.generate(ps, p, method="quest", budget=48)
    assert [o.token_ids for o in outs] == want
    assert all(o.stats.decode_mode == mode for o in outs)


def test_quest_in_a_padded_batch_attends_to_the_positions_it_attends_to_alone(tiny_llm, monkeypatch):
    """Sharper than the tokens (a tiny random model's tokens barely depend on which pages it
    reads): at every decode step and layer, each row of a left-padded batch attends to exactly the
    prompt and decode positions it attends to alone."""
    from kvsift.methods.quest import Quest

    seen: list = []
    real = Quest.plan

    def plan(self, run, layer, query, ctx):
        sel = real(self, run, layer, query, ctx)
        if sel is not None:
            slots = sel.own_slots()
            ok = (slots >= 0) & (slots < layer.positions.shape[2])
            pos = layer.positions.gather(2, slots.clamp(min=0, max=layer.positions.shape[2] - 1))
            pos = torch.where(ok & (pos >= 0), pos, -1)
            seen.append([sorted(set(pos[i, 0].tolist()) - {-1}) for i in range(pos.shape[0])])
        return sel

    monkeypatch.setattr(Quest, "plan", plan)
    m = build_method("quest", 48)
    ps = [random_prompt(n, seed=160 + n) for n in (150, 187, 203)]
    alone = []
    for x in ps:
        seen.clear()
        decode_greedy(tiny_llm, m, [x], 12)
        alone.append([s[0] for s in seen])
    seen.clear()
    decode_greedy(tiny_llm, m, ps, 12)
    assert len(seen) == len(alone[0]) > 0
    for i in range(len(ps)):
        assert [s[i] for s in seen] == alone[i], i


def test_ranked_pages_follow_appended_tokens(tiny_llm):
    """Left padding: the summaries by rank kept on append equal :func:`_ranked` rebuilt from the
    buffer after the decode steps, and every slot table entry names the slot of that rank."""
    from kvsift.methods.quest import _ranked

    m = build_method("quest", 32, page=8)
    ids = [random_prompt(n, seed=150 + n) for n in (70, 101)]
    cache, _, _ = decode_greedy(tiny_llm, m, ids, 21)
    for layer in cache.layers:
        st = layer.state["quest"]
        assert st.slot_of is not None
        lo, hi, filled, slot_of, count = _ranked(layer.keys, layer.positions, 8, st.pages, st.slot_of.shape[2])
        assert torch.equal(st.count, count)
        torch.testing.assert_close(st.kmin[filled], lo[filled])
        torch.testing.assert_close(st.kmax[filled], hi[filled])
        assert torch.equal(st.filled, filled) and torch.equal(st.slot_of, slot_of)
        # each row's tokens are positions 0 .. count-1: rank r sits in the slot holding position r
        pos = layer.positions.gather(2, slot_of.clamp(min=0)).long()
        ranks = torch.arange(slot_of.shape[2]).expand_as(slot_of)
        assert bool(((slot_of < 0) == (ranks >= count)).all())
        assert bool(torch.where(slot_of >= 0, pos == ranks, True).all())


def test_unpadded_rows_keep_the_page_path_in_every_mode(tiny_llm, default_tokenizer, monkeypatch):
    """One prompt, or a batch of equal lengths, selects page indices (the page kernel's path, no
    rank table) in eager and static decode alike; a padded batch selects slots by rank."""
    from kvsift import LLM
    from kvsift.methods.quest import Quest

    pages = []
    real = Quest.plan
    monkeypatch.setattr(Quest, "plan", lambda self, run, layer, q, ctx: (
        lambda sel: pages.append(sel.page if sel is not None else None) or sel)(real(self, run, layer, q, ctx)))
    static = LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64, decode_mode="static")
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    for llm in (tiny_llm, static):
        for prompts, want in (([random_prompt(150, seed=61)], 16),
                              ([random_prompt(150, seed=62), random_prompt(150, seed=63)], 16),
                              ([random_prompt(150, seed=64), random_prompt(131, seed=65)], 1)):
            pages.clear()
            llm.generate(prompts, p, method="quest", budget=32)
            assert pages and set(pages) - {None} == {want}, (llm.runner.decode_mode, len(prompts), set(pages))
