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
  stays ``static``. The graphs and their static inputs belong to the model runner's
  :class:`~kvsift.engine.graphs.GraphCache` (inputs per batch-size bucket, reused by every
  generation; graphs keyed by bucket, kind and the cache they run over).

``LLM(decode_mode=...)`` picks: ``auto`` is ``graph`` on CUDA with Triton when the method says
``static_ok()`` and ``graph_ok()``, ``static`` when only ``static_ok()`` (a step with a host round
trip, e.g. host chunks fetched through the CPU under ``KVSIFT_NO_UVA``), otherwise ``eager``; a ``graph`` request
gets ``static`` or ``eager`` the same way; ``KVSIFT_DECODE=eager|static|graph`` overrides ``auto``.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import TYPE_CHECKING

import torch

from kvsift.kernels._triton import HAS_TRITON, triton_disabled

from kvsift.engine.graphs import layout_token

if TYPE_CHECKING:
    from kvsift.engine.attention import ForwardContext
    from kvsift.engine.runner import ModelRunner
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
        if not (cuda_ok and method.static_ok()):
            return "eager"
        return "graph" if method.graph_ok() else "static"
    if mode in ("static", "graph") and not method.static_ok():
        return "eager"  # e.g. streaming's rolling window: its decode step reshapes the cache
    if mode == "graph" and device.type != "cuda":
        raise ValueError("decode_mode='graph' needs a CUDA device (use 'static' or 'eager')")
    if mode == "graph" and not method.graph_ok():
        return "static"  # e.g. host chunks fetched through the CPU (KVSIFT_NO_UVA): a host sync per step
    return mode


def _reset_cuda_rng(device: torch.device) -> None:
    """After a failed graph capture: the CUDA generator was registered with the capture, which never
    ended, so it still believes one is under way, and every later random op on the device raises
    ("Offset increment outside graph capture"). Give it a fresh state with the same seed and
    offset (``graphsafe_set_state``, torch >= 2.4)."""
    if device.type != "cuda":
        return
    try:
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        gen.graphsafe_set_state(gen.clone_state())
    except (AttributeError, RuntimeError, IndexError):  # older torch: nothing to reset
        pass


