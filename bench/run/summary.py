"""Summaries of measured runs: runs.csv rows in, summary.csv rows out. Imports no model code
(no torch), so `vlm-bench summarize` starts fast and quiet."""
from __future__ import annotations

import math
from dataclasses import dataclass

from bench.errors import UsageError
from bench.measure.schema import PHASES_OF, POINT_METRICS, SUMMARY_KEY, SUMMARY_METRICS, counts_in_summary, result_key
from bench.measure.stats import invalid_reasons, summarize


@dataclass(frozen=True)
class ValidityRule:
    """What a valid summary needs: the run's --num-runs, --min-seconds and --max-cv (a run config
    has these fields, so it serves as one too)."""
    num_runs: int
    min_seconds: float
    max_cv: float
    # What a run is called and what sets how many a summary needs, in invalid_reason; None: by the
    # rows' engine (runs, --num-runs; endpoint mode: requests, --num-prompts)
    runs_named: tuple[str, str] | None = None

    def __post_init__(self):
        if not isinstance(self.num_runs, int) or self.num_runs < 1:
            raise UsageError("--num-runs must be at least 1")
        if not (isinstance(self.min_seconds, (int, float)) and math.isfinite(self.min_seconds)
                and self.min_seconds >= 0):
            raise UsageError(f"--min-seconds must be a finite number, at least 0, got {self.min_seconds}")
        if not (isinstance(self.max_cv, (int, float)) and math.isfinite(self.max_cv) and self.max_cv > 0):
            raise UsageError(f"--max-cv must be a positive number (e.g. 0.10), got {self.max_cv}")


def queueing_point(row: dict) -> bool:
    """Whether the row is of an endpoint point whose requests queue by design (more than one in
    flight, or Poisson arrivals): their spread is what the point measures (the server's queueing
    and batching, reported as p90, p99 and cv), not noise, so --max-cv does not judge it."""
    if row.get("engine") != "endpoint":
        return False
    try:
        concurrency = float(row.get("concurrency") or 1)
        rate = float(row.get("request_rate") or math.inf)
    except (TypeError, ValueError):
        return False
    return concurrency > 1 or math.isfinite(rate)


def summarize_runs(rows: list[dict], rule: ValidityRule) -> list[dict]:
    """Per result (bench.measure.schema.SUMMARY_KEY: its identity, workload point and run id): one
    row per metric; skipped/failed variants get one row saying so. Rows that differ in any key
    column (cold and warm runs, dtypes, devices, invocations...) are never pooled. The cv bound
    does not judge endpoint points that queue by design (queueing_point)."""
    out: list[dict] = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") != "ok":
            out.append({**dict(zip(SUMMARY_KEY, result_key(r, SUMMARY_KEY))), "status": r["status"],
                        "error": r.get("error")})
            continue
        if r.get("kind") == "measured":
            groups.setdefault(result_key(r, SUMMARY_KEY), []).append(r)
    for key, group in groups.items():
        runs = [r for r in group if counts_in_summary(r)]
        excluded = len(group) - len(runs)
        measured_s = sum(float(r["e2e_ms"]) for r in runs) / 1e3
        max_cv = math.inf if queueing_point(group[0]) else rule.max_cv
        runs_named = getattr(rule, "runs_named", None) or (  # a RunConfig as the rule has none
            ("requests", "--num-prompts") if group[0].get("engine") == "endpoint" else ("runs", "--num-runs"))
        stats = {}
        for metric in SUMMARY_METRICS:
            values = [r.get(metric) for r in runs if r.get(metric) is not None]
            values = values[:1] if metric in POINT_METRICS else values  # one measurement of the point
            s = summarize(values) if values else {"n": 0}
            if s["n"]:
                stats[metric] = s
        for metric, s in stats.items():
            # a point metric is one measurement over the point's requests: they are its runs
            counted = {**s, "n": len(runs)} if metric in POINT_METRICS else s
            reasons = invalid_reasons(counted, rule.num_runs, measured_s, rule.min_seconds, max_cv, runs_named)
            valid = not reasons
            if not s["cv"] <= max_cv and metric in PHASES_OF:
                phase = max((p for p in PHASES_OF[metric] if p in stats), key=lambda p: stats[p]["stdev"],
                            default=None)
                if phase is not None:
                    reasons.append(f"noisiest phase {phase} (sd {stats[phase]['stdev']:.3g} ms, "
                                   f"cv {stats[phase]['cv']:.2f})")
            out.append({**dict(zip(SUMMARY_KEY, key)), "status": "ok", "metric": metric, **s,
                        "excluded": excluded, "measured_s": measured_s, "valid": valid,
                        "invalid_reason": "; ".join(reasons)})
    return out
