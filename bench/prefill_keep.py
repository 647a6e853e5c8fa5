"""Keep-as-you-go prefill (``chunked(<scorer>)``) against compressing at the end (the scorer alone)
and ``full``: the largest KV the prefill ever held, prefill time, what is kept, on one long prompt.

A random-weight Llama-shaped model (on CUDA the Llama-3.1-8B shape, ``--layers`` of them; on the
CPU a narrow model with the 8B's KV heads and head_dim, so its KV per token and layer is the 8B's).
The KV peak is measured, not estimated: every KV buffer the cache allocates is counted while it is
alive (``SiftLayer._alloc``, freed when its last view goes), and on CUDA the allocator's peak is
reported too. Prints a table and writes JSON.

    PYTHONPATH=. python3 bench/prefill_keep.py --ctx 8192 --budget 512 --chunk 512 --out bench/out/prefill_keep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # bench._random_llama, kvsift


class KVPeak:
    """Context manager: the largest sum of live KV buffer bytes (keys, values, positions)."""

    def __init__(self):
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __enter__(self):
        from kvsift.cache.layer import SiftLayer

        self._orig = orig = SiftLayer._alloc
        tracker = self

        def alloc(layer, b, h, cap, d, dtype, device):
            orig(layer, b, h, cap, d, dtype, device)
            for t in (layer.k_buf, layer.v_buf, layer.pos_buf):
                n = t.numel() * t.element_size()
                tracker.live += n
                weakref.finalize(t, tracker._free, n)
            tracker.peak = max(tracker.peak, tracker.live)

        SiftLayer._alloc = alloc
        return self

    def __exit__(self, *exc):
        from kvsift.cache.layer import SiftLayer

        SiftLayer._alloc = self._orig
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--scorers", default="snapkv,streaming")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--out", default="bench/out/prefill_keep.json")
    args = p.parse_args(argv)
    from bench._random_llama import random_llama
    from kvsift import LLM, SamplingParams

    model, dev = random_llama(args.layers, args.ctx + 1024)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (args.ctx,)).tolist()
    specs = [("full", None)] + [(s, args.budget) for s in args.scorers.split(",") if s] + \
            [(f"chunked({s})", args.budget) for s in args.scorers.split(",") if s]
    llm = LLM.from_model(model, None, chunk_size=args.chunk, decode_mode="eager")
    rows = []
    head = (f"{'method':<20} {'prefill s':>9} {'KV peak MiB':>11} {'kept MiB':>9} {'peak/kept':>9} "
            f"{'GPU peak GiB':>12}")
    print(f"ctx {args.ctx}, budget {args.budget}, chunk {args.chunk}, {args.layers} layers, {dev.type}")
    print(head)
    for spec, budget in specs:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with KVPeak() as kv:
            t0 = time.perf_counter()
            out = llm.generate(ids, SamplingParams(max_tokens=args.new_tokens, ignore_eos=True), method=spec,
                               budget=budget, progress=False)[0]
            wall = time.perf_counter() - t0
        st = out.stats
        row = {"method": spec, "budget": budget, "ctx": args.ctx, "chunk": args.chunk, "layers": args.layers,
               "prefill_s": st.prefill_s, "wall_s": wall, "kv_peak_bytes": kv.peak,
               "kv_kept_bytes": st.kv_kept_bytes, "kv_device_bytes": st.kv_device_bytes,
               "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
               "tokens": out.token_ids}
        rows.append(row)
        gp = f"{row['gpu_peak_gib']:12.2f}" if row["gpu_peak_gib"] is not None else f"{'-':>12}"
        print(f"{spec:<20} {st.prefill_s:9.2f} {kv.peak / 2**20:11.1f} {st.kv_kept_bytes / 2**20:9.1f} "
              f"{kv.peak / max(1, st.kv_kept_bytes):9.2f} {gp}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                                          "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
