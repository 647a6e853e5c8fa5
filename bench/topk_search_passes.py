"""Passes of the top-k kernels' threshold search, simulated on the CPU (no GPU, no Triton).

``kvsift/kernels/topk_select.py`` finds a row's k-th largest score by a 4-way search over
order-preserving integer keys: each pass counts the keys at or above three probes at the quarters
of ``[lo, hi)`` (three reductions), and the search stops once the count at ``lo`` is exactly ``k``
or the interval is one key wide. Each pass is three reductions across a program's warps, so
fewer passes could make a faster top-k. This script counts the passes of that
search and of an interpolation variant (probes around the key where the counts, read as linear in
the key, would reach ``k``, and quartiles again after a pass that shrank the interval less than
``--fallback`` times), both exact, on score rows shaped like the decode's: Quest's page bounds
(Gaussian), TokenSelect's votes (sums of softmax probabilities: heavy-tailed), a block of 1,024,
the last pick among candidates, and rows of many ties.

    python3 bench/topk_search_passes.py --out bench/results/topk_search_passes_cpu.json

Measured 2026-12-05: the interpolation saves 2-3 passes of 8-9 on Gaussian rows, under one on
votes and none on the last pick: by our estimate about 1.5 us of a 25 us Quest step at batch 1 on
the H200, if the passes are most of the top-k's 9 us there, so it
was not built (``docs/eval.md``, the thirty-fourth session's section).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def order_keys(x: np.ndarray) -> np.ndarray:
    """float32 scores as non-negative int64 keys in the same order (the kernels' keys, unsigned)."""
    b = x.astype(np.float32).view(np.int32).astype(np.int64)
    return (np.where(b >= 0, b ^ -2147483648, ~b) & 0xFFFFFFFF).astype(np.int64)


def search(key: np.ndarray, k: int, interp: bool, spread: int = 8, fallback: int = 4) -> tuple[int, int, int]:
    """The threshold search; returns ``(passes, threshold key, count at it)``. ``interp=False`` is
    the kernels' 4-way search."""
    lo, hi = int(key.min()), int(key.max()) + 1
    cnt, cnt_hi, passes, last_w = len(key), 0, 0, None
    while hi - lo > 1 and cnt != k:
        w = hi - lo
        if not interp or (last_w is not None and w * fallback > last_w):
            probes = [lo + w // 4, lo + w // 2, lo + 3 * w // 4]
        else:
            est = lo + int(w * (cnt - k) / max(cnt - cnt_hi, 1))
            d = max(1, w // (2 * spread))
            probes = [min(max(m, lo + 1), hi - 1) for m in (est - d, est, est + d)]
        last_w = w
        counts = [int((key >= m).sum()) for m in probes]
        passes += 1
        new = (lo, cnt, probes[0], counts[0])
        for i, (m, c) in enumerate(zip(probes, counts)):
            if c >= k:   # the largest probe still holding k keys; the next one up bounds it
                new = (m, c) + ((probes[i + 1], counts[i + 1]) if i + 1 < 3 else (hi, cnt_hi))
        lo, cnt, hi, cnt_hi = new
    return passes, lo, cnt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=40, help="rows per case")
    ap.add_argument("--spread", type=int, default=8, help="interpolation probes at est +- width / (2 * spread)")
    ap.add_argument("--fallback", type=int, default=4, help="quartiles after a pass that shrank less than this")
    ap.add_argument("--out", default=None, help="JSON file for the table")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    cases = [
        ("Quest pages of 32 at 128k (4,160, k 64)", lambda: rng.standard_normal(4160) * 3 + 10, 64),
        ("Quest pages of 16 at 128k (8,256, k 128)", lambda: rng.standard_normal(8256) * 3 + 10, 128),
        ("a block of 1,024 pages (k 64)", lambda: rng.standard_normal(1024) * 3 + 10, 64),
        ("the pick among 5 x 64 candidates", lambda: rng.permutation(np.sort(rng.standard_normal(4160))[::-1][:320]), 64),
        ("TokenSelect votes, a block (16,384, k 2,048)", lambda: np.exp(rng.standard_normal((4, 16384)) * 2).sum(0), 2048),
        ("uniform (4,096, k 64)", lambda: rng.random(4096), 64),
        ("7 distinct values (4,096, k 64)", lambda: rng.integers(-3, 4, 4096).astype(float), 64),
    ]
    rows = []
    print(f"{'row':48s} {'4-way mean/max':>15s} {'interp mean/max':>16s}")
    for name, gen, k in cases:
        got = {"4way": [], "interp": []}
        for _ in range(a.rows):
            key = order_keys(gen())
            want = np.sort(key)[::-1][k - 1]
            for label, interp in (("4way", False), ("interp", True)):
                p, t, c = search(key, k, interp, a.spread, a.fallback)
                assert int((key >= t).sum()) == c and (c == k or t == want), (name, label)   # exact
                got[label].append(p)
        row = {"row": name, "k": k, **{f"{lbl}_mean": float(np.mean(v)) for lbl, v in got.items()},
               **{f"{lbl}_max": int(max(v)) for lbl, v in got.items()}}
        rows.append(row)
        print(f"{name:48s} {row['4way_mean']:9.1f} / {row['4way_max']:<3d} {row['interp_mean']:10.1f} / {row['interp_max']:<3d}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows_per_case": a.rows, "spread": a.spread,
                       "fallback": a.fallback, "rows": rows}, f, indent=1)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
