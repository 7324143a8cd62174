"""Timing loops and latency statistics: per-run samples in, percentiles and speedup intervals out.

  * Per configuration: percentiles p50/p90/p95/p99 of all samples (linear interpolation), mean,
    std (ddof 1), min, CV = std / mean, throughput = batch * 1000 / mean_ms.
  * speedup = p50(base) / p50(other). Its interval is a two-level bootstrap over paired rounds:
    resample the rounds with replacement, and within each drawn round resample its runs; the
    statistic is the geometric mean of the per-round p50 ratios, and the interval is its
    percentiles at (1 - level) / 2 and 1 - (1 - level) / 2 (fixed seed, so the same samples give
    the same interval). Round-to-round drift of the host is what makes single-run ratios lie,
    hence resampling rounds; resampling runs keeps a one-round interval from collapsing to a point.
  * A CV above ``CV_WARN`` is reported as a warning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

#: Coefficient of variation above which a row's timings are flagged as noisy.
CV_WARN = 0.10


def time_runs(run: Callable[[], object], runs: int) -> tuple[np.ndarray, int]:
    """Time ``runs`` calls of ``run()``: per-call nanoseconds and the loop's total wall time (ns).

    The loop does nothing but read the clock, call and store, so what it adds to each sample is
    two perf_counter_ns reads; wall - sum(samples) measures the rest of the loop.
    """
    samples = np.empty(runs, dtype=np.int64)
    clock = time.perf_counter_ns
    start = clock()
    for i in range(runs):
        t0 = clock()
        run()
        samples[i] = clock() - t0
    return samples, clock() - start


def summarize(samples_ms, batch: int = 1) -> dict:
    """Latency statistics of per-run samples (ms): percentiles, mean, std, min, CV, throughput."""
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise ValueError("summarize: no samples")
    p50, p90, p95, p99 = np.percentile(x, [50, 90, 95, 99])
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return {
        "p50_ms": float(p50), "p90_ms": float(p90), "p95_ms": float(p95), "p99_ms": float(p99),
        "mean_ms": mean, "std_ms": std, "min_ms": float(x.min()),
        "cv": std / mean if mean > 0 else 0.0,
        "throughput_ips": batch * 1000.0 / mean if mean > 0 else math.inf,
    }


def speedup_interval(base_rounds: Sequence, other_rounds: Sequence, *, level: float = 0.95,
                     n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of p50(base) / p50(other) from per-round sample arrays (module doc).

    Round r of ``base_rounds`` is paired with round r of ``other_rounds`` (they ran back to back).
    """
    rounds = min(len(base_rounds), len(other_rounds))
    if rounds == 0:
        raise ValueError("speedup_interval: no rounds")
    rng = np.random.default_rng(seed)
    log_ratio = np.empty((rounds, n_boot))
    for r in range(rounds):
        a = np.asarray(base_rounds[r], dtype=np.float64)
        b = np.asarray(other_rounds[r], dtype=np.float64)
        p50_a = np.median(a[rng.integers(0, a.size, (n_boot, a.size))], axis=1)
        p50_b = np.median(b[rng.integers(0, b.size, (n_boot, b.size))], axis=1)
        log_ratio[r] = np.log(p50_a) - np.log(p50_b)
    picked = rng.integers(0, rounds, (n_boot, rounds))
    stat = np.exp(log_ratio[picked, np.arange(n_boot)[:, None]].mean(axis=1))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(stat, [tail, 100 - tail])
    return float(low), float(high)


def cv_warnings(rows: list[dict], limit: float = CV_WARN) -> list[str]:
    """One warning per successful row ({model, threads, batch, cv, error}) whose CV exceeds ``limit``."""
    return [f"{r['model']} (threads={r['threads']}, batch={r['batch']}): CV {r['cv']:.0%} > "
            f"{limit:.0%}, timings are noisy; trust ratios over absolute ms, or add --rounds"
            for r in rows if r.get("error") is None and r["cv"] > limit]
