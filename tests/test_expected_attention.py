"""expected_attention: un-rotating post-RoPE queries inverts transformers' RoPE (and recovers the
model's own pre-RoPE queries), the averaged rotation and the scores equal naive formulas, chunked
statistics merge exactly, the engine's scores equal a float64 reference built from the model's
queries, exactness at a budget of the whole prompt, options."""

from dataclasses import dataclass

import pytest
import torch

from kvsift import SamplingParams
from kvsift.engine.attention import rope_function
from kvsift.methods import build_method
from kvsift.methods.expected_attention import (ExpectedAttention, chunk_stats, expected_scores, future_stats,
                                               merge_stats, rotate, unrotate)
from kvsift.models import tiny_model
from tests.conftest import random_prompt


def rope_matrix(cos, sin):
    """Explicit RoPE matrices ``(..., d, d)`` from ``cos/sin (..., d)``: diag(cos) + diag(sin) P."""
    d = cos.shape[-1]
    h = d // 2
    P = torch.zeros(d, d, dtype=cos.dtype)
    P[:h, h:], P[h:, :h] = -torch.eye(h, dtype=cos.dtype), torch.eye(h, dtype=cos.dtype)
    return torch.diag_embed(cos) + sin[..., None] * P


@pytest.mark.parametrize("family,scaling", [("llama", None), ("llama", 1.25), ("qwen2", None), ("gemma3", None)])
def test_unrotate_inverts_transformers_rope(family, scaling):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_model(family)
    if scaling is not None:  # e.g. YaRN's attention scaling multiplies cos and sin
        model.model.rotary_emb.attention_scaling = scaling
    rope = rope_function(model)
    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([[0, 3, 77, 1000, 4000]])
    q = torch.randn(1, 4, 5, 16, generator=g)
    for layer_idx in (0, 1):  # gemma3: a sliding layer and a global one, each with its own rope
        cos, sin = rope(pos, layer_idx)
        post, _ = apply_rotary_pos_emb(q, q, cos, sin)
        torch.testing.assert_close(rotate(q, cos, sin), post)
        torch.testing.assert_close(unrotate(post, cos, sin), q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rotate(unrotate(post, cos, sin), cos, sin), post, rtol=1e-5, atol=1e-5)
        expect = rope_matrix(cos[0], sin[0]) @ q[0].unsqueeze(-1)                  # (h, n, d, 1)
        torch.testing.assert_close(post[0], expect[..., 0], rtol=1e-5, atol=1e-5)


def test_future_stats_use_the_rotation_averaged_over_future_positions():
    model = tiny_model("llama")
    rope = rope_function(model)
    g = torch.Generator().manual_seed(1)
    b, h, d, F = 2, 4, 16, 9
    mean = torch.randn(b, h, d, generator=g)
    a = torch.randn(b, h, d, d, generator=g)
    cov = a @ a.transpose(-1, -2)
    pos = torch.tensor([[50], [7]]) + torch.arange(F)
    cos, sin = rope(pos, 0)
    mu, cv = future_stats(mean, cov, cos, sin)
    R = rope_matrix(cos.double(), sin.double()).mean(1)                           # (b, d, d)
    torch.testing.assert_close(mu.double(), (R[:, None] @ mean.double()[..., None])[..., 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cv.double(), R[:, None] @ cov.double() @ R[:, None].transpose(-1, -2),
                               rtol=1e-4, atol=1e-4)
    # the mean term is exactly the average over future positions of the rotated mean's logit
    k = torch.randn(d, generator=g).double()
    per_pos = torch.stack([(rope_matrix(cos[0, p].double(), sin[0, p].double()) @ mean[0, 0].double()) @ k
                           for p in range(F)])
    torch.testing.assert_close(mu[0, 0].double() @ k, per_pos.mean(), rtol=1e-5, atol=1e-5)


def test_chunk_statistics_merge_to_the_statistics_of_all_queries():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 20, 6, generator=g) * 3 + 5
    use = torch.rand(2, 20, generator=g) > 0.3
    use[1, :8] = False                                                    # a chunk with nothing for row 1
    whole = chunk_stats(q, use)
    acc = None
    for s, e in ((0, 8), (8, 15), (15, 20)):
        part = chunk_stats(q[:, :, s:e], use[:, s:e])
        acc = part if acc is None else merge_stats(acc, part)
    for x, y in zip(acc, whole):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    qq = q[0].double()[:, use[0]]                                         # (h, N, d)
    c = qq - qq.mean(1, keepdim=True)
    torch.testing.assert_close(whole[2][0].double(), c.transpose(1, 2) @ c, rtol=1e-4, atol=1e-3)


