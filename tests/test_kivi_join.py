"""kivi joins running batches: rows of other lengths stacked into one quantized store
(``QuantKV.join``) keep their own windows and flush them on their own schedules, so every row holds
at every step the codes, scales, window and positions it holds alone, on the host path and in
static decode, and the engine's joined requests answer as alone."""

from __future__ import annotations

import pytest
import torch

from kvsift import SamplingParams
from kvsift.cache.quant import QuantKV
from kvsift.kernels.quant_decode_attention import quant_decode_attention_ref
from tests.conftest import random_prompt
from tests.test_kivi import _kv

LENGTHS = (40, 75, 100, 64)   # windows of 8, 11, 4 and 32 tokens at group 16, residual 32


def _rows(n_new: int, d: int = 32, bits: int = 4):
    """Per row: its keys, values and positions for every token (prompt then ``n_new`` more), and its
    store alone after the prompt."""
    out = []
    for i, n in enumerate(LENGTHS):
        k, v, pos = _kv(b=1, n=n + n_new, d=d, seed=10 + i, holes=False)
        out.append((k, v, pos, QuantKV.from_dense(k[:, :, :n], v[:, :, :n], pos[:, :, :n], bits, 16, 32)))
    return out


def _state(st: QuantKV) -> dict:
    n, q, g = st.length, st.qtok, st.group
    return dict(k_codes=st.k_codes[:, :, :q], v_codes=st.v_codes[:, :, :q], k_scale=st.k_scale[:, :, : q // g],
                k_zero=st.k_zero[:, :, : q // g], v_scale=st.v_scale[:, :, :q], k_res=st.k_res[:, :, : n - q],
                positions=st.positions[:, :, :n], qtok=q, length=n)


def _same_state(a: QuantKV, b: QuantKV) -> None:
    sa, sb = _state(a), _state(b)
    for name in sa:
        x, y = sa[name], sb[name]
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), name


def _attend(st: QuantKV, q: torch.Tensor, qpos: torch.Tensor, static: bool = False) -> torch.Tensor:
    return quant_decode_attention_ref(q, query_pos=qpos, slot_idx=None, scale=0.2, group=st.group,
                                      **st.kernel_args(static))


def _step_inputs(rows, t: int):
    """Token ``t`` of decode (after each row's prompt) for every row: keys, values ``(rows, h, 1, d)``
    and positions ``(rows, 1)``."""
    k = torch.cat([r[0][:, :, n + t : n + t + 1] for r, n in zip(rows, LENGTHS)])
    v = torch.cat([r[1][:, :, n + t : n + t + 1] for r, n in zip(rows, LENGTHS)])
    p = torch.cat([r[2][:, 0, n + t : n + t + 1] for r, n in zip(rows, LENGTHS)])
    return k, v, p


def test_joined_rows_hold_what_they_hold_alone_on_the_host_path():
    rows = _rows(70)
    alone = [r[3] for r in rows]
    joined = QuantKV.join([a.clone() for a in alone], room=4)
    assert joined.rows_q == [32, 64, 96, 32] and joined.rows_s == [92, 89, 96, 68] and joined.length == 100
    q = torch.randn(len(rows), 4, 32)
    for t in range(70):
        k, v, p = _step_inputs(rows, t)
        joined.append(k, v, p)
        for i, a in enumerate(alone):
            a.append(k[i : i + 1], v[i : i + 1], p[i : i + 1])
        qpos = p[:, 0].to(torch.int64)
        want = torch.cat([_attend(a, q[i : i + 1], qpos[i : i + 1]) for i, a in enumerate(alone)])
        assert torch.allclose(_attend(joined, q, qpos), want, atol=1e-5, rtol=0), t
    for i, a in enumerate(alone):                    # the rows flushed at steps of their own
        _same_state(joined.row(i), a)
    assert len({a.qtok for a in alone}) > 1 and joined.rows_q == [a.qtok for a in alone]
    # the quantized part stays dense and aligned: a row's codes at slots 0 .. are its own groups
    assert torch.equal(joined.k_codes[2, :, :96], alone[2].k_codes[0, :, :96])


@pytest.mark.parametrize("pre", [0, 5])
@torch.inference_mode()  # as the engine runs decode steps
def test_joined_rows_hold_what_they_hold_alone_in_static_decode(pre):
    """Static decode over joined rows (fixed shapes, a device table of which rows flush at each
    step, every write on the device) gives each row its alone state and attention, step by step."""
    steps = 60
    rows = _rows(pre + steps)
    alone = [r[3] for r in rows]
    joined = QuantKV.join([a.clone() for a in alone], room=0)
    for t in range(pre):                              # a few host appends first
        k, v, p = _step_inputs(rows, t)
        joined.append(k, v, p)
        for i, a in enumerate(alone):
            a.append(k[i : i + 1], v[i : i + 1], p[i : i + 1])
    joined.begin_static(steps)
    cap = joined.capacity
    q = torch.randn(len(rows), 4, 32)
    for s in range(steps):
        k, v, p = _step_inputs(rows, pre + s)
        before = [a.qtok for a in alone]
        for i, a in enumerate(alone):
            a.append(k[i : i + 1], v[i : i + 1], p[i : i + 1])
        if s > 0:
            assert joined.flush_at(s) == any(a.qtok != b for a, b in zip(alone, before)), s
        joined.append(k, v, p, step=s)
        qpos = p[:, 0].to(torch.int64)
        want = torch.cat([_attend(a, q[i : i + 1], qpos[i : i + 1]) for i, a in enumerate(alone)])
        assert torch.allclose(_attend(joined, q, qpos, static=True), want, atol=1e-5, rtol=0), s
    assert joined.capacity == cap
    joined.end_static(steps)
    assert joined.rows_q == [a.qtok for a in alone]
    for i, a in enumerate(alone):
        _same_state(joined.row(i), a)


def test_rows_of_one_layout_stack_and_others_refuse():
    rows = _rows(0)
    same = QuantKV.join([rows[0][3].clone(), rows[0][3].clone()])
    assert same.rows_q is None and same.qtok == 32 and same.k_codes.shape[0] == 2
    other = QuantKV.from_dense(*[x[:, :, :40] for x in _kv(b=1, n=40, d=32, holes=False)], 2, 16, 32)
    with pytest.raises(ValueError, match="bits, group or residual"):
        QuantKV.join([rows[0][3], other])
    with pytest.raises(NotImplementedError, match="row by row"):
        QuantKV.join([r[3] for r in rows]).tensors()


@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("spec", ["kivi", "snapkv+kivi", "quest+kivi", "sentencekv+kivi"])
def test_kivi_requests_of_other_lengths_join_and_get_their_answers_alone(tiny_llm, default_tokenizer, mode, spec):
    """The engine stacks a running kivi batch and the requests joining it (each prefilled and
    quantized alone) into one store whose rows keep their windows: every answer equals the
    request's alone, in eager and static decode; the joined rows flush at steps of their own."""
    from kvsift import LLM
    from kvsift.engine.scheduler import join_key
    from tests.test_engine_scheduler import run_with_joins

    llm = tiny_llm if mode == "eager" else LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64,
                                                          decode_mode="static")
    kw = {"group": 16, "residual": 32} if spec == "kivi" else {}
    budget = None if spec == "kivi" else 48
    ps = [random_prompt(n, seed=400 + n) for n in (150, 70, 101)]
    pr = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (40, 30, 25)]
    want = [tiny_llm.generate(x, q, method=spec, budget=budget, method_kwargs=kw)[0].token_ids
            for x, q in zip(ps, pr)]
    a, b, c = (llm.request([x], q, method=spec, budget=budget, method_kwargs=kw) for x, q in zip(ps, pr))
    assert llm.joins_running(a) and join_key(a) == join_key(b) == join_key(c) is not None
    stores = []
    outs, steps = run_with_joins(llm, a, {3: [b], 7: [c]}, see=lambda cache: stores.append(cache.layers[0].quant))
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert max(steps) == 3 and any(st is not None and st.rows_q is not None for st in stores)


