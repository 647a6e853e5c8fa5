"""Fused RMSNorm and rotary embedding (kvsift/kernels/rmsnorm.py, rope.py) and the scoped swap
that runs them in decode steps (kvsift/engine/fusion.py): references equal transformers' code,
the swap is undone on exit (nested, concurrent, on error), the engine's tokens do not change; the
Triton kernels against the references on CUDA."""

import inspect
import textwrap
import threading

import pytest
import torch

from kvsift.engine import fusion
from kvsift.kernels.rmsnorm import rmsnorm_ref
from kvsift.kernels.rope import rope_ref
from tests.conftest import run_in_triton_interpreter

CUDA = torch.cuda.is_available()


def _tiny_llama(dtype=torch.float32, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=1024)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_references_are_transformers_code(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
    x = torch.randn(3, 5, 96, generator=g).to(dtype)
    assert torch.equal(rmsnorm_ref(x, norm.weight, 1e-5), norm(x))
    q = torch.randn(2, 5, 4, 32, generator=g).to(dtype).transpose(1, 2)      # (b, h, seq, d), transposed
    k = torch.randn(2, 5, 2, 32, generator=g).to(dtype).transpose(1, 2)
    cos, sin = torch.randn(2, 5, 32, generator=g).to(dtype), torch.randn(2, 5, 32, generator=g).to(dtype)
    for got, want in zip(rope_ref(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(got, want)


def test_families_share_the_llama_code():
    """The norms and rotary functions the swap covers are Llama's, line for line."""
    import importlib

    def body(src):
        return "\n".join(line for line in textwrap.dedent(src).splitlines()[1:] if line.strip())

    base = importlib.import_module("transformers.models.llama.modeling_llama")
    for fam in sorted(fusion.FAMILIES - {"llama"}):
        try:
            mod = importlib.import_module(f"transformers.models.{fam}.modeling_{fam}")
        except ImportError:
            continue
        norm = getattr(mod, f"{fam.capitalize()}RMSNorm")
        assert body(inspect.getsource(norm.forward)) == body(inspect.getsource(base.LlamaRMSNorm.forward)), fam
        assert body(inspect.getsource(_unwrapped(mod.apply_rotary_pos_emb))) == \
            body(inspect.getsource(_unwrapped(base.apply_rotary_pos_emb))), fam


def _unwrapped(f):
    """The function under the ``kernels`` package's hub wrapper (transformers pulls it in since
    5.2x: ``apply_rotary_pos_emb`` becomes an ``nn.Module`` whose ``forward`` calls the function
    it closes over when no hub kernel is active), or ``f`` itself."""
    fwd = getattr(type(f), "forward", None) if isinstance(f, torch.nn.Module) else None
    inner = [c.cell_contents for c in getattr(fwd, "__closure__", None) or () if inspect.isfunction(c.cell_contents)]
    return inner[0] if len(inner) == 1 else f


def test_the_swap_is_scoped_and_counted():
    from transformers.models.llama import modeling_llama as ml

    orig = ml.apply_rotary_pos_emb
    a, b = _tiny_llama(), _tiny_llama()
    norms = [m for m in a.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and fusion.supported(a)
    with fusion.fused_decode(a):
        assert ml.apply_rotary_pos_emb is not orig and ml.apply_rotary_pos_emb.__wrapped__ is orig
        assert all("forward" in vars(m) for m in norms)
        with fusion.fused_decode(b):              # a second model of the family inside the first
            pass
        assert ml.apply_rotary_pos_emb is not orig  # still patched for the first
    assert ml.apply_rotary_pos_emb is orig and not any("forward" in vars(m) for m in norms)
    with pytest.raises(RuntimeError, match="boom"):
        with fusion.fused_decode(a):
            raise RuntimeError("boom")
    assert ml.apply_rotary_pos_emb is orig and not any("forward" in vars(m) for m in norms)
    # two threads entering and leaving in any order leave it restored
    barrier = threading.Barrier(2)

    def use(model):
        with fusion.fused_decode(model):
            barrier.wait(5)
    ts = [threading.Thread(target=use, args=(m,)) for m in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert ml.apply_rotary_pos_emb is orig and not fusion._ROPE


def test_other_families_are_left_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert not fusion.supported(m)
    with fusion.fused_decode(m):
        assert not fusion._ROPE


def test_cpu_calls_inside_the_swap_run_transformers_code():
    """On the CPU the swapped functions fall back to the original code: same logits."""
    m = _tiny_llama()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(ids).logits
        with fusion.fused_decode(m):
            got = m(ids).logits
    assert torch.equal(got, ref)


def test_the_flag_is_on_by_default_and_a_cpu_runner_never_swaps(monkeypatch):
    """On by default (``KVSIFT_FUSED_DECODE=0`` turns it off); a CPU runner never enters the swap
    (its functions would run the model's own code there), with the flag on or off, and its tokens
    are the same. The CUDA test below checks the swap's decode steps."""
    from kvsift import LLM, SamplingParams
    from kvsift.engine import runner as runner_mod

    entered = []
    real = runner_mod.fused_decode

    def spy(model):
        entered.append(model)
        return real(model)

    monkeypatch.setattr(runner_mod, "fused_decode", spy)
    llm = LLM.from_model(_tiny_llama(), None, chunk_size=16, decode_mode="static")
    assert llm.runner.fused_decode
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    ref = llm.generate(ids, p)[0].token_ids
    monkeypatch.setenv("KVSIFT_FUSED_DECODE", "0")
    off = LLM.from_model(_tiny_llama(), None, chunk_size=16, decode_mode="static")
    assert not off.runner.fused_decode
    assert off.generate(ids, p)[0].token_ids == ref
    assert not entered


def _round_as_twin(x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The bit arithmetic of rope.py's ``_round_as`` (a Triton function) step for step in int64
    PyTorch, so that the rounding it does is checked on machines without a GPU."""
    u = x.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if bf16:
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    else:
        sign = (u >> 31) << 31
        a = u & 0x7FFFFFFF
        e = (a >> 23) - 127
        n = ((a + 0xFFF + ((a >> 13) & 1)) >> 13) << 13
        n = torch.where(n > 0x477FE000, torch.full_like(n, 0x7F800000), n)
        sig = (a & 0x7FFFFF) | 0x800000
        drop = (-1 - e).clamp(1, 31)
        r = (sig + (1 << (drop - 1)) - 1 + ((sig >> drop) & 1)) >> drop
        sub = (r.float() * 5.9604644775390625e-08).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        u = torch.where(e < -14, sub, n) | sign
    u = torch.where(u >= 2**31, u - 2**32, u)
    return u.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_rounding_is_pytorchs(dtype):
    """The rope kernel rounds each product and sum with integer bit arithmetic: the same bits as
    PyTorch's float32 -> dtype conversion (to nearest, ties to even) over normal, subnormal,
    tie and overflowing values."""
    g = torch.Generator().manual_seed(3)
    mags = torch.cat([torch.logspace(-30, 6, 20000), torch.tensor([0.0, 65504.0, 65519.99, 65520.0, 65536.0,
                                                                    2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-14,
                                                                    float("inf")])])
    x = mags * torch.randn(mags.shape, generator=g).sign()
    # exact ties: a value halfway between two neighbours of the target format
    lo = torch.randn(5000, generator=g).to(dtype)
    nxt = torch.nextafter(lo, torch.full_like(lo, float("inf"))).float()
    x = torch.cat([x, (lo.float() + nxt) / 2])
    want = x.to(dtype).float()
    got = _round_as_twin(x, dtype == torch.bfloat16)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernels_match_the_references(dtype):
    from kvsift.kernels import dispatch
    from kvsift.kernels.rmsnorm import rmsnorm
    from kvsift.kernels.rope import rope

    if not dispatch.use_triton(torch.zeros(1, device="cuda")):
        pytest.skip("triton unavailable")
    g = torch.Generator(device="cuda").manual_seed(4)
    for shape in ((1, 1, 4096), (7, 3, 1536), (2, 896)):
        x = torch.randn(shape, device="cuda", generator=g).to(dtype)
        w = torch.randn(shape[-1], device="cuda", generator=g).to(dtype)
        got, want = rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=0 if dtype == torch.float32 else 1e-2, rtol=1e-5 if dtype ==
                                   torch.float32 else 1e-2)
    for (b, hq, hk, n, d, cb) in ((1, 32, 8, 1, 128, 1), (3, 14, 2, 5, 64, 3), (2, 4, 4, 17, 96, 2)):
        q = torch.randn(b, n, hq, d, device="cuda", generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(b, n, hk, d, device="cuda", generator=g).to(dtype).transpose(1, 2)
        cos = torch.randn(cb, n, d, device="cuda", generator=g).to(dtype)
        sin = torch.randn(cb, n, d, device="cuda", generator=g).to(dtype)
        for got, want, x in zip(rope(q, k, cos, sin), rope_ref(q, k, cos, sin), (q, k)):
            assert got.stride() == x.stride()
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
            else:
                assert torch.equal(got, want)          # every rounding step as PyTorch's


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
def test_cuda_graph_decode_fused_gives_the_tokens_unfused(monkeypatch):
    """fp32 random Llama on CUDA, graph decode: the fused step gives the unfused step's tokens, and
    the runner entered the swap (for decode steps: recorded into the graphs) only when on."""
    from kvsift import LLM, SamplingParams
    from kvsift.engine import runner as runner_mod

    entered = []
    real = runner_mod.fused_decode
    monkeypatch.setattr(runner_mod, "fused_decode", lambda model: entered.append(model) or real(model))
    model = _tiny_llama(device="cuda")
    ids = torch.randint(0, 300, (100,), generator=torch.Generator().manual_seed(5)).tolist()
    p = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = []
    for fused in (False, True):
        llm = LLM.from_model(model, None, chunk_size=32, decode_mode="graph")
        llm.runner.fused_decode = fused
        outs.append(llm.generate([ids, ids[:70]], p))
        assert outs[-1][0].stats.decode_mode == "graph"
        assert bool(entered) == fused
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]


def test_triton_interpreter_kernels():
    run_in_triton_interpreter(textwrap.dedent("""
        import torch
        from kvsift.kernels.rmsnorm import rmsnorm, rmsnorm_ref
        from kvsift.kernels.rope import rope, rope_ref
        torch.manual_seed(0)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x, w = torch.randn(3, 2, 80, dtype=dt), torch.randn(80, dtype=dt)
            # the interpreter's rsqrt may round an fp32 ulp apart from PyTorch's: then the output
            # rounds an ulp of its dtype apart, twice (y, then w * y: relative 2^-6 in bf16), not 5e-2
            got, want = rmsnorm(x, w, 1e-6).float(), rmsnorm_ref(x, w, 1e-6).float()
            assert ((got - want).abs() <= want.abs() / 64 + 1e-6).all()
            q = torch.randn(2, 5, 4, 32, dtype=dt).transpose(1, 2)
            k = torch.randn(2, 5, 2, 32, dtype=dt).transpose(1, 2)
            c, s = torch.randn(1, 5, 32, dtype=dt), torch.randn(1, 5, 32, dtype=dt)
            for a, b in zip(rope(q, k, c, s), rope_ref(q, k, c, s)):
                assert (a.float() - b.float()).abs().max() < 1e-5
        print("INTERP_OK")
    """))
