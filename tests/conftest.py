"""Shared fixtures: tiny random models of real families and the real (named) models.

Real models come from pip packages (see ``kvsift models``). Which test uses which, deliberately:

* ``smollm2`` (98 MB, 135M parameters): the tokenizer of the tiny random models and most real-model
  tests (``real_llm``): cheap enough to run many generations per test session.
* the default model (``qwen2.5-coder-0.5b``, ~4x slower per token): a few tests (``default_llm``)
  that check what a user gets first: it loads, its chat template works, it answers a document
  question correctly and matches ``transformers`` token for token.

A fixture or test whose model is not installed is skipped with the install command as the reason
(``needs_model``), never errors.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SMALL_MODEL = "smollm2"



def run_in_triton_interpreter(script: str, timeout: int = 600) -> None:
    """Run ``script`` (Python source that prints ``INTERP_OK`` at its end) in a subprocess under
    Triton's CPU interpreter (``TRITON_INTERPRET`` must be set before triton is imported), and fail
    with its output unless it got there. Skips without triton >= 3.9 (older interpreters call
    ``int()`` on 1-element numpy arrays, an error since numpy 2.4)."""
    import subprocess
    import sys
    from pathlib import Path

    triton = pytest.importorskip("triton")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"triton {triton.__version__}: interpreter checks need triton >= 3.9")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("KVSIFT_NO_TRITON", None)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                       cwd=root)
    assert r.returncode == 0 and "INTERP_OK" in r.stdout, r.stdout + r.stderr

def model_missing(name: str | None = None) -> str | None:
    """None when the named model (default: the default model) can be loaded, else why not (with the
    command that installs it)."""
    from kvsift.errors import ModelNotFoundError
    from kvsift.models import check_model

    try:
        check_model(name)
    except ModelNotFoundError as e:
        return f"model not installed: {e}".replace("\n", " ")
    return None


def needs_model(name: str | None = None):
    """Mark: skip (with the install command as the reason) when the named model is not installed."""
    reason = model_missing(name)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def needs_cuda_triton():
    """Mark: skip unless CUDA and Triton are both there (the kernels' device tests)."""
    from kvsift.kernels._triton import HAS_TRITON

    return pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")


def _require(name: str | None) -> None:
    reason = model_missing(name)
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def default_tokenizer():
    """SmolLM2's tokenizer (the tiny random models use its vocabulary; converted once, then cached)."""
    _require(SMALL_MODEL)
    from transformers import AutoTokenizer

    from kvsift.models.loader import _convert_gguf, default_model_path

    return AutoTokenizer.from_pretrained(_convert_gguf(default_model_path(SMALL_MODEL)))


@pytest.fixture(scope="session")
def tiny_llms(default_tokenizer):
    """family -> LLM over a tiny random-weight model (GQA: 4 q heads, 2 kv heads)."""
    from kvsift import LLM
    from kvsift.models import tiny_model

    return {f: LLM.from_model(tiny_model(f, seed=1), default_tokenizer, name=f"tiny-{f}", chunk_size=64)
            for f in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def tiny_llm(tiny_llms):
    return tiny_llms["llama"]


@pytest.fixture(scope="session")
def real_llm():
    """SmolLM2-135M-Instruct, the small real model (loaded once per test session)."""
    _require(SMALL_MODEL)
    from kvsift import LLM

    return LLM(SMALL_MODEL)


@pytest.fixture(scope="session")
def default_llm():
    """The default model (``LLM()``: Qwen2.5-Coder-0.5B-Instruct), loaded once per test session."""
    _require(None)
    from kvsift import LLM

    return LLM()


@pytest.fixture
def make_client(tiny_llm, tmp_path):
    """``make_client(**config)`` -> a TestClient over a fresh app on the tiny model (its scheduler
    shut down after); config goes to ``ServerConfig``."""
    TestClient = pytest.importorskip("starlette.testclient").TestClient
    from kvsift.server.app import create_app
    from kvsift.server.config import ServerConfig

    made = []

    def make(**kw):
        kw.setdefault("contexts_dir", tmp_path / "contexts")
        c = TestClient(create_app(tiny_llm, ServerConfig(**kw)), raise_server_exceptions=False)
        c.__enter__()
        made.append(c)
        return c

    yield make
    for c in made:
        c.__exit__(None, None, None)


def random_prompt(n: int, seed: int = 0, vocab: int = 49152) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


def check_exact_and_compressing(llm, method: str, kw: dict, seed: int, n: int = 160, budget: int = 40) -> None:
    """``method`` with options ``kw``: at a budget of the whole prompt it gives ``full``'s tokens; at
    ``budget`` it holds fewer device bytes and every layer keeps ``budget`` slots after prefill."""
    from kvsift import SamplingParams

    ids = random_prompt(n, seed=seed)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    full = llm.generate(ids, p)[0].token_ids
    assert llm.generate(ids, p, method=method, budget=len(ids), method_kwargs=kw)[0].token_ids == full
    out = llm.generate(ids, p, method=method, budget=budget, method_kwargs=kw)[0]
    assert len(out.token_ids) == 8 and out.stats.kv_device_bytes < out.stats.kv_full_bytes
    ctx = llm.prefill_context(ids, method=method, budget=budget, method_kwargs=kw)
    assert all(layer.length == budget for layer in ctx.cache.layers)


def decode_greedy(llm, method, prompts: list, steps: int, each=None):
    """Prefill ``prompts`` (token-id lists) with ``method`` (built), then ``steps`` greedy decode
    steps through the engine's own loop pieces; ``each(step, cache)`` runs after the prefill
    (step -1) and after every step. Returns ``(cache, run, ctx)``."""
    run = method.start(max(len(x) for x in prompts), llm.info.num_layers)
    with llm.lock:
        cache, _, (ctx, logits) = llm.runner.prefill(prompts, method, run, None, False, reserve=steps + 1)
        ctx.decoding = True
        nxt = ctx.next_pos
        if each is not None:
            each(-1, cache)
        for step in range(steps):
            ctx.step = step
            logits = llm.runner.forward(ctx, logits.argmax(-1, keepdim=True), nxt[:, None])
            nxt = nxt + 1
            if each is not None:
                each(step, cache)
    return cache, run, ctx