def test_kivi_joins_in_compositions_and_is_preempted_unless_a_stage_keeps_a_host_store(tiny_llm):
    from kvsift.methods import build_method

    for spec, preempted in (("kivi", True), ("snapkv+kivi", True), ("quest+kivi", True), ("sentencekv+kivi", False)):
        m = build_method(spec, None if spec == "kivi" else 64)
        assert m.joins_rows() and m.preemptible() is preempted, spec


_INTERP_SCRIPT = """
import torch
from kvsift.cache.quant import QuantKV
from kvsift.kernels.quant_decode_attention import quant_decode_attention, quant_decode_attention_ref
from tests.test_kivi import _kv
torch.manual_seed(0)
# joined rows (a window start per row: res_start is (batch,)): the folded path (group 64, one value
# scale per slot) and the tile path (group 16), every slot and a slot table
for d, grp, res in ((64, 64, 128), (64, 16, 32)):
    rows = []
    for i, n in enumerate((130, 300, 200)):
        k, v, pos = _kv(b=1, n=n, d=d, seed=i, holes=False)
        rows.append(QuantKV.from_dense(k, v, pos, 4, grp, res))
    st = QuantKV.join(rows, room=7)
    assert st.rows_q is not None and st.qstart.shape == (3,)
    for t in range(40):   # some rows flush their windows on the way
        k, v, pos = _kv(b=3, n=1, d=d, seed=100 + t, holes=False)
        st.append(k, v, torch.tensor([[130 + t], [300 + t], [200 + t]]))
    q = torch.randn(3, 4, d)
    qp = torch.tensor([169, 339, 239])
    for sel in (None, torch.randint(-1, st.capacity, (3, 2, 120))):
        args = st.kernel_args()
        for ns in (None, 3):
            got = quant_decode_attention(q, query_pos=qp, slot_idx=sel, scale=d ** -0.5, group=grp, num_splits=ns, **args)
            ref = quant_decode_attention_ref(q, query_pos=qp, slot_idx=sel, scale=d ** -0.5, group=grp, **args)
            assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (d, grp, sel is None, ns)
print("INTERP_OK")
"""


