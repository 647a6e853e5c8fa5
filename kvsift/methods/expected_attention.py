"""``expected_attention``: Expected Attention (NVIDIA kvpress's ExpectedAttentionPress).

Future queries are unknown, so their distribution is estimated: the mean ``mu`` and covariance
``S`` of the layer's pre-RoPE prompt queries (positions ``>= n_sink``: the first tokens' queries
are outliers). The statistics are moved to the next ``n_future_positions`` positions with RoPE:
like kvpress, by the rotation averaged over those positions, ``R = mean_p R_p`` (``mu' = R mu``,
``S' = R S R^T``; for the mean this is exactly the average of the logits over the positions). For
a Gaussian query ``q``, ``E[exp(scale q.k)] = exp(scale mu'.k + scale^2 k^T S' k / 2)`` (with
``scale = 1/sqrt(d)``: ``mu'.k/sqrt(d) + k^T S' k/(2d)``). As in kvpress, these expected logits
are normalised per query head by a softmax over the keys (every head of a group then votes with
weight one; the order within a head is that of the unnormalised ``exp``), averaged over the query
heads of each KV group, and multiplied by the value norm, ``(score + epsilon) * ||v||``
(``use_vnorm``). The first ``n_sink`` tokens are always kept (scored above every other key).

Our attention hook sees post-RoPE queries: they are rotated back to pre-RoPE with their positions
(``ForwardContext.rope``, the model's own rotary embedding: ``q_pre = R(-p) q_post``, the inverse
of transformers' ``apply_rotary_pos_emb``) before the statistics are taken. With ``window=0`` the
statistics cover every prompt query, accumulated chunk by chunk in ``observe`` (a numerically
stable merge of per-chunk means and centred second moments), as kvpress computes them over the
whole prompt.
"""

from dataclasses import dataclass

import torch

from kvsift.methods.base import SCORE_BLOCK_BYTES, EvictionMethod, LayerState, module_scale, register


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``rotate_half``: ``(x1, x2) -> (-x2, x1)`` over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it: ``x (batch, heads, n, dim)``, ``cos/sin (batch, n, dim)``."""
    c, s = cos[:, None], sin[:, None]
    return x * c + rotate_half(x) * s


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rotate` (same shapes): ``R(-p) x``, divided by ``cos^2 + sin^2`` (the
    square of the rope's ``attention_scaling``, 1 for plain RoPE)."""
    c, s = cos[:, None], sin[:, None]
    return (x * c - rotate_half(x) * s) / (c * c + s * s)


def chunk_stats(q: torch.Tensor, use: torch.Tensor, covariance: bool = True):
    """Statistics of queries ``q (batch, heads, n, dim)`` fp32 where ``use (batch, n)`` is True:
    ``(count (batch,), mean (batch, heads, dim), m2 (batch, heads, dim, dim) | None)``, ``m2`` the
    sum of centred outer products."""
    w = use.float()
    count = w.sum(-1)
    wq = w[:, None, :, None]
    mean = (q * wq).sum(2) / count.clamp(min=1)[:, None, None]
    m2 = None
    if covariance:
        c = (q - mean[:, :, None]) * wq
        m2 = torch.matmul(c.transpose(-1, -2), c)
    return count, mean, m2


def merge_stats(a, b):
    """Merge two ``(count, mean, m2)`` of :func:`chunk_stats` (Chan et al.'s parallel update)."""
    na, ma, sa = a
    nb, mb, sb = b
    n = na + nb
    frac = nb / n.clamp(min=1)                                            # (b,)
    delta = mb - ma
    mean = ma + delta * frac[:, None, None]
    m2 = None
    if sa is not None:
        m2 = sa + sb + delta[..., :, None] * delta[..., None, :] * (na * frac)[:, None, None, None]
    return n, mean, m2


