"""Per-request metrics derived from a request's timed phases. The columns themselves (name,
unit, direction, meaning) are defined once, in bench.measure.schema."""
from __future__ import annotations

import math
import statistics

from bench.measure.request import RequestResult


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of a non-empty list."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


TTFT_PHASES = ("preprocess", "lookup", "restore", "vision", "prefill")
PHASES = (*TTFT_PHASES, "store")  # a request's phases before its decode steps (store: after its first token)


def request_metrics(r: RequestResult, new_tokens: int) -> dict:
    """Derived per-run metrics from one request's timed phases (definitions: bench.measure.schema)."""
    p = r.phases_ms
    ttft = sum(p.get(k, 0.0) for k in TTFT_PHASES)
    decode = sum(r.step_ms)
    steps = len(r.step_ms)
    out = {
        "preprocess_ms": p.get("preprocess", 0.0),
        "lookup_ms": p.get("lookup", 0.0),
        "restore_ms": p.get("restore", 0.0),
        "vision_ms": p.get("vision", 0.0),
        "prefill_ms": p.get("prefill", 0.0),
        "store_ms": p.get("store", 0.0),
        "ttft_ms": ttft,
        "decode_ms": decode,
        "e2e_ms": r.e2e_ms,
        "prompt_tokens": r.prompt_tokens,
        "prefix_tokens": r.prefix_tokens,
        "cached_tokens": r.cached_tokens,
        "cache_hit": r.cache_hit,
        "engine_detail": r.extra.get("engine_detail", ""),
        "new_tokens": new_tokens,
        "batch_size": r.batch_size,
        "requests_per_s": r.batch_size / (r.e2e_ms / 1e3) if r.e2e_ms > 0 else None,
        "output_tok_s": new_tokens * r.batch_size / (r.e2e_ms / 1e3) if r.e2e_ms > 0 else None,
    }
    if r.cpu_phases_ms is not None:
        c = r.cpu_phases_ms
        cpu_ttft = sum(c.get(k, 0.0) for k in TTFT_PHASES)
        out["cpu_ttft_ms"] = cpu_ttft
        if steps:
            out["cpu_tpot_ms"] = (sum(c.values()) - cpu_ttft) / steps
    if steps:
        out.update(
            tpot_ms=(r.e2e_ms - ttft) / steps,
            itl_p50_ms=statistics.median(r.step_ms),
            itl_p90_ms=percentile(r.step_ms, 90),
            itl_p99_ms=percentile(r.step_ms, 99),
            decode_tok_s=steps * r.batch_size / (decode / 1e3) if decode > 0 else None,
        )
    return out


def phases_total_ms(row: dict) -> float:
    """Sum of the tiled phases; equals e2e_ms up to host overhead outside the timeline."""
    return sum(row[k] or 0.0 for k in ("preprocess_ms", "lookup_ms", "restore_ms", "vision_ms", "prefill_ms", "store_ms",
                                        "decode_ms"))
