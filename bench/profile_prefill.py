"""Where a prefill's time goes: the wall time of one prompt's prefill and a table of the engine's
named ranges (``kvsift.prefill.plan`` / ``attend`` / ``after_attend``: a method's selection of
offloaded KV, the chunk's attention, the method's work after it, e.g. sentencekv's offload) and of
the top CUDA kernels, from ``torch.profiler``, on a random-weight Llama-shaped model (the 8B shape
on CUDA, ``--layers`` of its 32; a narrow model with its KV heads on the CPU). For the questions
issue #14 leaves open: why ``sentencekv`` prefills slower than ``full``, and what each prefill chunk
costs under ``prefill_offload``. Prints the tables and writes them (and JSON) under ``--out``.

    PYTHONPATH=. python3 bench/profile_prefill.py --ctx 131072 --methods full,sentencekv:2048 \\
        --out bench/out/profile_prefill
    PYTHONPATH=. python3 bench/profile_prefill.py --ctx 262144 --chunk 4096 \\
        --methods sentencekv+kivi:2048:prefill_offload=true:prefill_budget=4096
    PYTHONPATH=. python3 bench/profile_prefill.py --ctx 131072 --chunk 4096 --no-profile --repeat 2 --alloc

Without the profiler (``--no-profile``, fast) it prints, per method and run, the prefill's wall
time and the share of it spent in the methods' ``prefill_end`` hooks with ``--time-hooks`` (sentencekv's final
offload; timed with device syncs around every call, which also wait for its host writes and so
serialise what otherwise overlaps the next layer: the prefill time then includes them), and the
host pool's counts (blocks of page-locked memory locked anew or reused). ``--repeat 2`` runs each prompt twice: the first run locks its
host store, the second reuses it from the pool (what a server's next request sees). ``--alloc``
first times locking host memory itself: one layer's key block at ``--ctx``, as torch's pinned
allocator, as a fresh registered block, and as a block reused from the pool. ``--reserve``
turns on sentencekv's locking of its host store beside the prefill (``KVSIFT_HOST_RESERVE=1``), for
an A/B run. ``--profile-last-chunk`` profiles the prompt's last prefill chunk alone (every layer
of it and the final offload hooks; small enough to profile at 128k, where the whole prefill's
trace outlasted a device call) and reports that window's wall time per method, with its timeline as a gzipped Chrome trace
(``trace_<method>_run<N>.json.gz`` under ``--out``: Perfetto shows the device's idle gaps). Tables and JSON
are written after each method, so a cut call keeps what finished.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # bench._random_llama, kvsift

RANGES = ("kvsift.prefill.plan", "kvsift.prefill.attend", "kvsift.prefill.after_attend")


class _EndTimer:
    """Times the ``prefill_end`` hooks of every registered method class (the outermost call only,
    with device syncs around it) while active; restores them on exit."""

    def __init__(self, sync):
        self.sync, self.seconds, self.calls, self._depth, self._saved = sync, 0.0, 0, 0, []

    def __enter__(self):
        from kvsift.methods.base import _REGISTRY, Compose, available_methods

        available_methods()
        classes = {c for c in list(_REGISTRY.values()) + [Compose] if "prefill_end" in c.__dict__}
        for cls in classes:
            orig = cls.__dict__["prefill_end"]
            self._saved.append((cls, orig))
            setattr(cls, "prefill_end", self._wrap(orig))
        return self

    def _wrap(self, orig):
        timer = self

        def prefill_end(*a, **k):
            if timer._depth:
                return orig(*a, **k)
            timer.sync()
            t0 = time.perf_counter()
            timer._depth += 1
            try:
                return orig(*a, **k)
            finally:
                timer._depth -= 1
                timer.sync()
                timer.seconds += time.perf_counter() - t0
                timer.calls += 1
        return prefill_end

    def __exit__(self, *exc):
        for cls, orig in self._saved:
            setattr(cls, "prefill_end", orig)
        return False


@contextlib.contextmanager
def _general_offload(on: bool):
    """``on``: sentencekv's dense final offload declines, so every layer takes the general path."""
    if not on:
        yield
        return
    from kvsift.methods.sentencekv import SentenceKV

    dense = SentenceKV.__dict__["_offload_dense"]
    SentenceKV._offload_dense = lambda self, *a: False
    try:
        yield
    finally:
        SentenceKV._offload_dense = dense


