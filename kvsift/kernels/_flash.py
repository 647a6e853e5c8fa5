"""Shared Triton building blocks of the attention kernels: loading a block of KV rows, folding one
block of keys into a flash-attention accumulator (online softmax in base 2), and the end of a
split-K decode program (its output, or its partial and log-sum-exp). Defined only where Triton is.
"""

from __future__ import annotations

from kvsift.kernels._triton import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def load_group_query(q_ptr, b, h, sq_b, sq_h, sq_d, offs_g, offs_d, mask_g, mask_d, G: tl.constexpr,
                         UPCAST: tl.constexpr):
        """The ``G`` query heads of KV head ``h`` of row ``b`` as a ``(G_P, BLOCK_D)`` tile (padded
        rows zero), float32 under the CPU interpreter (``UPCAST``: its bf16/fp16 ``tl.dot`` is wrong)."""
        q = tl.load(q_ptr + b * sq_b + (h * G + offs_g[:, None]) * sq_h + offs_d[None, :] * sq_d,
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        return q

    @triton.jit
    def group_offsets(HK: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr,
                      BLOCK_D: tl.constexpr):
        """The prologue of a program per (row, KV head) on grid axis 0: ``b`` and ``h`` (int64),
        the group's and the head dim's offsets and their masks."""
        pid_bh = tl.program_id(0)
        b = (pid_bh // HK).to(tl.int64)
        h = (pid_bh % HK).to(tl.int64)
        offs_g = tl.arange(0, G_P)
        offs_d = tl.arange(0, BLOCK_D)
        return b, h, offs_g, offs_d, offs_g < G, offs_d < D

    @triton.jit
    def group_program(q_ptr, sq_b, sq_h, sq_d, HK: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
        """:func:`group_offsets` and the group's query tile ``(G_P, BLOCK_D)``
        (:func:`load_group_query`)."""
        b, h, offs_g, offs_d, mask_g, mask_d = group_offsets(HK, G, G_P, D, BLOCK_D)
        q = load_group_query(q_ptr, b, h, sq_b, sq_h, sq_d, offs_g, offs_d, mask_g, mask_d, G, UPCAST)
        return b, h, offs_g, offs_d, mask_g, mask_d, q

    @triton.jit
    def online_softmax_step(q, k, v, visible, qk_scale, m_i, l_i, acc, IEEE: tl.constexpr,
                            MASKED: tl.constexpr = True):
        """Fold keys ``k`` and values ``v`` ``(S, D)`` into the running max ``m_i (M,)``, sum
        ``l_i (M,)`` and output ``acc (M, D)`` of queries ``q (M, D)``; ``visible`` ``(M, S)`` (or
        broadcastable) masks keys out (``MASKED=False``: every key is visible and ``visible`` is
        not read); ``qk_scale`` is the softmax scale times log2(e). A row that has seen no visible
        key keeps ``m_i = -inf`` and ``l_i = 0``. Returns ``(m_i, l_i, acc)``."""
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        if MASKED:
            qk = tl.where(visible, qk * qk_scale, float("-inf"))              # log2 units
        else:
            qk = qk * qk_scale
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
    def store_split(out_ptr, po_ptr, plse_ptr, m_i, l_i, acc, b, h, pid_s, offs_g, offs_d, mask_g, mask_d,
                    so_b, so_h, spo_bh, spo_s, HK: tl.constexpr, G: tl.constexpr, DIRECT: tl.constexpr):
        """The end of a split-K decode program over (row ``b``, KV head ``h``) x split ``pid_s``: the
        normalized output of its ``G`` query heads, into ``out (batch, q_heads, dim)`` when
        ``DIRECT`` (one split, no lse), else with its base-2 log-sum-exp into the partials that
        ``SplitLaunch.finish`` merges (``-inf`` where no key was visible)."""
        has = l_i > 0.0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        if DIRECT:
            tl.store(out_ptr + b * so_b + (h * G + offs_g[:, None]) * so_h + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
        else:
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            row = (b * HK * G + h * G + offs_g).to(tl.int64)                  # flat (batch, q_head)
            tl.store(po_ptr + row[:, None] * spo_bh + pid_s * spo_s + offs_d[None, :], o,
                     mask=mask_g[:, None] & mask_d[None, :])
            tl.store(plse_ptr + row * tl.num_programs(1) + pid_s, lse, mask=mask_g)

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

    @triton.jit
    def candidate_slots(sl_ptr, ss_n, offs_n, in_range, PAGE: tl.constexpr):
        """Slots of candidates ``offs_n`` (int64, ``-1``: none, and where ``in_range`` is False)
        from a row of slot indices ``sl_ptr`` (stride ``ss_n``): ``sl[offs_n]`` where ``PAGE`` is
        1, else page indices, candidate ``j`` being slot ``sl[j // PAGE] * PAGE + j % PAGE`` (a
        negative page: none)."""
        pg = tl.load(sl_ptr + (offs_n // PAGE) * ss_n, mask=in_range, other=-1).to(tl.int64)
        return tl.where(pg >= 0, pg * PAGE + offs_n % PAGE, -1)

else:
    load_group_query = group_offsets = group_program = online_softmax_step = load_kv = store_split = None
    candidate_slots = None
