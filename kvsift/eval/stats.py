"""Confidence intervals and paired significance for eval scores (numpy only, deterministic).

* :func:`wilson`             95% Wilson score interval of a proportion (0/1 scores)
* :func:`bootstrap_ci`       percentile bootstrap interval of a statistic (fractional scores, perplexity)
* :func:`mean_ci`            the right one of those two for a list of per-sample scores
* :func:`paired_bootstrap`   interval of ``stat(a) - stat(b)`` over the *same* samples (paired by sample id)
* :func:`kept_fraction`      ``stat(method) / stat(full)`` over the same samples, with its interval
* :func:`pooled_kept_fraction`  the mean over cells of that fraction, resampling every cell at once
* :func:`pooled_paired_diff`  mean over all samples of ``a - b`` across cells (tasks), each cell resampled

Every bootstrap draws from ``numpy.random.default_rng(seed)`` with a fixed default seed, so a report
is reproducible. Intervals are 95% (``z = 1.96``, percentiles 2.5 / 97.5) unless told otherwise.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054
N_BOOT = 2000
SEED = 0

Stat = Callable[[np.ndarray], np.ndarray]  # (..., n) -> (...): reduces the last axis


def _mean(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1)


def _exp_mean(x: np.ndarray) -> np.ndarray:
    return np.exp(x.mean(axis=-1))


STATS: dict[str, Stat] = {"mean": _mean, "exp_mean": _exp_mean}  # exp_mean: perplexity from per-token NLLs


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` trials."""
    if n < 1:
        raise ValueError("wilson needs n >= 1")
    if not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def is_binary(xs: Sequence[float]) -> bool:
    return all(x in (0, 1) for x in xs)


