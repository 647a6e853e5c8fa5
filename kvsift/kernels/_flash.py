"""Shared Triton building blocks of the attention kernels: loading a block of KV rows, and one block
of keys folded into a flash-attention accumulator (online softmax in base 2). Imported by the kernels only where Triton is.
"""

from __future__ import annotations

from kvsift.kernels._triton import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def online_softmax_step(q, k, v, visible, qk_scale, m_i, l_i, acc, IEEE: tl.constexpr):
        """Fold keys ``k`` and values ``v`` ``(S, D)`` into the running max ``m_i (M,)``, sum
        ``l_i (M,)`` and output ``acc (M, D)`` of queries ``q (M, D)``; ``visible`` ``(M, S)`` (or
        broadcastable) masks keys out; ``qk_scale`` is the softmax scale times log2(e). A row that
        has seen no visible key keeps ``m_i = -inf`` and ``l_i = 0``. Returns ``(m_i, l_i, acc)``."""
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(visible, qk * qk_scale, float("-inf"))                  # log2 units
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def load_kv(k_base, v_base, slot, valid, sk, sv, offs_d, mask_d, UPCAST: tl.constexpr):
        """Rows ``slot (S,)`` of a key and a value buffer (row strides ``sk``/``sv``, columns
        ``offs_d``), zeros where ``valid`` or ``mask_d`` is False; fp32 when ``UPCAST``. Returns
        ``(k, v)``, each ``(S, BLOCK_D)``."""
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(k_base + slot[:, None] * sk + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + slot[:, None] * sv + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        return k, v

else:
    online_softmax_step = load_kv = None