def future_stats(mean: torch.Tensor, cov: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
    """Pre-RoPE query ``mean (batch, heads, dim)`` and ``cov (batch, heads, dim, dim)`` (or None)
    moved by the rotation averaged over future positions, ``cos/sin (batch, positions, dim)``:
    ``R = diag(mean cos) + diag(mean sin) P`` with ``P x = rotate_half(x)``. Returns
    ``(R mean, R cov R^T)``."""
    c, s = cos.float().mean(1), sin.float().mean(1)                      # (b, d)
    mu = mean * c[:, None] + rotate_half(mean) * s[:, None]
    if cov is None:
        return mu, None
    d = c.shape[-1]
    P = rotate_half(torch.eye(d, device=c.device, dtype=c.dtype)).T      # P @ x == rotate_half(x)
    R = torch.diag_embed(c) + s[..., None] * P                           # (b, d, d)
    return mu, R[:, None] @ cov @ R[:, None].transpose(-1, -2)


def expected_scores(mu: torch.Tensor, cov: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
                    positions: torch.Tensor, scale: float, n_sink: int = 4, use_vnorm: bool = True,
                    epsilon: float = 0.0, max_bytes: int = SCORE_BLOCK_BYTES) -> torch.Tensor:
    """Expected attention of the future queries to each key.

    mu ``(batch, q_heads, dim)`` and cov ``(batch, q_heads, dim, dim)`` (or None) of the future
    post-RoPE queries; keys/values ``(batch, kv_heads, n, dim)``; positions ``(batch, kv_heads, n)``.
    Logits ``scale mu.k + scale^2 k^T cov k / 2`` (keys in blocks: one ``(batch, q_heads, block, dim)``
    fp32 tensor under ``max_bytes``), softmax over the keys at positions ``>= n_sink`` per query
    head, mean over the heads of each KV group, times ``||v||`` plus ``epsilon`` (``use_vnorm``);
    sinks score above every other key of their head, padding ``-inf``. Returns
    ``(batch, kv_heads, n)`` fp32.
    """
    b, hk, n, d = keys.shape
    hq = mu.shape[1]
    g = hq // hk
    k = keys.float()
    z = torch.einsum("bhgd,bhnd->bhgn", mu.reshape(b, hk, g, d), k) * scale
    if cov is not None:
        cv = cov.reshape(b, hk, g, d, d)
        step = max(1, max_bytes // max(1, b * hq * d * 4))
        for s0 in range(0, n, step):
            kb = k[:, :, s0 : s0 + step]                                  # (b, hk, m, d)
            quad = (torch.einsum("bhgij,bhmj->bhgmi", cv, kb) * kb[:, :, None]).sum(-1)
            z[..., s0 : s0 + step] += quad * (scale * scale / 2)
    pos = positions.long()
    scored = pos >= n_sink
    z = z.masked_fill(~scored[:, :, None], float("-inf"))
    p = torch.softmax(z, dim=-1).nan_to_num_(0.0).mean(2)                 # (b, hk, n)
    if use_vnorm:
        p = (p + epsilon) * values.float().norm(dim=-1)
    top = p.masked_fill(~scored, 0.0).amax(-1, keepdim=True) + 1.0
    p = torch.where((pos >= 0) & ~scored, top, p)
    return p.masked_fill(pos < 0, float("-inf"))


@dataclass
class QueryStats(LayerState):
    """Running statistics of a layer's pre-RoPE prompt queries (positions ``>= n_sink``):
    ``count (batch,)``, ``mean (batch, q_heads, dim)``, ``m2 (batch, q_heads, dim, dim)`` (sum of
    centred outer products; None without covariance), ``next_pos (batch,)`` the position after the
    newest query seen."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor | None
    next_pos: torch.Tensor


@register("expected_attention")
@dataclass(frozen=True)
class ExpectedAttention(EvictionMethod):
    """Expected Attention (kvpress): keys scored by the attention expected from future queries.

    Parameters
    ----------
    budget : int | float
        Tokens kept per layer and KV head after prefill (sinks included).
    n_future_positions : int
        Future positions (after the prompt) the query statistics are rotated to, averaged.
    n_sink : int
        First tokens always kept; their queries are left out of the statistics.
    use_covariance : bool
        Include the queries' covariance (``k^T S k / 2d``); False: the mean only.
    use_vnorm : bool
        Multiply the scores by the value norms, ``(score + epsilon) * ||v||``.
    epsilon : float
        Added to the scores before the value-norm rescaling (>= 0).
    window : int
        Queries the statistics come from: 0 every prompt query (as kvpress, accumulated chunk by
        chunk), ``w > 0`` the last ``w`` prompt queries (the last prefill chunk holds them).
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    window: int = 0

    def __post_init__(self):
        super().__post_init__()
        for name in ("use_covariance", "use_vnorm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not 1 <= self.n_future_positions <= 1 << 20:
            raise ValueError(f"n_future_positions must be in [1, 2**20], got {self.n_future_positions}")
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        if not 0 <= self.window <= 1 << 16:
            raise ValueError(f"window must be in [0, 65536] (0: every prompt query), got {self.window}")

    def min_last_chunk(self) -> int:
        return self.window

    def shares_prefix(self) -> bool:
        return True

    def prefix_state(self):
        # window=0: the statistics of every prompt query so far, carried with the prefix
        return None if self.window else (self.name, self.n_sink, self.use_covariance)

    @staticmethod
    def _rope(ctx):
        rope = getattr(ctx, "rope", None)
        if rope is None:
            raise RuntimeError("expected_attention needs the model's rotary embedding (ForwardContext.rope: a module "
                               "named rotary_emb); this model or call has none")
        return rope

    def query_stats(self, query: torch.Tensor, query_pos: torch.Tensor, rope, layer_idx: int):
        """``(count, mean, m2)`` of the pre-RoPE ``query (batch, q_heads, q, dim)`` (post-RoPE, at
        ``query_pos (batch, q)``) over the positions ``>= n_sink``."""
        cos, sin = rope(query_pos.clamp(min=0), layer_idx)
        if cos.shape[-1] != query.shape[-1]:
            raise RuntimeError(f"expected_attention: the rotary embedding covers {cos.shape[-1]} of "
                               f"{query.shape[-1]} head dims (partial RoPE is not supported)")
        q = unrotate(query.float(), cos.float(), sin.float())
        return chunk_stats(q, query_pos >= self.n_sink, self.use_covariance)

    def scores_from(self, stats, next_pos: torch.Tensor, keys, values, positions, module, rope, layer_idx: int):
        """Scores ``(batch, kv_heads, n)`` of the keys from query statistics ``(count, mean, m2)``;
        ``next_pos (batch,)``: the first future position."""
        count, mean, m2 = stats
        cov = m2 / count.clamp(min=1)[:, None, None, None] if m2 is not None else None
        fut = next_pos.long()[:, None] + torch.arange(self.n_future_positions, device=keys.device)
        cos, sin = rope(fut, layer_idx)
        mu, cov = future_stats(mean, cov, cos, sin)
        return expected_scores(mu, cov, keys, values, positions, module_scale(module, keys), self.n_sink,
                               self.use_vnorm, self.epsilon)

    def score(self, query, keys, values, positions, module, layer_idx):
        """Statistics of the given queries (the last ``window`` of them, or all; their keys are the
        layer's last slots), through the rope of the forward in flight. ``(batch, kv_heads, n)``."""
        from kvsift.engine.attention import current_context

        rope = self._rope(current_context())
        L = query.shape[2]
        qpos = positions[:, 0, -L:]
        if self.window:
            query, qpos = query[:, :, -self.window :], qpos[:, -self.window :]
        stats = self.query_stats(query, qpos, rope, layer_idx)
        return self.scores_from(stats, qpos.amax(-1) + 1, keys, values, positions, module, rope, layer_idx)

    def observe(self, run, layer, query, module, ctx):
        """``window=0``: merge the chunk's query statistics into ``layer.state[name]``."""
        if ctx.rereading or self.window:
            return
        qpos = ctx.cache.step_positions
        new = self.query_stats(query, qpos, self._rope(ctx), layer.layer_idx)
        nxt = qpos.long().amax(-1) + 1
        st = self.layer_state(layer)
        if st is None:
            layer.state[self.name] = QueryStats(*new, next_pos=nxt)
            return
        st.count, st.mean, st.m2 = merge_stats((st.count, st.mean, st.m2), new)
        st.next_pos = torch.maximum(st.next_pos, nxt)

    def prefill_scores(self, run, layer, query, module, ctx):
        """From the statistics of every prompt query (``window=0``; consumed: the state is dropped),
        else of the last ``window`` ones. ``(batch, kv_heads, n)``."""
        st = layer.state.pop(self.name, None)
        if st is None:
            return self.score(query, layer.keys, layer.values, layer.positions, module, layer.layer_idx)
        return self.scores_from((st.count, st.mean, st.m2), st.next_pos, layer.keys, layer.values, layer.positions,
                                module, self._rope(ctx), layer.layer_idx)

    def prefill_end(self, run, layer, query, module, ctx):
        super().prefill_end(run, layer, query, module, ctx)
        layer.state.pop(self.name, None)  # the statistics serve the prefill only