def _file_name(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in spec)


def _export_trace(prof, path: Path) -> dict | None:
    """``prof``'s Chrome trace (chrome://tracing, Perfetto), gzipped; returns :func:`_device_busy`
    of it."""
    import gzip
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        data = raw.read_bytes()
        with gzip.open(path, "wb") as dst:
            dst.write(data)
    return _device_busy(json.loads(data))


def _device_busy(trace: dict) -> dict | None:
    """Per device stream of a Chrome trace: the time its kernels, copies and memsets cover (their
    union, ms), the time it sat idle between its first and last event and its longest gaps; the
    compute stream is the one with the most events.
    None without device events (a CPU run)."""
    spans: dict = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            spans.setdefault(f"{e.get('pid')}/{e.get('tid')}", []).append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    if not spans:
        return None
    out = {}
    for stream, iv in spans.items():
        iv.sort()
        busy, gaps, (s0, e0) = 0.0, [], iv[0]
        for s, e in iv[1:]:
            if s > e0:
                busy += e0 - s0
                gaps.append(s - e0)
                s0, e0 = s, e
            else:
                e0 = max(e0, e)
        busy += e0 - s0
        out[stream] = {"busy_ms": busy / 1e3, "span_ms": (iv[-1][1] - iv[0][0]) / 1e3,
                       "idle_ms": sum(gaps) / 1e3, "events": len(iv),
                       "longest_gaps_ms": [g / 1e3 for g in sorted(gaps, reverse=True)[:5]]}
    main = max(out, key=lambda k: out[k]["events"])   # the compute stream launches the most
    return {"compute_stream": main, "streams": out}


