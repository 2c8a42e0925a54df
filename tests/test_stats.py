import numpy as np
import pytest

from bench.measure.metrics import percentile
from bench.measure.stats import bootstrap_median_ci, is_valid, summarize


def test_summary_matches_numpy():
    rng = np.random.default_rng(0)
    xs = list(rng.lognormal(3, 0.1, 50))
    s = summarize(xs)
    assert s["n"] == 50
    assert s["median"] == pytest.approx(np.median(xs))
    assert s["p90"] == pytest.approx(np.percentile(xs, 90))
    assert s["p99"] == pytest.approx(np.percentile(xs, 99))
    assert s["stdev"] == pytest.approx(np.std(xs, ddof=1))
    assert s["ci_low"] < s["median"] < s["ci_high"]
    assert s["cv"] == pytest.approx(np.std(xs, ddof=1) / np.mean(xs))


def test_percentile_matches_numpy():
    xs = [5.0, 1.0, 3.0, 9.0, 7.0, 2.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_bootstrap_ci_covers_true_median():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(40):
        xs = list(rng.normal(100, 5, 30))
        lo, hi = bootstrap_median_ci(xs, n_resamples=500)
        hits += lo <= 100 <= hi
    assert hits >= 34  # nominal 95%


def test_degenerate_samples():
    assert summarize([])["n"] == 0
    s = summarize([2.0])
    assert s["n"] == 1 and s["stdev"] == 0 and np.isnan(s["ci_low"])
    assert summarize([3.0, 3.0, 3.0])["ci_low"] == 3.0


def test_validity_needs_runs_time_and_low_cv():
    s = summarize([10.0, 10.1, 9.9, 10.0])
    assert is_valid(s, min_runs=4, measured_s=2, min_seconds=1, max_cv=0.1)
    assert not is_valid(s, min_runs=5, measured_s=2, min_seconds=1, max_cv=0.1)
    assert not is_valid(s, min_runs=4, measured_s=0.5, min_seconds=1, max_cv=0.1)
    assert not is_valid(summarize([1.0, 10.0, 1.0, 10.0]), min_runs=4, measured_s=2, min_seconds=1, max_cv=0.1)