def _resample_idx(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentiles(v: np.ndarray, alpha: float) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bootstrap_ci(xs: Sequence[float], stat: str | Stat = "mean", n_boot: int = N_BOOT, seed: int = SEED,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over the samples ``xs`` (resampled with
    replacement ``n_boot`` times from ``default_rng(seed)``)."""
    x = np.asarray(xs, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    f = STATS[stat] if isinstance(stat, str) else stat
    return _percentiles(f(x[_resample_idx(x.size, n_boot, seed)]), alpha)


def mean_ci(xs: Sequence[float], n_boot: int = N_BOOT, seed: int = SEED) -> tuple[float, float, float, str]:
    """``(mean, lo, hi, kind)``: Wilson for 0/1 scores (``kind='wilson'``), else a percentile
    bootstrap of the mean (``kind='bootstrap'``)."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("mean_ci needs at least one score")
    m = sum(xs) / len(xs)
    if is_binary(xs):
        lo, hi = wilson(sum(xs), len(xs))
        return m, lo, hi, "wilson"
    lo, hi = bootstrap_ci(xs, "mean", n_boot, seed)
    return m, lo, hi, "bootstrap"


def paired_bootstrap(a: Sequence[float], b: Sequence[float], stat: str | Stat = "mean", n_boot: int = N_BOOT,
                     seed: int = SEED, alpha: float = 0.05) -> dict[str, float | bool]:
    """Paired bootstrap of ``stat(a) - stat(b)``: ``a[i]`` and ``b[i]`` are the same sample under two
    methods; sample indices are resampled together. ``significant``: the interval excludes 0
    (a difference of exactly 0 on every sample is never significant)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length non-empty lists, got {x.shape} and {y.shape}")
    f = STATS[stat] if isinstance(stat, str) else stat
    diff = float(f(x) - f(y))
    if np.all(x == y):
        return {"diff": 0.0, "lo": 0.0, "hi": 0.0, "significant": False}
    idx = _resample_idx(x.size, n_boot, seed)
    lo, hi = _percentiles(f(x[idx]) - f(y[idx]), alpha)
    return {"diff": diff, "lo": lo, "hi": hi, "significant": bool(lo > 0 or hi < 0)}


def _fraction(m: np.ndarray, f: np.ndarray, higher_is_better: bool) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return m / f if higher_is_better else f / m


def kept_fraction(method: Sequence[float], full: Sequence[float], stat: str | Stat = "mean",
                  higher_is_better: bool = True, n_boot: int = N_BOOT, seed: int = SEED,
                  alpha: float = 0.05) -> tuple[float, float, float]:
    """``(fraction, lo, hi)``: how much of the full cache's score the method keeps on the same
    samples: ``stat(method) / stat(full)`` (``stat(full) / stat(method)`` when lower is better,
    e.g. perplexity), with a paired bootstrap interval. NaN when the full score is 0."""
    pooled = pooled_kept_fraction([(method, full)], stat, higher_is_better, n_boot, seed, alpha)
    return pooled["value"], pooled["lo"], pooled["hi"]


def pooled_kept_fraction(cells: Sequence[tuple[Sequence[float], Sequence[float]]], stat: str | Stat = "mean",
                         higher_is_better: bool = True, n_boot: int = N_BOOT, seed: int = SEED,
                         alpha: float = 0.05) -> dict[str, float | int]:
    """Mean over cells of the kept fraction (:func:`kept_fraction`), with a stratified paired
    bootstrap interval: each replicate resamples every cell's samples (paired with that cell's
    full-cache run) and averages the cells' fractions. Cells whose fraction is undefined (full
    score 0) are left out of that replicate (and of the point value)."""
    f = STATS[stat] if isinstance(stat, str) else stat
    rng = np.random.default_rng(seed)
    points, boots = [], []
    for m_xs, f_xs in cells:
        m, fu = np.asarray(m_xs, dtype=float), np.asarray(f_xs, dtype=float)
        if m.shape != fu.shape or m.size == 0:
            raise ValueError("pooled_kept_fraction needs paired, equal-length, non-empty cells")
        points.append(float(_fraction(f(m), f(fu), higher_is_better)))
        idx = rng.integers(0, m.size, size=(n_boot, m.size))
        boots.append(_fraction(f(m[idx]), f(fu[idx]), higher_is_better))
    pts = np.asarray(points)
    ok = np.isfinite(pts)
    if not ok.any():
        return {"value": math.nan, "lo": math.nan, "hi": math.nan, "cells": 0}
    bs = np.stack(boots)  # (cells, n_boot)
    bs = np.where(ok[:, None], bs, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replicate where every cell is undefined
        rep = np.nanmean(np.where(np.isfinite(bs), bs, np.nan), axis=0)
    lo, hi = _percentiles(rep, alpha)
    return {"value": float(pts[ok].mean()), "lo": lo, "hi": hi, "cells": int(ok.sum())}


def pooled_paired_diff(cells: Sequence[tuple[Sequence[float], Sequence[float]]], n_boot: int = N_BOOT,
                       seed: int = SEED, alpha: float = 0.05) -> dict[str, float | int | bool]:
    """``mean(a) - mean(b)`` over every sample of every cell (cells: ``(a, b)`` per-sample scores
    of two methods on the same samples, e.g. one cell per task), with a stratified paired
    bootstrap interval: each replicate resamples every cell's samples within the cell, so each
    cell keeps its weight (its sample count). ``n``: samples; ``significant``: the interval
    excludes 0 (a difference of 0 on every sample is not)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for a_xs, b_xs in cells:
        a, b = np.asarray(a_xs, dtype=float), np.asarray(b_xs, dtype=float)
        if a.shape != b.shape or a.ndim != 1 or a.size == 0:
            raise ValueError("pooled_paired_diff needs paired, equal-length, non-empty cells")
        diffs.append(a - b)
    if not diffs:
        raise ValueError("pooled_paired_diff needs at least one cell")
    n = sum(d.size for d in diffs)
    point = float(sum(d.sum() for d in diffs) / n)
    if all(not d.any() for d in diffs):
        return {"diff": 0.0, "lo": 0.0, "hi": 0.0, "n": n, "significant": False}
    rep = sum(d[rng.integers(0, d.size, size=(n_boot, d.size))].sum(axis=1) for d in diffs) / n
    lo, hi = _percentiles(rep, alpha)
    return {"diff": point, "lo": lo, "hi": hi, "n": n, "significant": bool(lo > 0 or hi < 0)}