class DecodeRunner:
    """Runs the decode steps of one generation; ``step(tok, pos)`` returns the next logits.

    ``tok``/``pos`` ``(batch,)`` token ids and their positions; the result is ``(batch, vocab)``
    float32 (with ``graph`` a static buffer, overwritten by the next step: use it before then).
    ``close()`` must run at the end (the engine calls it in ``finally``).

    It calls the model only through its :class:`~kvsift.engine.runner.ModelRunner` (``forward``,
    ``capture``); the graphs it records live in the runner's
    :class:`~kvsift.engine.graphs.GraphCache`, keyed by batch bucket, kind of step and this
    generation's cache (their layout), and leave it when this generation closes."""

    def __init__(self, runner: "ModelRunner", ctx: "ForwardContext", mode: str, max_steps: int):
        self.runner, self.ctx, self.mode = runner, ctx, mode
        self.steps = 0          # steps run in static / graph mode
        self.setup_s = 0.0      # wall time of the static warm-up steps plus the graph recordings
        self.setup_steps = 0    # steps run statically in graph mode (one per kind of step)
        self._warm: set = set()  # step kinds that ran once (kernels and allocations warmed up)
        self._tok = self._pos = None
        self.layout = layout_token(ctx.cache)
        self.batch = ctx.next_pos.shape[0] if ctx.next_pos is not None else None
        self.bucket = runner.graphs.bucket(self.batch) if self.batch else None
        if mode == "graph" and self.bucket is None:
            self.mode = "static"  # more rows than the largest graph bucket
        # the runner's KV arena of this shape (``full``, with ``kv_arena`` on): the steps run over it,
        # padded to the bucket, and its graphs outlive this generation
        self.arena = runner.arena_for(ctx, self.mode, max_steps) if self.mode != "eager" else None
        if self.arena is not None:
            self.ctx = dataclasses.replace(ctx, cache=self.arena.cache, has_padding=True)
            self.layout = layout_token(self.arena)
            self._tok, self._pos = runner.graphs.inputs(self.bucket, ctx.next_pos.device)
            self._tok[self.batch:].fill_(runner.pad_id)  # rows past the batch: no token, position -1
            self._pos[self.batch:].fill_(-1)
        elif self.mode != "eager":
            ctx.cache.begin_static(max_steps)

    def _key(self, kind):
        return self.runner.graphs.key(self.bucket, kind, self.layout)

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if self.mode == "eager":
            logits = self.runner.forward(ctx, tok[:, None], pos[:, None])
            ctx.step += 1
            return logits
        graphs = self.runner.graphs
        kind = self._kind() if self.mode == "graph" else None
        key = self._key(kind)
        ctx.cache.static_step = self.steps
        if self.mode == "graph":
            self._record_due(kind, tok, pos)
        # a graph of this kind over this memory: recorded by this generation, or by an earlier one
        # over the same arena
        hit = graphs.get(key) if self.mode == "graph" and key in graphs else None
        b = self.batch
        if hit is not None:
            self._tok[:b].copy_(tok[:, None])
            self._pos[:b].copy_(pos[:, None])
            hit.graph.replay()
            self._ran(replayed=True)
            return hit.logits[:b] if self.arena is not None else hit.logits
        t0 = time.perf_counter()
        if self.arena is not None:  # a static step over the arena, padded to its bucket
            self._tok[:b].copy_(tok[:, None])
            self._pos[:b].copy_(pos[:, None])
            logits = self.runner.forward(self.ctx, self._tok, self._pos)[:b]
        else:
            logits = self.runner.forward(self.ctx, tok[:, None], pos[:, None])
        self._ran()
        if self.mode == "graph":
            self._warm.add(kind)
            self.setup_s += time.perf_counter() - t0
            self.setup_steps += 1
        return logits

    def prepare(self, tok: torch.Tensor, pos: torch.Tensor) -> None:
        """Record the next step's graph now if that step would record it (graph mode, a kind that
        ran once and has no graph over this memory yet): the engine calls it right after a step,
        before it streams that step's input tokens, so a new batch's recording lands before its
        rows' first tokens (in their time to first token) instead of between two tokens. ``tok``
        and ``pos`` only fill the static inputs while recording; the step copies its own."""
        if self.mode != "graph":
            return
        self.ctx.cache.static_step = self.steps
        self._record_due(self._kind(), tok, pos)

    def _kind(self):
        """The kind of the next step: the method's, and the cache's (quantized layers flushing their
        window)."""
        ctx = self.ctx
        return ctx.method.decode_variant(ctx.run, ctx.step), ctx.cache.decode_variant(self.steps)

    def _record_due(self, kind, tok: torch.Tensor, pos: torch.Tensor) -> None:
        """Record the graph of a step of ``kind`` when it is due: that kind ran once (warmed up) and
        has no graph over this memory yet."""
        if self._key(kind) not in self.runner.graphs and kind in self._warm:
            t0 = time.perf_counter()
            self._capture(kind, tok, pos)
            self.setup_s += time.perf_counter() - t0

    def _ran(self, replayed: bool = False) -> None:
        self.steps += 1
        self.ctx.step += 1
        if replayed:
            self.ctx.cache.seen += 1

    def _capture(self, kind, tok: torch.Tensor, pos: torch.Tensor) -> None:
        """Record one step of kind ``kind`` over the runner's static inputs of this bucket (not run:
        the caller replays it); on failure warn once and stay static."""
        if self._tok is None:  # (with an arena: the whole bucket's inputs, set up at the start)
            tok_buf, pos_buf = self.runner.graphs.inputs(self.bucket, tok.device)
            self._tok, self._pos = tok_buf[: self.batch], pos_buf[: self.batch]
            self._tok.copy_(tok[:, None])
            self._pos.copy_(pos[:, None])
        try:
            self.runner.graphs.put(self._key(kind), self.runner.capture(self.ctx, self._tok, self._pos))
        except Exception as e:  # noqa: BLE001 - any capture failure: keep decoding without the graph
            self.mode = "static"
            _reset_cuda_rng(tok.device)
            warnings.warn(f"kvsift: CUDA graph capture failed, decoding without it ({type(e).__name__}: {e})",
                          RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        if self.arena is not None:
            return  # the arena and its graphs stay with the runner, for the next generation
        self.runner.graphs.release(self.layout)
        if self.mode != "eager":
            self.ctx.cache.end_static(self.steps)
