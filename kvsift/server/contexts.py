"""Reusable contexts: serialization (safetensors + JSON metadata with a checksum, written atomically)
and the server's store (LRU over the KV bytes kept in memory, persisted contexts reload on demand).

On disk, one directory per context::

    <contexts_dir>/<ctx_id>/kv.safetensors   layers.{i}.keys|values (1, kv_heads, n_i, head_dim),
                                             layers.{i}.positions (1, kv_heads, n_i) int32,
                                             layers.{i}.obj.{name}.{key} (tensors of each method's layer state),
                                             token_ids (tokens,) int64
    <contexts_dir>/<ctx_id>/meta.json        id, model fingerprint, method, budget, stats, the layer states'
                                             classes and JSON parts, sha256 of kv.safetensors

Method state is a ``LayerState`` (``kvsift.methods.base``): it persists through ``kv_state_dict() ->
(tensors, json_extra)`` and ``kv_from_state_dict(tensors, extra, device)`` (a classmethod); such
classes are only imported from the ``kvsift`` package. Format v2 (typed state); v1 directories are
refused with a clear error.

A context is written into ``.tmp-*`` beside its final place and renamed into place, so a crash never
leaves a half-written context under a valid id (leftover ``.tmp-*`` directories are removed at startup).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kvsift.cache import SiftCache
from kvsift.engine import Context, GenerationStats
from kvsift.methods.base import state_class, state_path
from kvsift.errors import (ContextCorruptedError, ContextEvictedError, ContextLimitError, ContextNotFoundError,
                           ContextTooLargeError, ContextUnavailableError, StorageQuotaError)

log = logging.getLogger("kvsift.server")

FORMAT, VERSION = "kvsift-context", 2  # v2: typed method state (LayerState) only
KV_FILE, META_FILE = "kv.safetensors", "meta.json"
ID_RE = re.compile(r"^ctx_[0-9a-f]{32}$")


def new_context_id() -> str:
    return "ctx_" + secrets.token_hex(16)


def model_fingerprint(llm) -> str:
    """Identifies the weights a context's KV was computed with: architecture, dtype and a sample of
    the parameters (a context is only valid for the very same model)."""
    h = hashlib.sha256()
    info = llm.info
    h.update(f"{info.num_layers}:{info.num_kv_heads}:{info.head_dim}:{info.dtype}".encode())
    h.update(llm.model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        params = list(llm.model.parameters())
        for p in (params[0], params[len(params) // 2], params[-1]):
            sample = p.detach().flatten()[:4096].float().cpu()
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def context_tensors(ctx: Context) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """All tensors of a context, on the CPU, for safetensors, and the per-layer method state's JSON
    part. Method state is a ``LayerState`` (``kvsift.methods.base``): ``kv_state_dict() ->
    (tensors, json_extra)``, rebuilt by its class's ``kv_from_state_dict(tensors, extra, device)``."""
    out: dict[str, torch.Tensor] = {}
    for k, t in ctx.cache.state_dict().items():
        out[k] = t.detach().cpu()
    layer_state: list[dict[str, Any]] = []
    for i, layer in enumerate(ctx.cache.layers):
        js: dict[str, Any] = {}
        for name, v in layer.state.items():
            if not (hasattr(v, "kv_state_dict") and hasattr(type(v), "kv_from_state_dict")):
                raise ValueError(f"cannot persist method state {name!r} of type {type(v).__name__} (layer {i}): "
                                 f"method state must be a LayerState")
            tensors, extra = v.kv_state_dict()
            for tk, t in tensors.items():
                out[f"layers.{i}.obj.{name}.{tk}"] = t.detach().cpu()
            cls = type(v)
            js[name] = {"object": state_path(cls), "extra": extra}
        layer_state.append(js)
    out["token_ids"] = torch.tensor(ctx.token_ids, dtype=torch.int64)
    # safetensors refuses views into larger storages: copy those
    out = {k: (t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t.contiguous())
           for k, t in out.items()}
    return out, layer_state


