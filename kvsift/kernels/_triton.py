"""Whether Triton can be used, imported once and never patched.

``HAS_TRITON`` is True when ``import triton`` works. ``triton`` / ``tl`` are the modules or ``None``.
Set ``KVSIFT_NO_TRITON=1`` to make the dispatcher use the PyTorch references everywhere.

Programmatic dependent launch (PDL, Hopper and newer): a kernel launched with it may be scheduled
while the kernel before it in the stream is still running, and waits on the device
(``griddepcontrol.wait``) for that kernel to finish and its writes to be visible before it reads or
writes anything; it also lets the kernel after it be scheduled early. A chain of small decode
kernels (Quest's page scores, top-k and sparse attention) then overlaps each launch's latency with
the tail of the kernel before it, CUDA graphs included. Off unless ``KVSIFT_PDL=1`` (or
:func:`pdl` in a ``with``): measured on an H100 (2026-12-05) the chains gain nothing at batch 1
(within 3%) and lose 5-7% at batch 8; :func:`pdl_launch` gives a launch's arguments, and every
kernel that takes them calls :func:`pdl_start` first, in every program (a program that returned
without waiting could let its kernel finish before the one it depends on).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

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


def _env_pdl() -> bool:
    return os.environ.get("KVSIFT_PDL", "").strip().lower() in {"1", "true", "yes", "on"}


_PDL = {"on": _env_pdl()}
_PDL_OK: dict[int, bool] = {}


def triton_has_pdl() -> bool:
    """This Triton has the ``gdc_*`` instructions and the NVIDIA backend's ``launch_pdl`` option
    (no device needed: kernels can be compiled for a Hopper target anywhere)."""
    if not HAS_TRITON:
        return False
    try:
        import triton.language.extra.cuda as _cuda
        from triton.backends.nvidia.compiler import CUDAOptions

        return hasattr(_cuda, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__
    except Exception:  # noqa: BLE001 - an older or non-NVIDIA Triton
        return False


def pdl_supported(device) -> bool:
    """:func:`triton_has_pdl`, and ``device`` is a CUDA device of compute capability 9 or more
    (cached per device)."""
    import torch

    if not HAS_TRITON or device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL_OK:
        _PDL_OK[idx] = triton_has_pdl() and torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL_OK[idx]


def pdl_launch(t) -> dict:
    """Keyword arguments for a launch of a kernel that takes ``PDL`` (over tensor ``t``'s device):
    ``{"PDL": True, "launch_pdl": True}`` where PDL is on and supported, else ``{"PDL": False}``."""
    if _PDL["on"] and pdl_supported(t.device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@contextmanager
def pdl(on: bool = True):
    """Launch the kernels that take it with (or without) PDL inside the block (the benchmark's
    switch; the process default is ``KVSIFT_PDL``); restored on exit. A CUDA graph keeps how its
    kernels were launched when it was captured."""
    before = _PDL["on"]
    _PDL["on"] = bool(on)
    try:
        yield
    finally:
        _PDL["on"] = before


if HAS_TRITON:

    @triton.jit
    def pdl_start(PDL: tl.constexpr):
        """A program's first step under PDL: wait until the kernel before it has finished and its
        writes are visible, then let the kernel after it be scheduled (it waits in turn)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
else:
    pdl_start = None