class _LastChunkProfile:
    """Runs ``torch.profiler`` from the start of the prompt's last prefill chunk (a forward
    pre-hook on the first decoder layer, counting the chunks' calls) to the end of the block, and
    times that window (``seconds``, device synced at both ends)."""

    def __init__(self, model, chunks: int, activities, sync):
        from torch.profiler import profile

        self.layer0 = model.model.layers[0]
        self.chunks, self.sync, self.calls, self.seconds = chunks, sync, 0, None
        self.prof, self._t0, self._handle = profile(activities=activities), None, None
        self._profile = profile

    def _pre(self, module, args, kwargs=None):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None or hidden.shape[1] <= 1:   # decode steps are not prefill chunks
            return
        self.calls += 1
        if self.calls == self.chunks and self._t0 is None:
            self.sync()
            self.prof.start()
            self._t0 = time.perf_counter()

    def __enter__(self):
        self._handle = self.layer0.register_forward_pre_hook(self._pre, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        if self._t0 is not None:
            self.sync()
            self.seconds = time.perf_counter() - self._t0
            self.prof.stop()
        else:
            self.prof = None
        return False


def _alloc_bench(nbytes: int, dev) -> dict:
    """Seconds to get ``nbytes`` of page-locked host memory (and touch it once with a device copy):
    torch's caching pinned allocator (rounded up to a power of two), a newly registered block (the
    pool's miss) and a block the pool reuses (its hit)."""
    from kvsift.cache.host import HostPool

    out = {"bytes": nbytes}
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)

    def timed(make):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        t = make()
        t.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return t, time.perf_counter() - t0

    t, out["torch_pinned_s"] = timed(lambda: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
    del t
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    pool = HostPool(4 * nbytes + (64 << 20))
    t, out["registered_new_s"] = timed(lambda: pool.empty((nbytes,), torch.uint8, dev))
    del t
    t, out["pool_reuse_s"] = timed(lambda: pool.empty((nbytes,), torch.uint8, dev))
    del t
    pool.clear()
    t0 = time.perf_counter()
    x = torch.empty(nbytes, dtype=torch.uint8)
    x.fill_(0)
    out["pageable_touch_s"] = time.perf_counter() - t0
    del x
    out["gbps"] = {k[:-2]: nbytes / v / 1e9 for k, v in out.items() if k.endswith("_s") and v > 0}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=32768)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk size")
    p.add_argument("--methods", default="full,sentencekv:2048",
                   help="comma list of method[:budget[:option=value...]]; a trailing '@general' runs sentencekv's "
                        "final offload through its general path instead of the dense one")
    p.add_argument("--top", type=int, default=15, help="kernels listed per method")
    p.add_argument("--no-profile", action="store_true", help="no torch.profiler: wall, prefill_end and pool only")
    p.add_argument("--repeat", type=int, default=1, help="runs per method (the second reuses the host pool)")
    p.add_argument("--alloc", action="store_true", help="time locking host memory first (CUDA)")
    p.add_argument("--reserve", action="store_true",
                   help="KVSIFT_HOST_RESERVE=1: sentencekv locks its host store beside the prefill")
    p.add_argument("--time-hooks", action="store_true",
                   help="time the prefill_end hooks with device syncs around each call (the syncs wait for the "
                        "host writes too, so they serialise what otherwise overlaps the next layer: the prefill "
                        "time then includes them)")
    p.add_argument("--profile-last-chunk", action="store_true",
                   help="torch.profiler over the last prefill chunk only (from its first layer to the end, so "
                        "sentencekv's final offload hooks are inside): a window small enough to profile at 128k; "
                        "its wall time is reported for every method")
    p.add_argument("--out", default="bench/out/profile_prefill")
    args = p.parse_args(argv)
    if args.reserve:
        os.environ["KVSIFT_HOST_RESERVE"] = "1"
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    from torch.profiler import ProfilerActivity, profile

    from bench._random_llama import random_llama
    from bench._systems import parse_system
    from kvsift import LLM, SamplingParams
    from kvsift.cache.host import host_pool

    model, dev = random_llama(args.layers, args.ctx + 4096)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, text = [], []
    info = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "args": vars(args),
            "host_reserve": args.reserve,
            # dense chunk attention: cuDNN for large chunks unless KVSIFT_PREFILL_CUDNN=0 (then flash)
            "prefill_cudnn": os.environ.get("KVSIFT_PREFILL_CUDNN", "") or "default"}

    def write():
        (out_dir / "profile_prefill.txt").write_text("\n".join(text))
        (out_dir / "profile_prefill.json").write_text(json.dumps({**info, "rows": rows}, indent=1))

    def emit(lines):
        nonlocal text
        text += lines + [""]
        print("\n".join(lines), flush=True)
        write()

    if args.alloc and cuda:
        kv = model.config.num_key_value_heads
        hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        nbytes = kv * args.ctx * hd * 2 + hd * 2   # one layer's keys at --ctx (bf16) and the pad row
        a = _alloc_bench(nbytes, dev)
        info["alloc"] = a
        emit([f"== locking host memory: {nbytes / 2**20:.0f} MiB (one layer's keys at {args.ctx} tokens)"] +
             [f"{k:<20} {a[k] * 1e3:>9.1f} ms  {a['gbps'][k[:-2]]:>6.1f} GB/s" for k in
              ("torch_pinned_s", "registered_new_s", "pool_reuse_s", "pageable_touch_s")])
    llm = LLM.from_model(model, None, chunk_size=args.chunk)
    ids = torch.randint(0, model.config.vocab_size, (args.ctx,), generator=torch.Generator().manual_seed(0)).tolist()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    for spec in args.methods.split(","):
        general = spec.endswith("@general")   # sentencekv's general final offload, for an A/B run
        name, budget, opts = parse_system(spec.removesuffix("@general"))
        with _general_offload(general):
            if cuda:
                host_pool().clear()   # each method's first run locks its own host memory
            small = ids[: min(len(ids), 4 * args.chunk)]   # warm-up: kernels compiled, allocator warm
            llm.generate(small, one, method=name, budget=min(budget, len(small) // 2) if budget else None,
                         method_kwargs=opts or None, progress=False)
            sync()
            for rep in range(args.repeat):
                pool0 = host_pool().stats() if cuda else None
                prof = busy = None
                t0 = time.perf_counter()
                with (_EndTimer(sync) if args.time_hooks else contextlib.nullcontext(_EndTimer(sync))) as ends:
                    if args.profile_last_chunk:
                        with _LastChunkProfile(model, -(-len(ids) // args.chunk), acts, sync) as last:
                            out = llm.generate(ids, one, method=name, budget=budget, method_kwargs=opts or None,
                                               progress=False)
                            sync()
                        prof = last.prof
                        if prof is not None:   # the window's timeline (kernels, copies, the gaps between them)
                            busy = _export_trace(prof, out_dir / f"trace_{_file_name(spec)}_run{rep + 1}.json.gz")
                    elif args.no_profile:
                        out = llm.generate(ids, one, method=name, budget=budget, method_kwargs=opts or None, progress=False)
                        sync()
                    else:
                        with profile(activities=acts) as prof:
                            out = llm.generate(ids, one, method=name, budget=budget, method_kwargs=opts or None,
                                               progress=False)
                            sync()
                wall = time.perf_counter() - t0
                st = out[0].stats
                pool1 = host_pool().stats() if cuda else None
                row = {"system": spec, "run": rep + 1, "ctx": args.ctx, "layers": args.layers, "chunk": args.chunk,
                       "prefill_s": st.prefill_s, "wall_s": wall, "profiled": prof is not None,
                       "prefill_end_s": ends.seconds if args.time_hooks else None,
                       "prefill_end_calls": ends.calls if args.time_hooks else None,
                       "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                       "last_chunk_s": last.seconds if args.profile_last_chunk else None,
                       "last_chunk_device": busy}
                if pool0 is not None:
                    row["host_pool"] = {"locked_new": pool1["misses"] - pool0["misses"],
                                        "reused": pool1["hits"] - pool0["hits"],
                                        "reserved": pool1["reserved"] - pool0["reserved"],
                                        "total_gib": pool1["total"] / 2**30}
                lines = [f"== {spec} (run {rep + 1}): ctx {args.ctx}, {args.layers} layers, chunk {args.chunk}, "
                         f"{dev.type}; prefill {st.prefill_s:.2f} s (wall {wall:.2f} s{', profiled' if prof else ''}); " +
                         (f"prefill_end hooks {ends.seconds:.2f} s in {ends.calls} calls (synced)" if args.time_hooks else
                          "prefill_end hooks not timed") +
                         (f"; last chunk {last.seconds:.3f} s (profiled)" if args.profile_last_chunk and last.seconds
                          else "") +
                         (f"; compute stream busy {busy['streams'][busy['compute_stream']]['busy_ms']:.1f} ms, idle "
                          f"{busy['streams'][busy['compute_stream']]['idle_ms']:.1f} ms" if busy else "") +
                         (f"; host blocks locked {row['host_pool']['locked_new']} at the offload, "
                          f"{row['host_pool']['reserved']} beside the prefill, reused {row['host_pool']['reused']}"
                          if pool0 is not None else "")]
                if prof is not None:
                    ev = prof.key_averages()
                    spans = {e.key: {"cpu_ms": e.cpu_time_total / 1e3, "count": e.count} for e in ev if e.key in RANGES}
                    dev_attr = "device_time_total" if hasattr(ev[0], "device_time_total") else "cuda_time_total"
                    kernels = sorted(((e.key, getattr(e, dev_attr, 0) / 1e3, e.count) for e in ev
                                      if cuda and getattr(e, dev_attr, 0) > 0 and not e.key.startswith("kvsift.")),
                                     key=lambda t: -t[1])[: args.top]
                    row["spans"] = spans
                    row["kernels"] = [{"name": k, "device_ms": t, "count": c} for k, t, c in kernels]
                    lines.append(f"{'range':<30} {'calls':>7} {'CPU ms (incl. waits)':>22}")
                    for k in RANGES:
                        if k in spans:
                            lines.append(f"{k:<30} {spans[k]['count']:>7} {spans[k]['cpu_ms']:>22.1f}")
                    if kernels:
                        lines.append(f"{'op or kernel (device time)':<70} {'calls':>7} {'ms':>9}")
                        lines += [f"{k[:70]:<70} {c:>7} {t:>9.1f}" for k, t, c in kernels]
                rows.append(row)
                emit(lines)
                del out
    print(f"wrote {out_dir}/profile_prefill.txt and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