def naive_scores(mu, cov, keys, values, pos, scale, n_sink, eps):
    """Loops in float64: softmax over non-sink keys of scale mu.k + scale^2 k^T cov k / 2 per query
    head, mean over the group, (p + eps) * ||v||; sinks max + 1, padding -inf."""
    b, hq, d = mu.shape
    hk, n = keys.shape[1], keys.shape[2]
    g = hq // hk
    out = torch.zeros(b, hk, n, dtype=torch.float64)
    for bi in range(b):
        for kh in range(hk):
            cols = [j for j in range(n) if pos[bi, kh, j] >= n_sink]
            for h in range(kh * g, kh * g + g):
                z = torch.stack([scale * mu[bi, h].double() @ keys[bi, kh, j].double()
                                 + scale ** 2 / 2 * keys[bi, kh, j].double() @ cov[bi, h].double()
                                 @ keys[bi, kh, j].double() for j in cols])
                out[bi, kh, cols] += torch.softmax(z, 0) / g
            vn = values[bi, kh].double().norm(dim=-1)
            out[bi, kh] = (out[bi, kh] + eps) * vn
            top = out[bi, kh, cols].max() + 1
            for j in range(n):
                if 0 <= pos[bi, kh, j] < n_sink:
                    out[bi, kh, j] = top
                elif pos[bi, kh, j] < 0:
                    out[bi, kh, j] = float("-inf")
    return out


def test_scores_equal_the_naive_formula_in_small_key_blocks():
    g = torch.Generator().manual_seed(3)
    b, hq, hk, n, d = 2, 4, 2, 11, 8
    mu = torch.randn(b, hq, d, generator=g)
    a = torch.randn(b, hq, d, d, generator=g) * 0.3
    cov = a @ a.transpose(-1, -2)
    keys, values = torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g)
    pos = torch.arange(n).expand(b, hk, n).clone()
    pos[1, :, :3] = -1                                                    # padding
    pos[1, :, 3:] -= 3
    got = expected_scores(mu, cov, keys, values, pos, d ** -0.5, n_sink=2, epsilon=0.01,
                          max_bytes=b * hq * d * 4 * 3)                    # blocks of 3 keys
    torch.testing.assert_close(got.double(), naive_scores(mu, cov, keys, values, pos, d ** -0.5, 2, 0.01),
                               rtol=1e-5, atol=1e-6)
    assert bool((got[1, :, :3] == float("-inf")).all())


RECORD: list = []


