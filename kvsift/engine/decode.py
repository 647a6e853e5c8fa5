"""Decode steps: eager, static (fixed buffers), or replayed from a CUDA graph.

* ``eager``: one model call per step over the cache's used slots (any method, any device).
* ``static``: :meth:`SiftCache.begin_static` fixes every buffer for the whole generation; a step
  writes its KV at a device-side slot counter, attends over the whole buffers masked by position
  inside the sparse kernel (:func:`kvsift.engine.attention.selected_attention`) and changes no
  host state. Runs on any device (the CPU tests check it against ``eager``).
* ``graph`` (CUDA): the first step runs statically (it also warms up kernels and allocations), the
  second is recorded in a ``torch.cuda.CUDAGraph`` over static input buffers and replayed, and every
  later step is a copy of the token ids and positions plus one replay: no Python in the model, no
  launch overhead, no host sync. A method whose steps come in kinds (``method.decode_variant(run, step)``,
  e.g. sentencekv's ``reselect_every``: steps that select chunks and steps that keep the selection)
  gets one graph per kind, recorded the second time that kind comes. If recording fails the runner
  stays ``static``.

``LLM(decode_mode=...)`` picks: ``auto`` is ``graph`` on CUDA with Triton when the method says
``static_ok()`` (otherwise ``eager``); ``KVSIFT_DECODE=eager|static|graph`` overrides ``auto``.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import TYPE_CHECKING

import torch

from kvsift.kernels._triton import HAS_TRITON, triton_disabled

if TYPE_CHECKING:
    from kvsift.engine.attention import ForwardContext
    from kvsift.engine.llm import LLM
    from kvsift.methods.base import KVMethod

DECODE_MODES = ("auto", "eager", "static", "graph")


def check_decode_mode(mode: str) -> str:
    if mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}; got {mode!r}")
    return mode


def pick_decode_mode(requested: str, method: "KVMethod", device: torch.device) -> str:
    """The mode a generation runs in (see the module docstring)."""
    mode = check_decode_mode(requested)
    if mode == "auto":
        env = os.environ.get("KVSIFT_DECODE", "").strip().lower()
        if env:
            if env not in DECODE_MODES[1:]:
                raise ValueError(f"KVSIFT_DECODE must be eager, static or graph; got {env!r}")
            mode = env
    if mode == "auto":
        cuda_ok = device.type == "cuda" and HAS_TRITON and not triton_disabled()
        return "graph" if cuda_ok and method.static_ok() else "eager"
    if mode in ("static", "graph") and not method.static_ok():
        return "eager"  # e.g. streaming's rolling window: its decode step reshapes the cache
    if mode == "graph" and device.type != "cuda":
        raise ValueError("decode_mode='graph' needs a CUDA device (use 'static' or 'eager')")
    return mode


class DecodeRunner:
    """Runs the decode steps of one generation; ``step(tok, pos)`` returns the next logits.

    ``tok``/``pos`` ``(batch,)`` token ids and their positions; the result is ``(batch, vocab)``
    float32 (with ``graph`` a static buffer, overwritten by the next step: use it before then).
    ``close()`` must run at the end (the engine calls it in ``finally``)."""

    def __init__(self, llm: "LLM", ctx: "ForwardContext", mode: str, max_steps: int):
        self.llm, self.ctx, self.mode = llm, ctx, mode
        self.steps = 0          # steps run in static / graph mode
        self.setup_s = 0.0      # wall time of the static warm-up steps plus the graph recordings
        self.setup_steps = 0    # steps run statically in graph mode (one per kind of step)
        self.graphs: dict = {}  # step kind -> (graph, logits buffer)
        self._warm: set = set()  # step kinds that ran once (kernels and allocations warmed up)
        self._tok = self._pos = None
        if mode != "eager":
            ctx.cache.begin_static(max_steps)

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if self.mode == "eager":
            logits = self.llm._forward(ctx, tok[:, None], pos[:, None])
            ctx.step += 1
            return logits
        # the kind of step: the method's, and the cache's (quantized layers flushing their window)
        key = (ctx.method.decode_variant(ctx.run, ctx.step), ctx.cache.decode_variant(self.steps)) \
            if self.mode == "graph" else None
        ctx.cache.static_step = self.steps
        if self.mode == "graph" and key not in self.graphs and key in self._warm:
            t0 = time.perf_counter()
            self._capture(key, tok, pos)
            self.setup_s += time.perf_counter() - t0
        hit = self.graphs.get(key) if self.mode == "graph" else None
        if hit is not None:
            self._tok.copy_(tok[:, None])
            self._pos.copy_(pos[:, None])
            hit[0].replay()
            self._ran(replayed=True)
            return hit[1]
        t0 = time.perf_counter()
        logits = self.llm._forward(self.ctx, tok[:, None], pos[:, None])
        self._ran()
        if self.mode == "graph":
            self._warm.add(key)
            self.setup_s += time.perf_counter() - t0
            self.setup_steps += 1
        return logits

    def _ran(self, replayed: bool = False) -> None:
        self.steps += 1
        self.ctx.step += 1
        if replayed:
            self.ctx.cache.seen += 1

    def _capture(self, key, tok: torch.Tensor, pos: torch.Tensor) -> None:
        """Record one step of kind ``key`` over the static inputs (not run: the caller replays it);
        on failure warn once and stay static."""
        ctx, llm = self.ctx, self.llm
        if self._tok is None:
            self._tok = tok[:, None].clone()
            self._pos = pos[:, None].to(torch.int32).clone()
        graph = torch.cuda.CUDAGraph()
        seen = ctx.cache.seen
        try:
            torch.cuda.synchronize(llm.device)
            ctx.cache.step_positions = self._pos
            ctx.input_ids = self._tok
            with llm._forward_mode(ctx), torch.cuda.graph(graph):
                out = llm.model(input_ids=self._tok, position_ids=self._pos.long().clamp(min=0),
                                **{llm._cache_kw: ctx.cache}, use_cache=True, logits_to_keep=1)
                logits = out.logits[:, -1].float()
            self.graphs[key] = (graph, logits)
        except Exception as e:  # noqa: BLE001 - any capture failure: keep decoding without the graph
            self.mode = "static"
            warnings.warn(f"kvsift: CUDA graph capture failed, decoding without it ({type(e).__name__}: {e})",
                          RuntimeWarning, stacklevel=3)
        finally:
            ctx.cache.seen = seen

    def close(self) -> None:
        self.graphs.clear()
        if self.mode != "eager":
            self.ctx.cache.end_static(self.steps)
