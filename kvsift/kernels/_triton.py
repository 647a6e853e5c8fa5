"""Whether Triton can be used, imported once and never patched.

``HAS_TRITON`` is True when ``import triton`` works. ``triton`` / ``tl`` are the modules or ``None``.
Set ``KVSIFT_NO_TRITON=1`` to make the dispatcher use the PyTorch references everywhere.
"""

from __future__ import annotations

import os

try:  # pragma: no cover - depends on the machine
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install (no compiler, no driver)
    triton = None
    tl = None
    HAS_TRITON = False


def triton_disabled() -> bool:
    """``KVSIFT_NO_TRITON`` set to a true value forces the references."""
    return os.environ.get("KVSIFT_NO_TRITON", "").strip().lower() in {"1", "true", "yes", "on"}


_SM_COUNT: dict[int, int] = {}


def sm_count(device) -> int:
    """Multiprocessors of a CUDA device (cached; 1 for the CPU interpreter)."""
    import torch

    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
