"""The compact per-head KV layout (``kvsift.cache.ragged.RaggedKV``): what ``SiftLayer.keep``
uses when kept lengths differ per head. It holds only the kept tokens, attends exactly like the
padded layout with holes (CPU reference here, the Triton kernel on CUDA), and survives clone,
batch stacking and persistence."""

import pytest
import torch

import kvsift.cache.layer as layer_mod
from kvsift import SamplingParams
from kvsift.cache import SiftCache
from kvsift.cache.ragged import RaggedKV
from kvsift.engine.attention import selected_attention
from kvsift.kernels.sparse_decode_attention import sparse_decode_attention_ref
from kvsift.methods.adakv import AdaKV
from kvsift.methods.base import keep_top
from kvsift.methods.snapkv import SnapKV
from tests.conftest import random_prompt


def _layer(b=2, h=2, n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = SiftCache(1, capacity_hint=n + 4, reserve=4)
    cache.step_positions = torch.arange(n, dtype=torch.int32).expand(b, n)
    layer = cache.layers[0]
    layer.update(torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g))
    return cache, layer


def test_build_keeps_each_heads_tokens_in_order_without_padding():
    cache, layer = _layer()
    keys, values, pos = layer.keys.clone(), layer.values.clone(), layer.positions.clone()
    idx = torch.tensor([[[0, 3, 5, 7, 9, 11], [2, -1, -1, -1, -1, -1]],
                        [[-1, 4, -1, 8, -1, -1], [1, 2, 3, -1, 10, 11]]])
    r = RaggedKV.build(keys, values, pos, idx)
    assert r.head_lengths().tolist() == [[6, 1], [2, 5]]
    assert r.keys.shape[0] == 14 and r.slots.shape[2] == 6      # every kept token once; longest head
    assert r.counts.tolist() == [[6, 1], [2, 5]] and r.fill == pytest.approx(14 / 24)
    for b in range(2):
        for h in range(2):
            want = idx[b, h][idx[b, h] >= 0]
            got = r.slots[b, h][r.slots[b, h] >= 0].long()
            torch.testing.assert_close(r.keys[got], keys[b, h, want])
            torch.testing.assert_close(r.values[got], values[b, h, want])
            assert torch.equal(r.positions[got], pos[b, h, want])
    assert r.tokens() == 14 and r.used_bytes() == 2 * 14 * 8 * 4
    # stacking rows prefilled one at a time, and a dense row converted
    one = RaggedKV.build(keys[:1], values[:1], pos[:1], idx[:1])
    dense = RaggedKV.from_dense(keys[1:], values[1:], pos[1:])
    both = RaggedKV.stack([one, dense])
    assert both.head_lengths().tolist() == [[6, 1], [12, 12]] and both.keys.shape[0] == 7 + 24
    torch.testing.assert_close(both.keys[both.slots[1, 1, :12].long()], keys[1, 1])
    # a batch repeated (a context answering several questions): each copy reads its own row
    rep = r.clone(batch_repeat=3)
    assert rep.head_lengths().tolist() == [[6, 1]] * 3 + [[2, 5]] * 3
    for i in range(6):
        b = i // 3
        for h in range(2):
            got = rep.slots[i, h][rep.slots[i, h] >= 0].long()
            torch.testing.assert_close(rep.keys[got], keys[b, h, idx[b, h][idx[b, h] >= 0]])


