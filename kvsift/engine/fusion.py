"""Fewer launches per decode step: the model's RMSNorm and rotary embedding as one kernel each.

At batch 1 a decode step is bound by launch latency as much as by bytes: besides the weights and
the KV, every layer runs two RMSNorms (about seven small launches each in transformers) and the
rotary embedding of queries and keys (about fourteen). Inside :func:`fused_decode`, a Llama-family
model (Llama, Qwen2, Qwen3, Mistral) runs them as :func:`kvsift.kernels.dispatch.rmsnorm` (one
launch per norm) and :func:`kvsift.kernels.dispatch.rope` (one for q and k), which compute what
transformers computes (the rotary embedding bit for bit, the norm up to its reduction order).

How, without patching anything at import: on entry each RMSNorm module gets an instance
``forward`` (removed on exit), and the modeling module's ``apply_rotary_pos_emb`` global is
replaced while any model of that family is inside (a count per module, under a lock, so nested or
concurrent users restore it once, when the last one leaves). Both fall back to the original code
for anything they do not cover (CPU tensors, mixed dtypes, partial rotary, other arguments).

The engine enters it for decode steps on CUDA when ``ModelRunner.fused_decode`` is on
(``KVSIFT_FUSED_DECODE=1``; off by default until measured on every model family).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
import weakref

import torch

from kvsift.kernels import dispatch

FAMILIES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"})

_LOCK = threading.Lock()
_ROPE: dict[types.ModuleType, list] = {}   # modeling module -> [original apply_rotary_pos_emb, users]


def supported(model) -> bool:
    """Whether :func:`fused_decode` changes anything for ``model`` (a Llama-family model)."""
    return getattr(getattr(model, "config", None), "model_type", None) in FAMILIES


def _norm_forward(module):
    cls_forward = type(module).forward
    eps = float(module.variance_epsilon)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        w = module.weight
        if w.dtype != hidden_states.dtype or not hidden_states.is_cuda:
            return cls_forward(module, hidden_states)
        return dispatch.rmsnorm(hidden_states, w, eps)

    return forward


def _rope_covered(q, k, cos, sin) -> bool:
    return (q.is_cuda and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape
            and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:] and cos.shape[1:] == q.shape[2:]
            and cos.shape[0] in (1, q.shape[0]) and q.shape[-1] % 2 == 0)


def _rope_fn(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        plain = (not args or args == (1,)) and (not kwargs or kwargs == {"unsqueeze_dim": 1}) \
            and not (args and kwargs)
        if plain and _rope_covered(q, k, cos, sin):
            return dispatch.rope(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb


def _modeling_modules(model) -> list[types.ModuleType]:
    mods = []
    for m in model.modules():
        mod = sys.modules.get(type(m).__module__)
        if mod is not None and mod not in mods and callable(getattr(mod, "apply_rotary_pos_emb", None)) \
                and type(m).__name__.endswith("Attention"):
            mods.append(mod)
    return mods


_TARGETS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _targets(model) -> tuple[list, list[types.ModuleType]]:
    """The model's RMSNorm modules and its attention classes' modeling modules (found once per model:
    the swap is entered at every eager or static decode step)."""
    found = _TARGETS.get(model)
    if found is None:
        norms = [m for m in model.modules() if type(m).__name__ in NORMS and hasattr(m, "variance_epsilon")]
        found = _TARGETS[model] = (norms, _modeling_modules(model))
    return found


@contextlib.contextmanager
def fused_decode(model):
    """Run ``model``'s RMSNorms and rotary embeddings as single kernels inside the block (see the
    module docstring); a no-op for other model families."""
    if not supported(model):
        yield
        return
    all_norms, mods = _targets(model)
    norms = [m for m in all_norms if "forward" not in vars(m)]   # (not those an outer block swapped)
    entered: list[types.ModuleType] = []
    try:
        for m in norms:
            m.forward = _norm_forward(m)
        with _LOCK:
            for mod in mods:
                slot = _ROPE.get(mod)
                if slot is None:
                    slot = _ROPE[mod] = [mod.apply_rotary_pos_emb, 0]
                    mod.apply_rotary_pos_emb = _rope_fn(slot[0])
                slot[1] += 1
                entered.append(mod)
        yield
    finally:
        for m in norms:
            vars(m).pop("forward", None)
        with _LOCK:
            for mod in entered:
                slot = _ROPE[mod]
                slot[1] -= 1
                if slot[1] == 0:
                    mod.apply_rotary_pos_emb = slot[0]
                    del _ROPE[mod]
