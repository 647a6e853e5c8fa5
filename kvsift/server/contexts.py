"""Reusable contexts: serialization (safetensors + JSON metadata with a checksum, written atomically)
and the server's store (LRU over the KV bytes kept in memory, persisted contexts reload on demand).

On disk, one directory per context::

    <contexts_dir>/<ctx_id>/kv.safetensors   layers.{i}.keys|values (1, kv_heads, n_i, head_dim),
                                             layers.{i}.positions (1, kv_heads, n_i) int32,
                                             layers.{i}.state.{name} (tensor method state),
                                             layers.{i}.obj.{name}.{key} (tensors of method-state objects),
                                             token_ids (tokens,) int64
    <contexts_dir>/<ctx_id>/meta.json        id, model fingerprint, method, budget, stats, scalar method state,
                                             sha256 of kv.safetensors

Method state that is an object (e.g. a host chunk store) persists when its class offers
``kv_state_dict() -> (tensors, json_extra)`` and ``kv_from_state_dict(tensors, extra, device)``
(a classmethod); such classes are only imported from the ``kvsift`` package.

A context is written into ``.tmp-*`` beside its final place and renamed into place, so a crash never
leaves a half-written context under a valid id (leftover ``.tmp-*`` directories are removed at startup).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
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

log = logging.getLogger("kvsift.server")

FORMAT, VERSION = "kvsift-context", 1
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


_STATE_MODULES = ("kvsift.",)  # method-state classes are only ever imported from these packages
_SCALARS = (bool, int, float, str, type(None))


def context_tensors(ctx: Context) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """All tensors of a context, on the CPU, for safetensors, and the per-layer method state that
    is not a tensor (JSON). Method state may be a tensor, a JSON scalar, or an object with
    ``kv_state_dict() -> (tensors, json_extra)`` whose class has
    ``kv_from_state_dict(tensors, extra, device)``; anything else raises ``ValueError``."""
    out: dict[str, torch.Tensor] = {}
    for k, t in ctx.cache.state_dict().items():
        out[k] = t.detach().cpu()
    layer_state: list[dict[str, Any]] = []
    for i, layer in enumerate(ctx.cache.layers):
        js: dict[str, Any] = {}
        for name, v in layer.state.items():
            if isinstance(v, torch.Tensor):
                out[f"layers.{i}.state.{name}"] = v.detach().cpu()
            elif isinstance(v, _SCALARS):
                js[name] = {"scalar": v}
            elif hasattr(v, "kv_state_dict") and hasattr(type(v), "kv_from_state_dict"):
                tensors, extra = v.kv_state_dict()
                for tk, t in tensors.items():
                    out[f"layers.{i}.obj.{name}.{tk}"] = t.detach().cpu()
                cls = type(v)
                js[name] = {"object": f"{cls.__module__}:{cls.__qualname__}", "extra": extra}
            else:
                raise ValueError(f"cannot persist method state {name!r} of type {type(v).__name__} (layer {i}): "
                                 f"it needs kv_state_dict() / kv_from_state_dict()")
        layer_state.append(js)
    out["token_ids"] = torch.tensor(ctx.token_ids, dtype=torch.int64)
    # safetensors refuses views into larger storages: copy those
    out = {k: (t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t.contiguous())
           for k, t in out.items()}
    return out, layer_state


def _state_class(path: str):
    module, _, qualname = path.partition(":")
    if not module.startswith(_STATE_MODULES):
        raise ValueError(f"refusing to load method state class {path!r} (outside {_STATE_MODULES})")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


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
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{directory}: not a {FORMAT} v{VERSION} directory")
    return meta


def verify(directory: Path, meta: dict[str, Any]) -> None:
    """Raise ``ValueError`` if the KV file does not match the checksum in its metadata."""
    want = (meta.get("checksum") or {}).get(KV_FILE)
    got = sha256_file(Path(directory) / KV_FILE)
    if want != got:
        raise ValueError(f"{directory.name}: checksum mismatch (stored {want}, file {got}): the context is corrupted")


def load_context(directory: Path, llm, fingerprint: str | None = None) -> tuple[Context, dict[str, Any]]:
    """Read a context written by ``save_context`` onto ``llm``'s device, after checking the model
    fingerprint (when given) and the checksum."""
    directory = Path(directory)
    meta = read_meta(directory)
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{directory.name} was made with another model")
    verify(directory, meta)
    tensors = load_file(str(directory / KV_FILE), device="cpu")
    token_ids = tensors.pop("token_ids").tolist()
    kv = {k: v for k, v in tensors.items() if ".state." not in k and ".obj." not in k}
    cache = SiftCache.from_state_dict(kv, meta["num_layers"], meta["seen"], device=llm.device)
    for k, v in tensors.items():
        if ".state." in k:
            _, i, _, name = k.split(".", 3)
            cache.layers[int(i)].state[name] = v.to(llm.device)
    for i, js in enumerate(meta.get("layer_state") or []):
        for name, entry in js.items():
            if "scalar" in entry:
                cache.layers[i].state[name] = entry["scalar"]
            else:
                prefix = f"layers.{i}.obj.{name}."
                parts = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                cache.layers[i].state[name] = _state_class(entry["object"]).kv_from_state_dict(
                    parts, entry.get("extra"), llm.device)
    names = {f.name for f in dataclasses.fields(GenerationStats)}
    stats = GenerationStats(**{k: v for k, v in (meta.get("stats") or {}).items() if k in names})
    ctx = Context(cache=cache, token_ids=token_ids, method=meta["kv_method"], budget=meta.get("kv_budget"),
                  stats=stats, method_kwargs=dict(meta.get("kv_options") or {}))
    return ctx, meta


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


@dataclass
class ContextRecord:
    id: str
    meta: dict[str, Any]
    ctx: Context | None = None
    persisted: bool = False
    device_bytes: int = 0
    host_bytes: int = 0
    last_used: float = field(default_factory=time.time)

    @property
    def loaded(self) -> bool:
        return self.ctx is not None

    def public(self) -> dict[str, Any]:
        m = self.meta
        return {"id": self.id, "object": "context", "created": m.get("created"), "model": m.get("model"),
                "tokens": m.get("tokens"), "kv_method": m.get("kv_method"), "kv_budget": m.get("kv_budget"),
                "chat": m.get("chat"), "kv_bytes": m.get("kv_bytes"),
                "prefill_s": (m.get("stats") or {}).get("prefill_s"),
                "persisted": self.persisted, "loaded": self.loaded, "metadata": m.get("metadata") or {},
                **({"persist_error": m["persist_error"]} if m.get("persist_error") else {})}


class ContextStore:
    """Contexts by id. In memory: an LRU bounded by ``memory_limit`` KV bytes (device + host);
    persisted contexts leave memory when evicted and come back from disk on their next use, the
    others are dropped. Thread-safe (handlers call it from worker threads)."""

    def __init__(self, llm, fingerprint: str, directory: Path | None, memory_limit: int, max_contexts: int,
                 metrics=None):
        self.llm, self.fingerprint, self.directory = llm, fingerprint, directory
        self.memory_limit, self.max_contexts, self.metrics = memory_limit, max_contexts, metrics
        self.records: OrderedDict[str, ContextRecord] = OrderedDict()  # LRU order: oldest first
        self.lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = {}
        self.skipped: dict[str, str] = {}

    # ---- startup -----------------------------------------------------------------------------
    def scan(self) -> int:
        """Register the persisted contexts of this model (metadata and checksum only; KV loads lazily)."""
        if self.directory is None:
            return 0
        self.directory.mkdir(parents=True, exist_ok=True)
        found = []
        for d in self.directory.iterdir():
            if d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)  # an interrupted write
                continue
            if not (d.is_dir() and ID_RE.match(d.name)):
                continue
            try:
                meta = read_meta(d)
                if meta.get("fingerprint") != self.fingerprint:
                    self.skipped[d.name] = "made with another model"
                    continue
                verify(d, meta)
            except (OSError, ValueError, KeyError) as e:
                self.skipped[d.name] = str(e)
                log.warning("skipping context %s: %s", d.name, e)
                continue
            found.append(ContextRecord(d.name, meta, persisted=True, last_used=float(meta.get("created", 0))))
        with self.lock:
            for r in sorted(found, key=lambda r: r.last_used):
                self.records[r.id] = r
            self._update_metrics()
        return len(found)

    # ---- operations --------------------------------------------------------------------------
    def add(self, ctx: Context, meta: dict[str, Any], persist: bool) -> ContextRecord:
        dev, host = kv_nbytes(ctx)
        if dev + host > self.memory_limit:
            raise ValueError(f"the context's KV needs {dev + host} bytes, more than the server's context memory "
                             f"limit of {self.memory_limit} bytes: use a smaller kv_budget or a shorter document")
        with self.lock:
            if len(self.records) >= self.max_contexts:
                raise OverflowError(f"the server holds its maximum of {self.max_contexts} contexts: delete some first")
        cid = new_context_id()
        meta = dict(meta, id=cid, fingerprint=self.fingerprint, kv_bytes={"device": dev, "host": host})
        persisted = False
        if persist and self.directory is not None:
            try:
                meta = save_context(ctx, self.directory / cid, meta)
                persisted = True
            except ValueError as e:  # method state that cannot be serialized: keep it in memory only
                log.warning("context %s kept in memory only: %s", cid, e)
                meta["persist_error"] = str(e)
        if not persisted:
            meta = dict(meta, seen=ctx.cache.seen, tokens=len(ctx.token_ids))
        rec = ContextRecord(cid, meta, ctx=ctx, persisted=persisted, device_bytes=dev, host_bytes=host)
        with self.lock:
            self.records[cid] = rec
            self._evict(keep=cid)
            self._update_metrics()
        return rec

    def get(self, cid: str) -> ContextRecord:
        with self.lock:
            rec = self.records.get(cid) if ID_RE.match(cid or "") else None
            if rec is None:
                raise KeyError(cid)
            return rec

    def acquire(self, cid: str) -> tuple[Context, ContextRecord]:
        """The context's KV, loaded from disk if needed; marks it most recently used. The disk read
        happens outside the store's lock (one read at a time per context)."""
        with self.lock:
            rec = self.get(cid)
            load_lock = self._load_locks.setdefault(cid, threading.Lock())
        with load_lock:
            ctx = rec.ctx
            if ctx is None:
                ctx, _ = load_context(self.directory / cid, self.llm, self.fingerprint)
        with self.lock:
            self._load_locks.pop(cid, None)
            if self.records.get(cid) is not rec:  # deleted meanwhile
                raise KeyError(cid)
            if rec.ctx is None:
                rec.ctx = ctx
                rec.device_bytes, rec.host_bytes = kv_nbytes(ctx)
            rec.last_used = time.time()
            self.records.move_to_end(cid)
            self._evict(keep=cid)
            self._update_metrics()
            return ctx, rec

    def delete(self, cid: str) -> None:
        trash = None
        with self.lock:
            rec = self.get(cid)
            del self.records[cid]
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

    def list(self) -> list[ContextRecord]:
        with self.lock:
            return list(reversed(self.records.values()))

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
            else:
                del self.records[victim.id]
                log.info("context %s evicted (not persisted)", victim.id)

    def _update_metrics(self) -> None:
        if self.metrics is None:
            return
        dev, host = self.memory()
        self.metrics.kv_bytes.labels(location="device", pool="contexts").set(dev)
        self.metrics.kv_bytes.labels(location="host", pool="contexts").set(host)
        n_loaded = sum(1 for r in self.records.values() if r.ctx is not None)
        self.metrics.contexts.labels(state="in_memory").set(n_loaded)
        self.metrics.contexts.labels(state="on_disk_only").set(len(self.records) - n_loaded)
