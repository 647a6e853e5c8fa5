"""What the quantized decode kernel compiles to: its register use, spills and an instruction mix.

Runs :func:`kvsift.kernels.quant_decode_attention.quant_decode_attention` once over a random int4
128k layer (Llama-3.1-8B shape, CUDA only) with a private Triton cache, then disassembles the
compiled kernel with the ``cuobjdump`` that Triton ships and counts the instructions by opcode. The
counts are static (each instruction of the binary once, not weighted by how often it runs); the
folded path's loop over a block of slots dominates them. For issue #13: where the kernel's
instructions go (unpacking, layout conversions, tensor-core dots).

    PYTHONPATH=. python3 bench/kernel_sass.py --out bench/out/kernel_sass.json   # also writes kernel_sass.sass beside it
    PYTHONPATH=. python3 bench/kernel_sass.py --tuning fold_asm=1 --out bench/out/sass_asm.json   # a TUNING variant

Prints the launch metadata (warps, stages, shared memory, registers, spills) and the opcodes by
count; the JSON has both, the SASS text goes beside it (the output's name with ``.sass``).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def opcode_counts(sass: str) -> collections.Counter:
    """Opcodes (without modifiers or predicates) of ``cuobjdump -sass`` text, by count."""
    ops = collections.Counter()
    for line in sass.splitlines():
        line = line.strip()
        if not (line.startswith("/*") and "*/" in line):
            continue
        ins = line.split("*/", 1)[1].strip()
        if not ins or ins.startswith("/*"):
            continue
        words = ins.split()
        op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
        ops[op.split(".")[0].rstrip(";")] += 1
    return ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--bits", type=int, default=4, choices=(2, 4))
    ap.add_argument("--out", default="bench/out/kernel_sass.json")
    ap.add_argument("--tuning", default="", help="TUNING overrides of the kernel, e.g. fold_asm=1,num_stages=3")
    args = ap.parse_args(argv)
    overrides = {}
    for item in filter(None, args.tuning.split(",")):
        key, _, val = item.partition("=")
        if not val:
            ap.error(f"--tuning items are key=value, got {item!r}")
        overrides[key.strip()] = int(val) if val.strip().lstrip("-").isdigit() else val.strip()
    import torch
    if not torch.cuda.is_available():
        print("kernel_sass: needs CUDA", file=sys.stderr)
        return 2
    cache = tempfile.mkdtemp(prefix="kvsift-tc-")
    os.environ["TRITON_CACHE_DIR"] = cache          # before the first compile: a private cache
    import triton

    from kvsift.cache.quant import QuantKV, default_group
    from kvsift.kernels import quant_decode_attention as qmod
    from kvsift.kernels.quant_decode_attention import quant_decode_attention

    unknown = set(overrides) - set(qmod.TUNING)
    if unknown:
        ap.error(f"unknown --tuning keys {sorted(unknown)}; known: {sorted(qmod.TUNING)}")
    for key, val in overrides.items():
        qmod.TUNING[key] = type(qmod.TUNING[key])(val) if not isinstance(qmod.TUNING[key], bool) else bool(val)

    n, hq, hk, d = args.ctx, 32, 8, 128
    g = default_group(d, args.bits)
    k = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(n, device="cuda", dtype=torch.int32).expand(1, hk, n).contiguous()
    with torch.inference_mode():
        st = QuantKV.from_dense(k, torch.randn_like(k), pos, args.bits, g, g, room=64)
        q = torch.randn(1, hq, d, device="cuda", dtype=torch.bfloat16)
        quant_decode_attention(q, query_pos=torch.full((1,), n, device="cuda"), slot_idx=None, scale=d ** -0.5,
                               group=g, **st.kernel_args())
    torch.cuda.synchronize()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else (shutil.which("cuobjdump") or tool)
    result = {"ctx": n, "bits": args.bits, "tuning": dict(qmod.TUNING), "kernels": []}
    for meta_path in glob.glob(os.path.join(cache, "*", "_quant_decode_split_kernel.json")):
        meta = json.load(open(meta_path))
        cubin = glob.glob(os.path.join(os.path.dirname(meta_path), "*.cubin"))[0]
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        (out.parent / (out.stem + ".sass")).write_text(sass)
        ops = opcode_counts(sass)
        info = {k: meta.get(k) for k in ("num_warps", "num_stages", "shared", "n_regs", "n_spills")}
        print(info)
        print(f"{sum(ops.values())} instructions; by opcode:")
        for op, c in ops.most_common(30):
            print(f"  {op:12s} {c:6d}")
        result["kernels"].append({**info, "instructions": sum(ops.values()), "opcodes": dict(ops.most_common())})
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