def save_context(ctx: Context, directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``ctx`` to ``directory`` (which must not exist) atomically; returns the metadata written."""
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors, layer_state = context_tensors(ctx)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name}-"))
    try:
        kv = tmp / KV_FILE
        save_file(tensors, str(kv))
        _fsync(kv)
        meta = dict(meta, format=FORMAT, version=VERSION, seen=ctx.cache.seen, tokens=len(ctx.token_ids),
                    num_layers=len(ctx.cache.layers), layer_state=layer_state,
                    checksum={"algorithm": "sha256", KV_FILE: sha256_file(kv)})
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def read_meta(directory: Path) -> dict[str, Any]:
    with open(Path(directory) / META_FILE, encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{Path(directory).name}: not a {FORMAT} v{VERSION} directory")
    return meta


def verify(directory: Path, meta: dict[str, Any]) -> None:
    """Raise :class:`ContextCorruptedError` if the KV file does not match the checksum in its metadata."""
    want = (meta.get("checksum") or {}).get(KV_FILE)
    try:
        got = sha256_file(Path(directory) / KV_FILE)
    except FileNotFoundError:
        raise ContextCorruptedError(f"context {Path(directory).name} is corrupted: its {KV_FILE} is missing",
                                    param="context_id") from None
    if want != got:
        raise ContextCorruptedError(f"context {Path(directory).name} is corrupted: the checksum of its KV file does "
                                    f"not match (stored {want}, file {got}); delete it and create it again",
                                    param="context_id")


def load_context(directory: Path, llm, fingerprint: str | None = None) -> tuple[Context, dict[str, Any]]:
    """Read a context written by ``save_context`` onto ``llm``'s device, after checking the model
    fingerprint (when given), the checksum and the tensors' layout.

    Raises :class:`ContextCorruptedError` for damaged files (missing, checksum mismatch, malformed
    safetensors or a layout that does not fit the model), :class:`ContextUnavailableError` for I/O
    errors, ``ValueError`` for a context of another model."""
    directory = Path(directory)
    cid = directory.name
    try:
        meta = read_meta(directory)
    except FileNotFoundError:
        raise ContextCorruptedError(f"context {cid} is corrupted: its {META_FILE} is missing",
                                    param="context_id") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ContextCorruptedError(f"context {cid} is corrupted: unreadable {META_FILE} ({e})",
                                    param="context_id") from None
    except OSError as e:
        raise ContextUnavailableError(f"context {cid} could not be read: {e.strerror or e}",
                                      param="context_id") from None
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{cid} was made with another model")
    try:
        verify(directory, meta)
        tensors = load_file(str(directory / KV_FILE), device="cpu")
    except ContextCorruptedError:
        raise
    except OSError as e:
        raise ContextUnavailableError(f"context {cid} could not be read: {e.strerror or e}",
                                      param="context_id") from None
    except Exception as e:  # noqa: BLE001 - safetensors' own error type for malformed files
        raise ContextCorruptedError(f"context {cid} is corrupted: its KV file is not valid safetensors "
                                    f"({type(e).__name__}: {e})", param="context_id") from None
    try:
        return _build_context(tensors, meta, llm), meta
    except Exception as e:  # noqa: BLE001 - any inconsistency of a file whose checksum matched
        raise ContextCorruptedError(f"context {cid} is corrupted: its files do not describe a valid context for "
                                    f"this model ({type(e).__name__}: {e})", param="context_id") from None


def _check_layout(tensors: dict[str, torch.Tensor], meta: dict[str, Any], llm) -> None:
    info = llm.info
    n_layers = meta["num_layers"]
    if not isinstance(n_layers, int) or n_layers != info.num_layers:
        raise ValueError(f"num_layers {n_layers!r}, the model has {info.num_layers}")
    tok = tensors.get("token_ids")
    if tok is None or tok.dim() != 1 or tok.dtype != torch.int64 or int(tok.numel()) != meta.get("tokens"):
        raise ValueError("token_ids missing or not matching the metadata")
    seen = meta.get("seen")
    if not isinstance(seen, int) or not 0 < seen < info.max_positions:
        raise ValueError(f"seen {seen!r} out of range")
    for i in range(n_layers):
        names = [f"layers.{i}.{k}" for k in ("keys", "values", "positions")]
        if not any(k in tensors for k in names):
            continue
        if not all(k in tensors for k in names):
            raise ValueError(f"layer {i}: keys, values and positions must come together")
        k, v, pos = (tensors[x] for x in names)
        if k.dim() != 4 or k.shape != v.shape or k.shape[0] != 1 or k.shape[1] != info.num_kv_heads or \
                k.shape[3] != info.head_dim or tuple(pos.shape) != tuple(k.shape[:3]):
            raise ValueError(f"layer {i}: unexpected shapes {tuple(k.shape)}, {tuple(v.shape)}, {tuple(pos.shape)}")
        if not (k.is_floating_point() and v.is_floating_point()) or pos.is_floating_point():
            raise ValueError(f"layer {i}: unexpected dtypes")


def _build_context(tensors: dict[str, torch.Tensor], meta: dict[str, Any], llm) -> Context:
    _check_layout(tensors, meta, llm)
    token_ids = tensors.pop("token_ids").tolist()
    kv = {k: v for k, v in tensors.items() if ".obj." not in k}
    cache = SiftCache.from_state_dict(kv, meta["num_layers"], meta["seen"], device=llm.device)
    for i, js in enumerate(meta.get("layer_state") or []):
        for name, entry in js.items():
            prefix = f"layers.{i}.obj.{name}."
            parts = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            cache.layers[i].state[name] = state_class(entry["object"]).kv_from_state_dict(
                parts, entry.get("extra"), llm.device)
    names = {f.name for f in dataclasses.fields(GenerationStats)}
    stats = GenerationStats(**{k: v for k, v in (meta.get("stats") or {}).items() if k in names})
    return Context(cache=cache, token_ids=token_ids, method=meta["kv_method"], budget=meta.get("kv_budget"),
                   stats=stats, method_kwargs=dict(meta.get("kv_options") or {}))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # not supported on every platform / filesystem
        pass


def kv_nbytes(ctx: Context) -> tuple[int, int]:
    mem = ctx.cache.memory()
    return mem["device"], mem["host"]


def dir_bytes(directory: Path) -> int:
    """Bytes of the files in a context directory (stat only, no reads)."""
    total = 0
    try:
        for f in Path(directory).iterdir():
            try:
                total += f.stat().st_size
            except OSError:
                pass
    except OSError:
        pass
    return total


@dataclass
class ContextRecord:
    id: str
    meta: dict[str, Any]
    ctx: Context | None = None
    persisted: bool = False
    device_bytes: int = 0
    host_bytes: int = 0
    disk_bytes: int = 0
    last_used: float = field(default_factory=time.time)
    corrupted: str | None = None       # why its files cannot be loaded (they stay until deleted)
    verified: bool = False             # the KV file's checksum was checked since startup

    @property
    def loaded(self) -> bool:
        return self.ctx is not None

    @property
    def owner(self) -> str | None:
        return self.meta.get("owner")

    @property
    def state(self) -> str:
        if self.corrupted:
            return "corrupted"
        return "in_memory" if self.loaded else "on_disk"

    def public(self) -> dict[str, Any]:
        m = self.meta
        out = {"id": self.id, "object": "context", "created": m.get("created"), "model": m.get("model"),
               "owner": m.get("owner"), "tokens": m.get("tokens"), "kv_method": m.get("kv_method"),
               "kv_budget": m.get("kv_budget"), "chat": m.get("chat"), "kv_bytes": m.get("kv_bytes"),
               "prefill_s": (m.get("stats") or {}).get("prefill_s"),
               "persisted": self.persisted, "loaded": self.loaded, "state": self.state,
               "metadata": m.get("metadata") or {}}
        if m.get("persist_error"):
            out["persist_error"] = m["persist_error"]
        if self.corrupted:
            out["error"] = {"code": ContextCorruptedError.code, "message": self.corrupted}
        return out


@dataclass
class _Gone:
    owner: str | None
    when: float
    reason: str


@dataclass
class Reservation:
    """Room held for a context being prefilled (count, memory and disk are checked before the work)."""

    owner: str | None
    disk_bytes: int
    released: bool = False


class ContextStore:
    """Contexts by id. In memory: an LRU bounded by ``memory_limit`` KV bytes (device + host);
    persisted contexts leave memory when evicted and come back from disk on their next use, the
    others are dropped, *visibly*: their id answers 410 ``context_evicted`` afterwards and they are
    counted (``kvsift_contexts_evicted_total{persisted="false"}``). Thread-safe (handlers call it
    from worker threads).

    Startup (:meth:`scan`) reads only the metadata: a context's checksum is verified when its KV is
    first loaded, so a large store does not delay serving. Damaged files are reported by the
    context's id (``context_corrupted``), not hidden.

    ``shared``: the directory is shared with other servers (engine replicas, ``kvsift serve
    --replicas``): an id this store does not know is looked up on disk (another replica made it),
    a persisted context whose directory is gone was deleted elsewhere (404), listing and
    idempotency lookups re-read the directory, and startup leaves recent ``.tmp-*`` directories
    alone (another replica may be writing them; older than ``TMP_GRACE_S`` they are leftovers)."""

    TMP_GRACE_S = 3600.0

    def __init__(self, llm, fingerprint: str, directory: Path | None, memory_limit: int, max_contexts: int,
                 metrics=None, disk_limit: int | None = None, keep_ids: int = 10000, shared: bool = False):
        self.llm, self.fingerprint, self.directory = llm, fingerprint, directory
        self.shared = shared and directory is not None
        self.memory_limit, self.max_contexts, self.metrics = memory_limit, max_contexts, metrics
        self.disk_limit, self.keep_ids = disk_limit, keep_ids
        self.records: OrderedDict[str, ContextRecord] = OrderedDict()  # LRU order: oldest first
        self.lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = {}
        self.skipped: dict[str, str] = {}
        self.gone: OrderedDict[str, _Gone] = OrderedDict()   # evicted (not persisted) ids, bounded
        self.reservations: list[Reservation] = []
        self.idempotency: dict[tuple[str | None, str], str] = {}  # (owner, Idempotency-Key) -> context id
        self.evicted = {"true": 0, "false": 0}

    # ---- startup -----------------------------------------------------------------------------
    def scan(self) -> int:
        """Register the persisted contexts of this model from their metadata (KV and checksum load
        lazily, on first use). A directory whose metadata cannot be read is registered as corrupted
        (visible to admins, deletable), so that its id does not answer "not found"."""
        if self.directory is None:
            return 0
        self.directory.mkdir(parents=True, exist_ok=True)
        found = []
        for d in self.directory.iterdir():
            if d.name.startswith(".tmp-"):
                if self.shared and _age_s(d) < self.TMP_GRACE_S:
                    continue  # another replica may be writing it
                shutil.rmtree(d, ignore_errors=True)  # an interrupted write or delete
                continue
            if not (d.is_dir() and ID_RE.match(d.name)):
                continue
            rec = self._read_record(d)
            if rec is not None:
                found.append(rec)
        with self.lock:
            for r in sorted(found, key=lambda r: r.last_used):
                self._register(r)
            self._update_metrics()
        return len(found)

    def _register(self, rec: ContextRecord) -> None:
        """Add ``rec`` (most recently used) and its idempotency key; the caller holds the lock."""
        self.records[rec.id] = rec
        key = rec.meta.get("idempotency_key")
        if isinstance(key, str):
            self.idempotency[(rec.owner, key)] = rec.id

    def _read_record(self, d: Path) -> ContextRecord | None:
        """The record of a context directory from its metadata (None: another model's)."""
        try:
            meta = read_meta(d)
            if meta.get("fingerprint") != self.fingerprint:
                self.skipped[d.name] = "made with another model"
                return None
            rec = ContextRecord(d.name, meta, persisted=True, last_used=float(meta.get("created", 0)),
                                disk_bytes=dir_bytes(d))
            if not (d / KV_FILE).is_file():
                rec.corrupted = f"context {d.name} is corrupted: its {KV_FILE} is missing"
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = f"context {d.name} is corrupted: unreadable {META_FILE} ({e})"
            log.warning("%s", why)
            rec = ContextRecord(d.name, {"id": d.name}, persisted=True, last_used=0.0, disk_bytes=dir_bytes(d),
                                corrupted=why)
        return rec

    # ---- shared directory (engine replicas) ------------------------------------------------------
    def _discover(self, cid: str) -> ContextRecord | None:
        """Shared mode: register ``cid`` if another replica persisted it (its metadata only)."""
        d = self.directory / cid
        if not (d / META_FILE).is_file():
            return None
        rec = self._read_record(d)
        if rec is None:
            return None
        with self.lock:
            if cid in self.records:
                return self.records[cid]
            self._register(rec)
            self.records.move_to_end(cid, last=False)  # not used here yet: first to leave memory
            self._update_metrics()
        return rec

    def _forget(self, rec: ContextRecord) -> None:
        """Shared mode: drop a persisted record whose directory another replica deleted."""
        with self.lock:
            if self.records.get(rec.id) is rec:
                del self.records[rec.id]
                key = rec.meta.get("idempotency_key")
                if isinstance(key, str):
                    self.idempotency.pop((rec.owner, key), None)
                self._update_metrics()

    def _gone_from_disk(self, rec: ContextRecord) -> bool:
        return self.shared and rec.persisted and not (self.directory / rec.id).is_dir()

    def sync(self) -> None:
        """Shared mode: register the contexts other replicas persisted since, forget the ones they
        deleted (metadata only; KV loads on first use)."""
        if not self.shared:
            return
        try:
            names = {d.name for d in self.directory.iterdir() if ID_RE.match(d.name)}
        except OSError:
            return
        with self.lock:
            known = set(self.records)
            gone = [r for r in self.records.values() if r.persisted and r.id not in names]
        for r in gone:
            self._forget(r)
        for cid in sorted(names - known):
            self._discover(cid)

    # ---- limits, checked before a prefill ------------------------------------------------------
    def disk_used(self) -> int:
        with self.lock:
            return sum(r.disk_bytes for r in self.records.values()) + \
                sum(x.disk_bytes for x in self.reservations)

    def reserve(self, owner: str | None, kv_bytes: int, disk_bytes: int, persist: bool) -> Reservation:
        """Hold room for a context of about ``kv_bytes`` in memory and ``disk_bytes`` on disk (lower
        estimates from the token count) or raise before any compute: :class:`ContextTooLargeError`,
        :class:`ContextLimitError`, :class:`StorageQuotaError`."""
        if kv_bytes > self.memory_limit:
            raise ContextTooLargeError(
                f"the context's KV needs about {kv_bytes} bytes, more than the server's context memory limit of "
                f"{self.memory_limit} bytes: use a smaller kv_budget or a shorter document", param="kv_budget")
        persist = persist and self.directory is not None
        with self.lock:
            if len(self.records) + len(self.reservations) >= self.max_contexts:
                raise ContextLimitError(f"the server holds its maximum of {self.max_contexts} contexts "
                                        f"(some may still be in the making): delete some first")
            if persist:
                self._check_disk(disk_bytes)
            r = Reservation(owner, disk_bytes if persist else 0)
            self.reservations.append(r)
            return r

    def _check_disk(self, nbytes: int, reserved: Reservation | None = None) -> None:
        others = self.disk_used() - (reserved.disk_bytes if reserved is not None else 0)
        if self.disk_limit is not None and others + nbytes > self.disk_limit:
            raise StorageQuotaError(f"persisting this context (about {nbytes} bytes) would pass the contexts' disk "
                                    f"quota of {self.disk_limit} bytes ({others} used): delete contexts, or send "
                                    f"persist=false")
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return
        if nbytes > free:
            raise StorageQuotaError(f"persisting this context (about {nbytes} bytes) needs more than the {free} bytes "
                                    f"free on the contexts' disk: send persist=false, or free space")

    def release(self, r: Reservation | None) -> None:
        if r is None:
            return
        with self.lock:
            if not r.released:
                r.released = True
                self.reservations.remove(r)

    # ---- operations --------------------------------------------------------------------------
    def add(self, ctx: Context, meta: dict[str, Any], persist: bool, reservation: Reservation | None = None
            ) -> ContextRecord:
        """Keep a prefilled context (and write it when ``persist``). A write that fails for lack of
        space (or any OS error) or passes the quota keeps the context in memory, unpersisted, with
        ``persist_error`` saying why: the prefill's work is not lost."""
        try:
            dev, host = kv_nbytes(ctx)
            if dev + host > self.memory_limit:
                raise ContextTooLargeError(
                    f"the context's KV needs {dev + host} bytes, more than the server's context memory limit of "
                    f"{self.memory_limit} bytes: use a smaller kv_budget or a shorter document", param="kv_budget")
            with self.lock:
                held = 1 if reservation is not None and not reservation.released else 0
                if len(self.records) + len(self.reservations) - held >= self.max_contexts:
                    raise ContextLimitError(f"the server holds its maximum of {self.max_contexts} contexts: "
                                            f"delete some first")
            cid = new_context_id()
            meta = dict(meta, id=cid, fingerprint=self.fingerprint, kv_bytes={"device": dev, "host": host})
            persisted, disk = False, 0
            if persist and self.directory is not None:
                try:
                    with self.lock:
                        self._check_disk(_tensor_bytes(ctx), reservation)
                    meta = save_context(ctx, self.directory / cid, meta)
                    persisted, disk = True, dir_bytes(self.directory / cid)
                except StorageQuotaError as e:
                    meta["persist_error"] = e.message
                except ValueError as e:  # method state that cannot be serialized
                    meta["persist_error"] = str(e)
                except OSError as e:  # disk full, quota of the filesystem, I/O error: keep it in memory
                    meta["persist_error"] = f"could not be saved: {e.strerror or e} (kept in memory only)"
                    if self.metrics is not None:
                        self.metrics.persist_errors.inc()
                if not persisted:
                    log.warning("context %s kept in memory only: %s", cid, meta["persist_error"])
            if not persisted:
                meta = dict(meta, seen=ctx.cache.seen, tokens=len(ctx.token_ids))
            rec = ContextRecord(cid, meta, ctx=ctx, persisted=persisted, device_bytes=dev, host_bytes=host,
                                disk_bytes=disk, verified=persisted)
            with self.lock:
                self.release(reservation)
                self._register(rec)
                self._evict(keep=cid)
                self._update_metrics()
            return rec
        finally:
            self.release(reservation)

    def get(self, cid: str, principal=None) -> ContextRecord:
        """The record of ``cid`` if ``principal`` (None: anyone) may see it, else
        :class:`ContextNotFoundError` (or :class:`ContextEvictedError` for an evicted one)."""
        valid = isinstance(cid, str) and ID_RE.match(cid)
        if valid and self.shared:  # another replica may have made or deleted it
            rec = self.records.get(cid)
            if rec is None:
                self._discover(cid)
            elif self._gone_from_disk(rec):
                self._forget(rec)
        with self.lock:
            rec = self.records.get(cid) if valid else None
            if rec is not None and (principal is None or principal.may_see(rec.owner)):
                return rec
            gone = self.gone.get(cid) if valid else None
            if rec is None and gone is not None and (principal is None or principal.may_see(gone.owner)):
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(gone.when))
                raise ContextEvictedError(
                    f"context {cid} was evicted from memory at {when} ({gone.reason}); it was not persisted, "
                    f"so create it again (persist=true keeps contexts on disk when memory is short)",
                    param="context_id")
            raise ContextNotFoundError(f"no context with id {cid!r}", param="context_id")

    def acquire(self, cid: str, principal=None) -> tuple[Context, ContextRecord]:
        """The context's KV, loaded from disk if needed; marks it most recently used. The disk read
        happens outside the store's lock (one read at a time per context). A context whose files
        turn out damaged is marked corrupted and raises :class:`ContextCorruptedError`."""
        with self.lock:
            rec = self.get(cid, principal)
            if rec.corrupted:
                raise ContextCorruptedError(rec.corrupted, param="context_id")
            load_lock = self._load_locks.setdefault(cid, threading.Lock())
        with load_lock:
            ctx = rec.ctx
            if ctx is None:
                try:
                    ctx, _ = load_context(self.directory / cid, self.llm, self.fingerprint)
                except ContextCorruptedError as e:
                    with self.lock:
                        if not rec.corrupted:
                            log.error("%s", e.message)
                        rec.corrupted = e.message
                        self._update_metrics()
                    raise
                except ValueError as e:  # made with another model (its metadata changed since the scan)
                    raise ContextCorruptedError(f"context {cid} cannot be used: {e}", param="context_id") from None
                rec.verified = True
        with self.lock:
            self._load_locks.pop(cid, None)
            if self.records.get(cid) is not rec:  # deleted meanwhile
                raise ContextNotFoundError(f"no context with id {cid!r}", param="context_id")
            if rec.ctx is None:
                rec.ctx = ctx
                rec.device_bytes, rec.host_bytes = kv_nbytes(ctx)
            rec.last_used = time.time()
            self.records.move_to_end(cid)
            self._evict(keep=cid)
            self._update_metrics()
            return ctx, rec

    def delete(self, cid: str, principal=None) -> None:
        trash = None
        with self.lock:
            rec = self.get(cid, principal)
            del self.records[cid]
            key = rec.meta.get("idempotency_key")
            if isinstance(key, str):
                self.idempotency.pop((rec.owner, key), None)
            if rec.persisted and self.directory is not None:
                # rename first (atomic): a crash mid-delete leaves a .tmp- directory that startup removes
                trash = self.directory / f".tmp-del-{cid}"
                try:
                    os.rename(self.directory / cid, trash)
                except FileNotFoundError:
                    trash = None
            self._update_metrics()
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def find_idempotent(self, owner: str | None, key: str) -> ContextRecord | None:
        if self.shared and (owner, key) not in self.idempotency:
            self.sync()
        with self.lock:
            cid = self.idempotency.get((owner, key))
            return self.records.get(cid) if cid is not None else None

    def list(self, principal=None) -> list[ContextRecord]:
        self.sync()
        with self.lock:
            return [r for r in reversed(self.records.values()) if principal is None or principal.may_see(r.owner)]

    def memory(self) -> tuple[int, int]:
        with self.lock:
            loaded = [r for r in self.records.values() if r.ctx is not None]
            return sum(r.device_bytes for r in loaded), sum(r.host_bytes for r in loaded)

    # ---- internals -----------------------------------------------------------------------------
    def _evict(self, keep: str) -> None:
        while True:
            dev, host = self.memory()
            if dev + host <= self.memory_limit:
                return
            victim = next((r for r in self.records.values() if r.ctx is not None and r.id != keep), None)
            if victim is None:
                return
            if victim.persisted:
                victim.ctx = None  # stays on disk
                victim.device_bytes = victim.host_bytes = 0
                self.evicted["true"] += 1
                if self.metrics is not None:
                    self.metrics.contexts_evicted.labels(persisted="true").inc()
            else:
                del self.records[victim.id]
                key = victim.meta.get("idempotency_key")
                if isinstance(key, str):
                    self.idempotency.pop((victim.owner, key), None)
                self.gone[victim.id] = _Gone(victim.owner, time.time(),
                                             f"the context memory limit of {self.memory_limit} bytes was reached")
                while len(self.gone) > self.keep_ids:
                    self.gone.popitem(last=False)
                self.evicted["false"] += 1
                if self.metrics is not None:
                    self.metrics.contexts_evicted.labels(persisted="false").inc()
                log.warning("context %s (owner %s, not persisted) evicted from memory: it is gone",
                            victim.id, victim.owner)

    def _update_metrics(self) -> None:
        if self.metrics is None:
            return
        dev, host = self.memory()
        self.metrics.kv_bytes.labels(location="device", pool="contexts").set(dev)
        self.metrics.kv_bytes.labels(location="host", pool="contexts").set(host)
        n_loaded = sum(1 for r in self.records.values() if r.ctx is not None)
        n_bad = sum(1 for r in self.records.values() if r.corrupted)
        self.metrics.contexts.labels(state="in_memory").set(n_loaded)
        self.metrics.contexts.labels(state="on_disk_only").set(len(self.records) - n_loaded - n_bad)
        self.metrics.contexts.labels(state="corrupted").set(n_bad)
        self.metrics.contexts_disk_bytes.set(sum(r.disk_bytes for r in self.records.values()))


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _tensor_bytes(ctx: Context) -> int:
    """About the bytes of the context's safetensors file: the used KV slots, the host stores and
    the token ids (no copy is made)."""
    mem = ctx.cache.memory()
    return mem["device_used"] + mem["host"] + 8 * len(ctx.token_ids)