def test_rows_of_a_running_store_stack_into_a_new_batch_with_dense_rows():
    """Continuous batching's rebuild: ``RaggedKV.rows`` takes some rows of a running compact store
    (their used slots, appended decode tokens included, no room), and ``set_rows`` stacks them with
    a dense row prefilled apart into one compact store; every head keeps exactly its tokens."""
    from kvsift.engine.llm import _row_kv

    cache, layer = _layer(b=3, h=2, n=12)
    keys, values, pos = layer.keys.clone(), layer.values.clone(), layer.positions.clone()
    idx = torch.tensor([[[0, 3, 5, 7, 9, 11], [2, -1, -1, -1, -1, -1]],
                        [[-1, 4, -1, 8, -1, -1], [1, 2, 3, -1, 10, 11]],
                        [[0, 1, -1, -1, -1, -1], [5, -1, -1, -1, -1, -1]]])
    r = RaggedKV.build(keys, values, pos, idx, room=2)
    g = torch.Generator().manual_seed(3)
    k_new, v_new = torch.randn(3, 2, 1, 8, generator=g), torch.randn(3, 2, 1, 8, generator=g)
    r.append(k_new, v_new, torch.full((3, 1), 12, dtype=torch.int32))      # one decode step
    sub = r.rows([2, 0])
    assert sub.head_lengths().tolist() == [[3, 2], [7, 2]] and sub.room == 0 and sub.keys.shape[0] == 14
    for j, b in enumerate((2, 0)):
        for h in range(2):
            want = idx[b, h][idx[b, h] >= 0]
            got = sub.slots[j, h][sub.slots[j, h] >= 0].long()
            torch.testing.assert_close(sub.keys[got], torch.cat([keys[b, h, want], k_new[b, h]]))
            torch.testing.assert_close(sub.values[got], torch.cat([values[b, h, want], v_new[b, h]]))
            assert sub.positions[got].tolist() == pos[b, h, want].tolist() + [12]
    # a running compact layer's row next to a dense row (with left padding and a hole): one store
    layer.ragged = r
    layer.set_kv(layer.k_buf.new_zeros(3, 2, 0, 8), layer.v_buf.new_zeros(3, 2, 0, 8),
                 layer.pos_buf.new_zeros(3, 2, 0), reserve=0)
    _, dense = _layer(b=1, h=2, n=6, seed=5)
    dense.pos_buf[0, :, 0] = -1            # left padding: no head uses slot 0
    dense.pos_buf[0, 1, 3] = -1            # head 1 evicted slot 3
    rows = [_row_kv(layer, 1), _row_kv(dense, 0)]
    assert rows[1][2].shape[-1] == 5       # the padding slot dropped, the one head's hole kept
    out = SiftCache(1, reserve=4).layers[0]
    assert out.set_rows(rows) and out.ragged is not None
    assert out.ragged.head_lengths().tolist() == [[3, 6], [5, 4]]
    got = out.ragged.slots[1, 1][out.ragged.slots[1, 1] >= 0].long()
    assert out.ragged.positions[got].tolist() == [1, 2, 4, 5]


def _naive(q, keys, values, pos, lens_idx, scale):
    """Per (batch, kv head): softmax over exactly the kept tokens; q (b, hq, d)."""
    b, hq, d = q.shape
    h = keys.shape[1]
    g = hq // h
    out = torch.zeros(b, hq, d)
    for bi in range(b):
        for hi in range(h):
            sl = lens_idx[bi, hi][lens_idx[bi, hi] >= 0]
            k, v = keys[bi, hi, sl], values[bi, hi, sl]
            for gi in range(g):
                w = torch.softmax(q[bi, hi * g + gi] @ k.T * scale, -1)
                out[bi, hi * g + gi] = w @ v
    return out


