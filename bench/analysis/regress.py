"""Pure regression verdicts over two sets of per-run samples (no I/O), in the manner of asv:
a change counts only when it is both significant and larger than a factor.

- significance: one-sided Mann-Whitney U (scipy.stats.mannwhitneyu), p < alpha;
- size: the Hodges-Lehmann estimate of the candidate/baseline ratio (median of all pairwise
  ratios), the estimator that goes with the U test and is steadier than a ratio of medians;
- fewer than `min_samples` runs on a side, or too few for the test to ever reach alpha, is
  "inconclusive", never a pass;
- direction: bench.measure.schema's table says which metrics are better higher (throughput,
  agreement); every other metric is a cost (ms, MiB, J, KL).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import mannwhitneyu

from bench.measure.schema import higher_is_better



@dataclass(frozen=True)
class Verdict:
    status: str  # regression | improvement | unchanged | inconclusive
    ratio: float  # candidate / baseline (Hodges-Lehmann); > 1 means larger values
    p_value: float
    n_baseline: int
    n_candidate: int
    baseline_median: float
    candidate_median: float
    reason: str = ""  # why a verdict is inconclusive


def hodges_lehmann_ratio(baseline: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.median(np.divide.outer(candidate, baseline)))


def min_samples_ok(n1: int, n2: int, alpha: float) -> bool:
    """Whether the smallest attainable one-sided U-test p-value, 1 / C(n1+n2, n1), is below alpha."""
    return n1 > 0 and n2 > 0 and 1 / math.comb(n1 + n2, n1) < alpha


def compare_samples(baseline, candidate, metric: str, alpha: float = 0.01, factor: float = 1.10,
                    min_samples: int = 5, higher_better: bool | None = None) -> Verdict:
    """`higher_better`: the metric's direction; None takes it from bench.measure.schema."""
    b = np.asarray([x for x in baseline if x is not None and not math.isnan(x)], dtype=float)
    c = np.asarray([x for x in candidate if x is not None and not math.isnan(x)], dtype=float)
    medians = (float(np.median(b)) if len(b) else math.nan, float(np.median(c)) if len(c) else math.nan)
    if min(len(b), len(c)) < min_samples:
        why = f"fewer than --min-samples {min_samples} runs on a side"
    elif not min_samples_ok(len(b), len(c), alpha):
        why = f"too few runs for p < --alpha {alpha:g}"
    elif np.any(b <= 0) or np.any(c <= 0):
        why = "a value at or below zero (no ratio)"
    else:
        why = ""
    if why:
        return Verdict("inconclusive", math.nan, math.nan, len(b), len(c), *medians, reason=why)
    if higher_better is None:
        higher_better = higher_is_better(metric)
    worse = "less" if higher_better else "greater"
    better = "greater" if worse == "less" else "less"
    p_worse = float(mannwhitneyu(c, b, alternative=worse, method="auto").pvalue)
    p_better = float(mannwhitneyu(c, b, alternative=better, method="auto").pvalue)
    ratio = hodges_lehmann_ratio(b, c)
    slower = ratio if worse == "greater" else 1 / ratio  # > 1 means the candidate is worse
    if p_worse < alpha and slower > factor:
        return Verdict("regression", ratio, p_worse, len(b), len(c), *medians)
    if p_better < alpha and slower < 1 / factor:
        return Verdict("improvement", ratio, p_better, len(b), len(c), *medians)
    return Verdict("unchanged", ratio, min(p_worse, p_better), len(b), len(c), *medians)
