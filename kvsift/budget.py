"""KV budgets, in one place: parsing (CLI, server, eval), validation and resolution to tokens.

A budget is ``None`` (keep everything), a token count (``int >= 1``) or a ratio of the prompt
(``float`` in (0, 1]). Text forms: ``"1024"``, ``"0.25"``, ``"25%"`` (and ``"full"`` where a
caller allows it). This module imports nothing heavy (the kvpress eval worker uses it).
"""

from __future__ import annotations

import math

from kvsift.errors import BudgetError

Budget = int | float | None
FULL = "full"


def validate_budget(budget: Budget, what: str = "budget") -> Budget:
    """Check ``budget`` and return it normalised (an integral float > 1 becomes an int)."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise BudgetError(f"{what} must be an int (tokens) or a float ratio in (0, 1], got {budget!r}", param=what)
    if isinstance(budget, float) and budget.is_integer() and budget > 1:
        budget = int(budget)
    if isinstance(budget, int):
        if budget < 1:
            raise BudgetError(f"{what} must be >= 1 token, got {budget}", param=what)
    elif not (0.0 < budget <= 1.0):
        raise BudgetError(f"{what} ratio must be in (0, 1], got {budget}", param=what)
    return budget


def parse_budget(text: str | int | float | None, *, allow_full: bool = False, what: str = "budget") -> Budget:
    """``"1024"`` -> 1024 tokens, ``"0.25"`` or ``"25%"`` -> ratio 0.25; with ``allow_full``,
    ``"full"``/``"none"``/``""`` -> None."""
    if text is None or isinstance(text, (int, float)):
        return validate_budget(text, what)
    s = str(text).strip()
    if allow_full and s.lower() in (FULL, "none", ""):
        return None
    percent = s.endswith("%")
    try:
        if percent:
            value: Budget = float(s[:-1]) / 100.0
        elif any(c in s for c in ".eE"):
            value = float(s)
        else:
            value = int(s)
    except ValueError:
        raise BudgetError(f"{what} must be a token count (e.g. 1024), a ratio (0.25) or a percentage (25%), "
                          f"got {text!r}", param=what) from None
    if percent and not 0.0 < value <= 1.0:
        raise BudgetError(f"{what} percentage must be in (0%, 100%], got {text!r}", param=what)
    if not math.isfinite(value):
        raise BudgetError(f"{what} must be finite, got {text!r}", param=what)
    return validate_budget(value, what)


def resolve_budget(budget: Budget, prompt_len: int, *, clamp: bool = False, what: str = "budget") -> int:
    """Tokens kept for ``budget`` over a prompt of ``prompt_len`` tokens: ratio -> ``ceil(ratio * n)``
    (at least 1), tokens as given. A token budget over the prompt is a :class:`BudgetError` unless
    ``clamp`` (then it is capped at the prompt: eval grids that share one budget over lengths)."""
    budget = validate_budget(budget, what)
    if budget is None:
        return prompt_len
    if isinstance(budget, float):
        return max(1, math.ceil(budget * prompt_len))
    if budget > prompt_len:
        if clamp:
            return prompt_len
        raise BudgetError(f"{what} {budget} tokens is larger than the context ({prompt_len} tokens); "
                          f"use at most {prompt_len} or a ratio in (0, 1]", param=what)
    return budget


def budget_label(budget: Budget) -> str:
    """``None`` -> ``"full"``, 1024 -> ``"1024"``, 0.25 -> ``"0.25"``."""
    if budget is None:
        return FULL
    return str(budget) if isinstance(budget, int) else f"{budget:g}"


# ---- KV memory of a request (scheduler admission, context room) --------------------------------------
def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """KV bytes one kept token takes on every layer: keys + values + an int32 position per KV head."""
    return num_layers * num_kv_heads * (2 * head_dim * itemsize + 4)


def prefill_kv_bytes(per_token: int, rows: int, prompt_tokens: int, kept_tokens: int, *,
                     row_prefill: bool = False, row_share: float = 1.0) -> int:
    """Device KV bytes a fresh prefill of ``rows`` prompts holds at its peak: every prompt's whole KV,
    or (``row_prefill``) one row's whole prompt beside the rows already compressed to ``kept_tokens``
    (and quantized to ``row_share`` of their bytes: kivi)."""
    kept = min(kept_tokens, prompt_tokens)
    if row_prefill:
        return int((prompt_tokens + (rows - 1) * kept * row_share) * per_token)
    return rows * prompt_tokens * per_token


def request_kv_bytes(per_token: int, rows: int, prompt_tokens: int, kept_tokens: int, new_tokens: int, *,
                     context_bytes: int = 0, offloads: bool | float = False,
                     row_prefill: bool = False, context_shared: bool = False,
                     device_share: tuple[float, int] = (1.0, 0), row_share: float = 1.0) -> tuple[int, int]:
    """``(device, host)`` KV bytes a generation of ``rows`` sequences is expected to hold at its peak.

    ``prompt_tokens``: the longest prompt (after a reused context); ``kept_tokens``: what the budget
    keeps of it per sequence (:func:`resolve_budget`); ``new_tokens``: decode steps; ``context_bytes``:
    a reused context's KV, copied for every row (held once, read by reference, with
    ``context_shared``). The prefill holds the whole prompt's KV on the device (one row at a time
    with ``row_prefill``) until it is compressed; an offloading method
    (``offloads``: True, or the share of each token's KV it keeps there, the method's ``host_share()``)
    then keeps the whole prompt in host memory and ``kept_tokens`` on the device; a quantizing one
    (``device_share = (share, window)``: kivi) keeps that share of each token's bytes after the
    prefill, its ``window`` newest tokens whole. A lower
    bound (method state and allocator slack are not counted), so it refuses nothing that would fit."""
    kept = min(kept_tokens, prompt_tokens)
    prefill = prefill_kv_bytes(per_token, rows, prompt_tokens, kept, row_prefill=row_prefill, row_share=row_share)
    share, window = device_share  # a quantized cache: a share of each token, a full-precision window
    decode = int(rows * per_token * ((kept + new_tokens) * share + min(window, kept + new_tokens) * (1 - share)))
    device = (1 if context_shared else rows) * context_bytes + max(prefill, decode)
    host = int(rows * prompt_tokens * per_token * float(offloads))
    return device, host


# a server's default admission limits (``kvsift serve`` without --kv-memory / --host-memory, on CUDA)
DEVICE_KV_SHARE = 0.8
HOST_KV_SHARE = 0.5


def parse_bytes(text: str | int, what: str = "size") -> int:
    """``"2G"``, ``"512M"``, ``"1.5GiB"``, ``"1048576"`` -> bytes (powers of 1024); an
    :class:`~kvsift.errors.InputError` naming ``what`` otherwise."""
    import re

    from kvsift.errors import InputError

    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not m:
        raise InputError(f"{what}: expected a size such as 512M or 2G, got {text!r}", param=what)
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def available_host_bytes() -> int:
    """Host memory available to a new allocation without swapping: ``MemAvailable`` of
    ``/proc/meminfo`` (free memory plus the page cache the kernel can drop), else the free pages
    (``sysconf``), else 0. (Free pages alone undercount a machine that just wrote a model to disk.)"""
    import os

    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def default_memory_limits(device, free_device: int | None = None,
                          available_host: int | None = None) -> tuple[int | None, int | None]:
    """``(device, host)`` KV bytes a server admits at once by default: on CUDA,
    :data:`DEVICE_KV_SHARE` of the device memory free once the model is loaded (the rest for
    prefill activations, at most ``max_batched_tokens`` tokens a forward, for a layer's second copy
    while a batch whose rows change is rebuilt, and for the allocator's slack) and
    :data:`HOST_KV_SHARE` of the host memory available (offloaded KV is pinned: past it the
    process is killed rather than told); elsewhere ``(None, None)``, unbounded. ``free_device`` /
    ``available_host``: the measured figures (read from the device and the OS when None)."""
    if getattr(device, "type", str(device)) != "cuda":
        return None, None
    if free_device is None:
        import torch

        free_device = torch.cuda.mem_get_info(device)[0]
    if available_host is None:
        available_host = available_host_bytes()
    return int(free_device * DEVICE_KV_SHARE), (int(available_host * HOST_KV_SHARE) if available_host else None)
