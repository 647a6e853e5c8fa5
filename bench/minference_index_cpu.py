"""MInference's vertical-slash index (``vertical_slash_index`` then ``blocks_to_index``), the
current code against another revision's, on the same random queries and keys: the best of
``--reps`` runs each, and a check that both give the same index. Prints a table and writes JSON.

    PYTHONPATH=. python3 bench/minference_index_cpu.py --rev 2035169 --chunk 16384 --keys 16384,65536 \
        --out bench/results/minference_index_cpu.json

The revision's ``kvsift/methods/minference.py`` is read with ``git show`` and imported beside the
current one (its own imports resolve to the current tree). Sizes: the method's defaults (vertical
1000, slash 6096, last_q 64, block 64), one KV head of a 4-query-head group, head_dim 128.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def load_revision(rev: str):
    """``kvsift/methods/minference.py`` as of ``rev``, imported as the module ``minference_<rev>``."""
    src = subprocess.run(["git", "show", f"{rev}:kvsift/methods/minference.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"minference_{rev}.py"
    path.write_text(src, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod   # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


def time_index(mod, q, k, n: int, reps: int) -> tuple[float, float, tuple]:
    """Best-of-``reps`` milliseconds of the index build and of ``blocks_to_index``, and the last result."""
    best = (float("inf"), float("inf"))
    for _ in range(reps):
        t0 = time.perf_counter()
        bm, cols = mod.vertical_slash_index(q, k, n, 64, 1000, 6096, 64, q.shape[-1] ** -0.5)
        t1 = time.perf_counter()
        bi = mod.blocks_to_index(bm)
        t2 = time.perf_counter()
        if (t1 - t0) + (t2 - t1) < sum(best):
            best = (t1 - t0, t2 - t1)
    return best[0] * 1e3, best[1] * 1e3, (bm, cols, bi)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", required=True, help="the git revision to compare with")
    p.add_argument("--chunk", type=int, default=16384, help="queries in the chunk")
    p.add_argument("--keys", default="16384,65536", help="comma-separated key counts (each >= --chunk)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="bench/out/minference_index_cpu.json")
    a = p.parse_args(argv)
    import kvsift.methods.minference as current

    old = load_revision(a.rev)
    torch.manual_seed(0)
    rows = []
    print(f"{'chunk':>6} {'keys':>6} {'code':<8} {'index ms':>9} {'to_index ms':>12} same")
    for n in (int(x) for x in a.keys.split(",")):
        q, k = torch.randn(1, 4, a.chunk, 128), torch.randn(1, 1, n, 128)
        res = {name: time_index(mod, q, k, n, a.reps) for name, mod in ((a.rev, old), ("current", current))}
        same = all(torch.equal(x, y) for x, y in zip(res[a.rev][2], res["current"][2]))
        for name, (ms, to_ms, _) in res.items():
            rows.append({"chunk": a.chunk, "keys": n, "code": name, "index_ms": ms, "blocks_to_index_ms": to_ms,
                         "same_index": same})
            print(f"{a.chunk:>6} {n:>6} {name:<8} {ms:>9.1f} {to_ms:>12.1f} {same}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": "cpu", "threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["same_index"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
