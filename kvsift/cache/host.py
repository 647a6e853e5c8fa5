"""Page-locked host memory for offloaded KV, kept for reuse: :class:`HostPool`.

An offloading method (``sentencekv``, ``shadowkv``) writes every prompt's KV to page-locked host
memory, one block per layer and tensor (a 32k-token prompt of a Llama-3.1-8B-shaped model: 64 MiB
of keys and as much of values per layer). Locking memory is not free: the kernel faults in and
zeroes every page, CUDA pins and maps them (``cudaHostRegister``), and freeing undoes both. torch's
own pinned allocator caches its blocks but rounds each one up to a power of two (a 64 MiB + 1 row
block takes 128 MiB).

:func:`pinned_empty` is how the host stores (``ChunkStore``) and the swap of preempted rows
(``LLM._preempt``) get their page-locked memory. The pool keeps blocks of the sizes asked for
(rounded up to :data:`GRANULE`) and hands a released block to the next request of about its size
(within :data:`REUSE_SLACK`), so a server's steady state locks no new memory: the
next prompt's layers reuse the last one's blocks. It holds at most ``limit`` bytes in all (blocks
in use plus cached ones); past it, released blocks are unregistered and freed. A block is
released when the last tensor viewing it is freed. The pool then records a CUDA event on the
releasing thread's current stream of the device its owner used, and waits for that event before
it hands the block out again, since copies or kernels its last owner queued may still read or
write it. It waits only for the work queued up to the release, not for everything queued since
(a device sync would also wait for the new owner's own queued work, e.g. the previous layer's
host writes). Owners that write a block from another stream order those writes before they free
it (``ChunkStore`` does).

    from kvsift.cache.host import host_pool
    t = host_pool().empty((rows, 128), torch.bfloat16, device)   # None: not pooled (small, no CUDA)
    host_pool().reserve([((rows, 128), torch.bfloat16)] * 64)   # lock them now, on a worker thread
    host_pool().stats()     # {"limit", "total", "in_use", "cached", "hits", "misses", "released", "reserved"}
    host_pool().clear()     # unregister and free the cached blocks

A method that knows early what it will offload (sentencekv, at a prompt's first prefill layer)
reserves the blocks: a worker thread locks them (``cudaHostRegister`` releases the GIL) while the
device computes the prefill, and the offload finds them cached. An allocation that a reservation
of its size is still locking waits for that block instead of locking another.

``KVSIFT_HOST_POOL=0`` caches nothing (each block is unregistered when released, as before);
``KVSIFT_HOST_POOL=<bytes>`` sets the limit (default: :data:`kvsift.budget.HOST_KV_SHARE` of the host
memory available when the pool is first used; ``kvsift serve`` sets it to its ``--host-memory``).
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

GRANULE = 2 << 20        # block sizes are whole multiples of this (a huge page)
MIN_BYTES = 1 << 20      # smaller tensors are not pooled (torch's caching pinned allocator takes them)
REUSE_SLACK = 0.25       # a cached block serves a request of at least 1 / (1 + slack) of its size
RESERVE_WAIT_S = 60.0    # most an allocation waits for a reservation's worker to lock its block

__all__ = ["HostPool", "host_pool", "pinned_empty", "capturing", "GRANULE", "MIN_BYTES"]


@dataclass(eq=False)
class _Block:
    buf: np.ndarray           # (size,) uint8, registered
    size: int
    device: torch.device | None = None   # the device its last owner used
    done: Any = None                     # its release point on that device (waited for before reuse)


def _cuda_register(ptr: int, nbytes: int) -> bool:
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)) == 0


def _cuda_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)


def capturing(stream) -> bool:
    """Whether ``stream`` (a CUDA stream) is recording a CUDA graph: a release or a store freed
    inside a capture (a finalizer the garbage collector runs there) must not add work to it."""
    with torch.cuda.stream(stream):
        return torch.cuda.is_current_stream_capturing()


def _mark(device: torch.device | None) -> Any:
    """A CUDA event recorded now on the current stream of ``device``, or None: no CUDA device, or
    that stream is recording a CUDA graph (:func:`capturing`; the next owner then syncs the device)."""
    if device is None or device.type != "cuda" or not torch.cuda.is_initialized():
        return None
    stream = torch.cuda.current_stream(device)
    if capturing(stream):
        return None
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


def _wait(event: Any) -> None:
    event.synchronize()


class HostPool:
    """Registered (page-locked) host blocks, cached for reuse up to ``limit`` bytes in all.

    Parameters
    ----------
    limit : int
        Most bytes the pool holds registered, in use and cached together; a block released while
        the pool holds more is freed. ``0``: nothing is cached. An allocation is never refused for
        the limit (cached blocks are freed first to make room).
    register, unregister : callables, optional
        ``register(ptr, nbytes) -> bool`` locks host memory, ``unregister(ptr)`` unlocks it
        (default: ``cudaHostRegister`` / ``cudaHostUnregister``; tests pass others).
    sync : callable, optional
        ``sync(device)`` before a cached block whose release has no mark is handed out again
        (default: synchronize that CUDA device).
    mark, wait : callables, optional
        ``mark(device) -> handle or None`` when a block is released (default: a CUDA event on the
        current stream of its owner's device), ``wait(handle)`` before it is handed out again
        (default: wait for that event). A block released without a handle falls back to ``sync``.
    """

    def __init__(self, limit: int, register: Callable[[int, int], bool] | None = None,
                 unregister: Callable[[int], None] | None = None,
                 sync: Callable[[torch.device | None], None] | None = None,
                 mark: Callable[[torch.device | None], Any] | None = None,
                 wait: Callable[[Any], None] | None = None):
        if limit < 0:
            raise ValueError(f"limit must be >= 0 bytes, got {limit}")
        self.limit = int(limit)
        self._register = register or _cuda_register
        self._unregister = unregister or _cuda_unregister
        self._sync = sync or _sync
        self._mark = mark or _mark
        self._wait = wait or _wait
        self._lock = threading.Lock()      # not reentrant: a release inside a locked section queues
        self._cond = threading.Condition(self._lock)   # a reserved block was locked
        self._free: list[_Block] = []      # cached blocks, oldest first
        self._returned: deque[_Block] = deque()   # released while the lock was held
        self._pending: dict[int, int] = {}   # size -> blocks a reservation is still locking
        self._worker: ThreadPoolExecutor | None = None
        self.total = 0                     # registered bytes, in use and cached
        self.hits = self.misses = self.released = self.reserved = 0

    # ---- allocation ------------------------------------------------------------------------------
    def empty(self, shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device | str | None = None) -> torch.Tensor | None:
        """An uninitialised page-locked host tensor of ``shape`` and ``dtype`` (``device``: the CUDA
        device that will read or write it), or None when it is smaller than :data:`MIN_BYTES` or
        the memory could not be locked (the caller falls back to ``torch.empty(...,
        pin_memory=True)``)."""
        nbytes = _nbytes(shape, dtype)
        if nbytes < MIN_BYTES:
            return None
        size = _rounded(nbytes)
        dev = torch.device(device) if device is not None else None
        with self._lock:
            try:
                block = self._take(size)
                deadline = time.monotonic() + RESERVE_WAIT_S
                while block is None and self._pending_fits(size):   # a reservation is locking one
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break   # the worker is stuck: lock a block here instead
                    self._cond.wait(left)
                    block = self._take(size)
                if block is None:
                    self._make_room(size)
                    buf = np.empty(size, dtype=np.uint8)
                    if not self._register(buf.ctypes.data, size):
                        return None
                    block = _Block(buf, size)
                    self.total += size
                    self.misses += 1
                else:
                    self.hits += 1
                    if block.done is not None:
                        self._wait(block.done)      # the work its last owner queued before the release
                    else:
                        self._sync(block.device)
                block.device, block.done = dev, None
                view = block.buf[:nbytes]   # the tensor holds this view; when it is freed, so is the block
                fin = weakref.finalize(view, self._release, block)
                fin.atexit = False
            finally:
                self._drain()
        return torch.from_numpy(view).view(dtype).view(shape)

    def _fits(self, block_size: int, size: int) -> bool:
        return size <= block_size <= size * (1 + REUSE_SLACK)

    def _pending_fits(self, size: int) -> bool:
        return any(n > 0 and self._fits(s, size) for s, n in self._pending.items())

    def _take(self, size: int) -> _Block | None:
        """The smallest cached block that fits ``size`` bytes within the slack (removed), or None."""
        best = None
        for i, b in enumerate(self._free):
            if self._fits(b.size, size) and (best is None or b.size < self._free[best].size):
                best = i
        return None if best is None else self._free.pop(best)

    def _make_room(self, size: int) -> None:
        """Free cached blocks, oldest first, until ``size`` more bytes fit the limit (or none is left)."""
        while self._free and self.total + size > self.limit:
            self._drop(self._free.pop(0))

    def _drop(self, block: _Block) -> None:
        self._unregister(block.buf.ctypes.data)
        self.total -= block.size
        block.buf = None   # the memory goes back to the OS with the array

    # ---- reservation ---------------------------------------------------------------------------------
    def reserve(self, shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> Future | None:
        """Lock blocks for tensors of ``shapes`` (``(shape, dtype)`` pairs) on a worker thread and
        cache them, so that later :meth:`empty` calls of those sizes find them: the locking runs
        beside the caller's work instead of inside it. Blocks already cached count against the
        request (one cached block covers one shape); what would take the pool past its limit is not
        reserved. Returns the worker's future (None when nothing is to be locked)."""
        sizes = []
        with self._lock:
            self._drain()
            free = [b.size for b in self._free]
            room = self.limit - self.total - sum(s * n for s, n in self._pending.items())
            for shape, dtype in shapes:
                nbytes = _nbytes(shape, dtype)
                if nbytes < MIN_BYTES:
                    continue
                size = _rounded(nbytes)
                have = next((i for i, s in enumerate(free) if self._fits(s, size)), None)
                if have is not None:    # already cached: that one will serve it
                    free.pop(have)
                    continue
                if size > room:
                    continue
                room -= size
                sizes.append(size)
                self._pending[size] = self._pending.get(size, 0) + 1
            if not sizes:
                return None
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="kvsift-host-pool")
        return self._worker.submit(self._lock_blocks, sizes)

    def _lock_blocks(self, sizes: list[int]) -> int:
        """(Worker thread.) Lock blocks of ``sizes`` and cache them; returns how many were locked."""
        done = 0
        for i, size in enumerate(sizes):
            block = None
            try:
                buf = np.empty(size, dtype=np.uint8)
                if self._register(buf.ctypes.data, size):
                    block = _Block(buf, size)   # never used: no device to wait for
            finally:
                with self._lock:
                    self._pending[size] -= 1
                    if block is not None:
                        self._free.append(block)
                        self.total += size
                        self.reserved += 1
                        done += 1
                    if block is None:   # locking failed: the rest is not tried
                        for s in sizes[i + 1:]:
                            self._pending[s] -= 1
                    self._drain()
                    self._cond.notify_all()
            if block is None:
                break
        return done

    # ---- release -----------------------------------------------------------------------------------
    def _release(self, block: _Block) -> None:
        """The last tensor viewing ``block`` was freed (any thread, possibly inside a locked
        section of this pool: then it is queued and handled when that section ends)."""
        try:
            block.done = self._mark(block.device)
        except Exception:   # (a finalizer must not raise) no mark: the next owner syncs the device
            block.done = None
        self._returned.append(block)
        if self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        """(Lock held.) Cache the released blocks, or free them past the limit."""
        back = bool(self._returned)
        while self._returned:
            block = self._returned.popleft()
            self.released += 1
            self._free.append(block)
        if back:
            self._cond.notify_all()   # an allocation waiting for a reservation may take one of these
        while self._free and self.total > self.limit:
            self._drop(self._free.pop(0))

    # ---- control -----------------------------------------------------------------------------------
    def set_limit(self, limit: int) -> None:
        """Change the limit; cached blocks past it are freed now."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0 bytes, got {limit}")
        with self._lock:
            self.limit = int(limit)
            self._drain()

    def clear(self) -> None:
        """Unregister and free every cached block (blocks in use are kept)."""
        with self._lock:
            self._drain()
            while self._free:
                self._drop(self._free.pop(0))

    def stats(self) -> dict[str, int]:
        """``limit``, ``total`` (registered bytes), ``in_use``, ``cached`` (bytes), and the counts
        ``hits`` (allocations served by a cached block), ``misses`` (newly locked), ``released``
        and ``reserved`` (blocks locked by :meth:`reserve`)."""
        with self._lock:
            self._drain()
            cached = sum(b.size for b in self._free)
            return {"limit": self.limit, "total": self.total, "in_use": self.total - cached, "cached": cached,
                    "hits": self.hits, "misses": self.misses, "released": self.released, "reserved": self.reserved}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(int(x) for x in shape) * dtype.itemsize


def _rounded(nbytes: int) -> int:
    return -(-nbytes // GRANULE) * GRANULE


_POOL: HostPool | None = None
_POOL_LOCK = threading.Lock()


def _default_limit() -> int:
    from kvsift.budget import HOST_KV_SHARE, available_host_bytes

    env = os.environ.get("KVSIFT_HOST_POOL", "").strip().lower()
    if env in {"0", "off", "false", "no"}:
        return 0
    if env:
        from kvsift.budget import parse_bytes

        return parse_bytes(env, what="KVSIFT_HOST_POOL")
    return int(available_host_bytes() * HOST_KV_SHARE)


def host_pool() -> HostPool:
    """The process's pool of page-locked host blocks (created at first use)."""
    global _POOL
    if _POOL is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = HostPool(_default_limit())
    return _POOL


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """A page-locked host tensor of exactly its size (uninitialised); ``device``: the CUDA device
    that reads and writes it.

    Blocks of 1 MiB and more come from the process's :class:`~kvsift.cache.host.HostPool`: host
    memory registered with CUDA (``cudaHostRegister``) in blocks of the size asked for, cached when
    freed and handed to the next prompt's store (locking new memory is slow, and torch's pinned
    allocator rounds every block up to a power of two). Smaller ones, or when registering fails,
    come from torch's caching pinned allocator."""
    if torch.cuda.is_available():
        t = host_pool().empty(shape, dtype, device)
        if t is not None:
            return t
    return torch.empty(shape, dtype=dtype, pin_memory=True)