@dataclass(frozen=True)
class Spy(ExpectedAttention):
    """Records what the engine hands the method: post-RoPE queries per chunk, and the layer and its
    scores at compression."""

    def observe(self, run, layer, query, module, ctx):
        RECORD.append(("q", layer.layer_idx, query.clone(), ctx.cache.step_positions.clone()))
        super().observe(run, layer, query, module, ctx)

    def compress(self, run, layer, scores):
        RECORD.append(("c", layer.layer_idx, layer.keys.clone(), layer.values.clone(), scores.clone()))
        super().compress(run, layer, scores)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_scores_equal_a_reference_from_the_models_own_queries(tiny_llms, family):
    """Prefill in chunks of 64; the model's pre-RoPE queries (q_proj outputs) are captured. The
    post-RoPE queries the method sees un-rotate to them, and the scores it compresses with equal a
    float64 reference: statistics of every prompt query after the sinks, rotated by the mean RoPE
    matrix of the next positions, the naive expected-attention formula."""
    llm = tiny_llms[family]
    layers = llm.model.model.layers
    pre: dict[int, list] = {i: [] for i in range(len(layers))}
    hooks = [ly.self_attn.q_proj.register_forward_hook(lambda mod, inp, out, i=i: pre[i].append(out.clone()))
             for i, ly in enumerate(layers)]
    ids = random_prompt(200, seed=71)
    m = Spy(budget=64, n_future_positions=16, epsilon=0.001)
    RECORD.clear()
    try:
        llm.generate(ids, SamplingParams(max_tokens=1), method=m)
    finally:
        for h in hooks:
            h.remove()
    rope = rope_function(llm.model)
    hq, d = llm.model.config.num_attention_heads, llm.info.head_dim
    for li in range(len(layers)):
        Q = torch.cat(pre[li], 1)[0].view(len(ids), hq, d).transpose(0, 1).double()    # (hq, L, d) pre-RoPE
        chunks = [r for r in RECORD if r[0] == "q" and r[1] == li]
        assert len(chunks) == 4                                            # 64 + 64 + 64 + 8 tokens
        for _, _, q, qpos in chunks:
            torch.testing.assert_close(unrotate(q.float(), *rope(qpos, li)).double()[0], Q[:, qpos[0].long()],
                                       rtol=1e-4, atol=1e-4)
        _, _, keys, values, scores = next(r for r in RECORD if r[0] == "c" and r[1] == li)
        X = Q[:, 4:]                                                       # n_sink = 4
        mu = X.mean(1)
        cov = (X - mu[:, None]).transpose(1, 2) @ (X - mu[:, None]) / X.shape[1]
        fut = torch.arange(len(ids), len(ids) + 16)[None]
        R = rope_matrix(*(t.double() for t in rope(fut, li)))[0].mean(0)
        mu_f, cov_f = mu @ R.T, R @ cov @ R.T
        pos = torch.arange(len(ids)).expand(1, keys.shape[1], len(ids))
        ref = naive_scores(mu_f[None], cov_f[None], keys, values, pos, d ** -0.5, 4, 0.001)
        torch.testing.assert_close(scores.double(), ref, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"use_covariance": False, "use_vnorm": False}, {"window": 32}])
def test_budget_of_whole_prompt_equals_full_and_a_small_budget_saves_memory(tiny_llm, kw):
    ids = random_prompt(160, seed=72)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    full = tiny_llm.generate(ids, p)[0].token_ids
    same = tiny_llm.generate(ids, p, method="expected_attention", budget=len(ids), method_kwargs=kw)[0]
    assert same.token_ids == full
    out = tiny_llm.generate(ids, p, method="expected_attention", budget=40, method_kwargs=kw)[0]
    assert len(out.token_ids) == 8 and out.stats.kv_device_bytes < out.stats.kv_full_bytes
    ctx = tiny_llm.prefill_context(ids, method="expected_attention", budget=40, method_kwargs=kw)
    for layer in ctx.cache.layers:
        assert layer.length == 40 and not layer.state                    # statistics dropped after prefill
        assert set(range(4)) <= set(layer.positions[0, 0].tolist())     # sinks kept


@pytest.mark.parametrize("kw,msg", [({"n_future_positions": 0}, "n_future_positions"), ({"n_sink": -1}, "n_sink"),
                                    ({"epsilon": -0.1}, "epsilon"), ({"window": -1}, "window"),
                                    ({"use_vnorm": "no"}, "use_vnorm"), ({"use_covariance": 1}, "use_covariance")])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_method("expected_attention", 64, **kw)