def test_triton_kernel_reads_a_window_start_per_row_in_interpreter():
    from tests.conftest import run_in_triton_interpreter

    run_in_triton_interpreter(_INTERP_SCRIPT, timeout=900)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec,budget", [("kivi", None), ("quest+kivi", 32), ("sentencekv+kivi", 32)])
def test_cuda_graph_decode_with_kivi_joins_gives_the_answers_alone(spec, budget):
    """Under CUDA graphs: the joined rows' flushing steps (a device table of which rows flush) are
    recorded as their own kind of step; the answers are the eager ones alone (Quest: its page
    bounds rebuilt over the joined rows' dequantized keys)."""
    from kvsift import LLM
    from kvsift.models import tiny_model
    from tests.test_engine_scheduler import run_with_joins

    m = tiny_model("llama", seed=1).to("cuda")
    graph = LLM.from_model(m, None, chunk_size=64, decode_mode="graph")
    eager = LLM.from_model(m, None, chunk_size=64, decode_mode="eager")
    kw = {"group": 16, "residual": 32}
    ps = [random_prompt(n, seed=470 + n) for n in (60, 300, 45)]
    pr = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (40, 35, 30)]
    want = [eager.generate(x, q, method=spec, budget=budget, method_kwargs=kw)[0].token_ids for x, q in zip(ps, pr)]
    a, b, c = (graph.request([x], q, method=spec, budget=budget, method_kwargs=kw) for x, q in zip(ps, pr))
    assert graph.joins_running(a)
    outs, _ = run_with_joins(graph, a, {2: [b], 6: [c]})
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert outs[a.id].stats.decode_mode == "graph"


def test_joined_rows_read_back_their_own_keys_and_values():
    """``dense`` and ``slot_keys`` over joined rows (a window start per row) give each row's tokens
    as its store alone gives them, by position; holes read as holes."""
    rows = _rows(20)
    alone = [r[3] for r in rows]
    joined = QuantKV.join([a.clone() for a in alone])
    for t in range(20):
        k, v, p = _step_inputs(rows, t)
        joined.append(k, v, p)
        for i, a in enumerate(alone):
            a.append(k[i : i + 1], v[i : i + 1], p[i : i + 1])
    jk, jv, jp = joined.dense()
    sk = joined.slot_keys(torch.arange(joined.length))
    assert torch.equal(sk, jk)
    for i, a in enumerate(alone):
        ak, av, ap = a.dense()
        real = jp[i, 0] >= 0
        order = jp[i, 0, real].argsort()
        assert torch.equal(jp[i, 0, real][order], ap[0, 0])
        assert torch.equal(jk[i][:, real][:, order], ak[0]) and torch.equal(jv[i][:, real][:, order], av[0])
