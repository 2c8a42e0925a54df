"""Pure statistics: samples in, numbers out. No I/O."""
from __future__ import annotations

import math
import statistics

import numpy as np
from scipy import stats as sps


def bootstrap_median_ci(samples: list[float], confidence: float = 0.95, n_resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI of the median (scipy.stats.bootstrap)."""
    if len(samples) < 2:
        return math.nan, math.nan
    if min(samples) == max(samples):
        return samples[0], samples[0]
    res = sps.bootstrap((np.asarray(samples, dtype=float),), np.median, confidence_level=confidence,
                        n_resamples=n_resamples, method="percentile", random_state=seed)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarize(samples: list[float]) -> dict:
    """n, median, mean, p90, p99, stdev, cv and the bootstrap 95% CI of the median."""
    xs = [float(x) for x in samples if x is not None and not math.isnan(float(x))]
    if not xs:
        return {"n": 0}
    arr = np.asarray(xs)
    mean = float(arr.mean())
    stdev = statistics.stdev(xs) if len(xs) > 1 else 0.0
    lo, hi = bootstrap_median_ci(xs)
    return {
        "n": len(xs),
        "median": float(np.median(arr)),
        "mean": mean,
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "stdev": stdev,
        "ci_low": lo,
        "ci_high": hi,
        "cv": stdev / mean if mean else 0.0,
    }


def invalid_reasons(summary: dict, min_runs: int, measured_s: float, min_seconds: float, max_cv: float,
                    runs: tuple[str, str] = ("runs", "--num-runs")) -> list[str]:
    """Each unmet validity condition, worded for a reader; empty when the summary is valid.
    `runs`: what a run is called and the flag that sets how many (endpoint mode: requests,
    --num-prompts)."""
    out = []
    n, cv = summary.get("n", 0), summary.get("cv", math.inf)
    if n < min_runs:
        out.append(f"{n} {runs[0]} < {runs[1]} {min_runs}")
    if measured_s < min_seconds:
        out.append(f"{measured_s:.2f} s measured < --min-seconds {min_seconds:g}")
    if not cv <= max_cv:
        out.append(f"cv {cv:.2f} > --max-cv {max_cv:g}")
    return out


def is_valid(summary: dict, min_runs: int, measured_s: float, min_seconds: float, max_cv: float) -> bool:
    return not invalid_reasons(summary, min_runs, measured_s, min_seconds, max_cv)