def test_decode_attention_over_compact_heads_is_exact():
    """A layer whose heads keep 11 and 2 tokens goes compact; a decode step's attention (eager
    and static) equals a naive softmax per head over the kept tokens plus the new one."""
    cache, layer = _layer(b=2, h=2, n=12, d=8)
    keys, values = layer.keys.clone(), layer.values.clone()
    scores = torch.rand(2, 2, 12, generator=torch.Generator().manual_seed(1))
    k = torch.tensor([[11, 2], [3, 10]])
    keep_top(layer, scores, k)
    assert layer.ragged is not None and layer.length == 0
    assert torch.equal(layer.head_lengths(), k)
    kept = scores.masked_fill(torch.zeros_like(scores, dtype=torch.bool), 0).topk(11, -1).indices
    kept = torch.where(torch.arange(11) < k[..., None], kept, -1)
    # the new token at position 12
    g = torch.Generator().manual_seed(2)
    nk, nv = torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g)
    cache.step_positions = torch.full((2, 1), 12, dtype=torch.int32)
    layer.update(nk, nv)
    q = torch.randn(2, 4, 1, 8, generator=g)
    all_k = torch.cat([keys, nk], 2)
    all_v = torch.cat([values, nv], 2)
    idx = torch.cat([kept, torch.full((2, 2, 1), 12)], -1)
    want = _naive(q[:, :, 0], all_k, all_v, None, idx, 0.35)
    got = selected_attention(q, layer, None, cache.step_positions, 0.35, static=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got_static = selected_attention(q, layer, None, cache.step_positions, 0.35, static=True)
    torch.testing.assert_close(got_static, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernel)")
def test_triton_kernel_reads_the_compact_layout_like_the_reference():
    from kvsift.kernels.dispatch import ragged_splits, sparse_decode_attention

    torch.manual_seed(0)
    b, h, n, d = 2, 4, 700, 128
    keys, values = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16), torch.randn(
        b, h, n, d, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(n, device="cuda", dtype=torch.int32).expand(b, h, n).contiguous()
    lens = torch.tensor([[700, 40, 300, 5], [1, 650, 64, 64]], device="cuda")
    idx = torch.where(torch.arange(n, device="cuda") < lens[..., None], torch.arange(n, device="cuda"), -1)
    r = RaggedKV.build(keys, values, pos, idx)
    src = r.source()
    q = torch.randn(b, 4 * h, d, device="cuda", dtype=torch.bfloat16)
    qp = torch.full((b,), n, device="cuda", dtype=torch.int32)
    ref = sparse_decode_attention_ref(q, src.keys, src.values, src.slots, 0.088, key_pos=src.positions, query_pos=qp)
    splits = ragged_splits(q, h, src.slots.shape[2], r.fill)
    for kw in ({}, {"slot_count": r.counts}, {"slot_count": r.counts, "num_splits": splits}):
        got = sparse_decode_attention(q, src.keys, src.values, src.slots, 0.088, key_pos=src.positions,
                                      query_pos=qp, **kw)
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_slot_count_bounds_each_heads_table():
    """Entries past a head's count are not read, even where they name valid slots."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 2, 10, 4, generator=g), torch.randn(1, 2, 10, 4, generator=g)
    q = torch.randn(1, 2, 4, generator=g)
    table = torch.arange(10).expand(1, 2, 10)
    count = torch.tensor([[3, 10]], dtype=torch.int32)
    got = sparse_decode_attention_ref(q, k, v, table, 0.5, slot_count=count)
    want = sparse_decode_attention_ref(q, k, v, torch.where(torch.arange(10) < count[..., None], table, -1), 0.5)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="slot_count"):
        sparse_decode_attention_ref(q, k, v, table, 0.5, slot_count=count[0])


class _Lopsided(SnapKV):
    """SnapKV with head 0's scores raised: AdaKV gives head 0 most of each layer's budget."""

    def score(self, *args):
        s = super().score(*args)
        s[:, 0] += 10.0
        return s


def lopsided_adakv(budget, alpha=0.1):
    m = AdaKV(budget=budget, alpha=alpha)
    m.wrap(_Lopsided(budget=budget))
    return m


def test_compact_and_padded_layouts_score_the_same(tiny_llm, monkeypatch):
    """The whole model: AdaKV's per-head lengths stored compactly give the same log-likelihood as
    the same lengths stored padded with holes (``RAGGED_SAVING = 0`` forces that layout)."""
    ids = random_prompt(200, seed=5)
    cont = random_prompt(12, seed=6)
    compact, st = tiny_llm.score(ids, cont, method=lopsided_adakv(24))
    monkeypatch.setattr(layer_mod, "RAGGED_SAVING", 0.0)
    padded, st_p = tiny_llm.score(ids, cont, method=lopsided_adakv(24))
    assert compact == pytest.approx(padded, rel=1e-5, abs=1e-4)
    assert st.kv_device_bytes < st_p.kv_device_bytes


def test_clone_repeat_and_state_dict_keep_the_compact_layout(tiny_llm):
    ids = random_prompt(200, seed=7)
    ctx = tiny_llm.prefill_context(ids, method=lopsided_adakv(24))
    assert all(ly.ragged is not None for ly in ctx.cache.layers)
    twin = ctx.cache.clone(batch_repeat=3)
    back = SiftCache.from_state_dict(ctx.cache.state_dict(), len(ctx.cache.layers), ctx.cache.seen)
    for a, t, r in zip(ctx.cache.layers, twin.layers, back.layers):
        assert torch.equal(t.head_lengths(), a.head_lengths().repeat(3, 1))
        assert torch.equal(r.head_lengths(), a.head_lengths())
        assert (a.ragged is None) == (r.ragged is None)
        if a.ragged is not None:
            torch.testing.assert_close(r.ragged.keys, a.ragged.keys)
    p = SamplingParams(max_tokens=5, ignore_eos=True)
    q = random_prompt(6, seed=8)
    assert tiny_llm.generate(q, p, context=ctx)[0].token_ids == tiny_llm.generate(q, p, context=ctx)[0].token_ids
