"""Results directories written by the harness's own writers from made-up timings, in the shape a
run writes them: runs.csv through CsvWriter (RUN_COLUMNS), summary.csv through summarize_runs and
write_summary, env.json through write_json. What the report and the notebooks read, without
running a model.

A result is a dict of identity columns (model, variant, engine, cache_state, the workload point,
dtype, ...) and optionally `status` and `error` (a failed or skipped variant writes one row, as
the runner does), `scale` (multiplies every time, so results differ visibly), `kl_mean` and
`token_agree`.
"""
from __future__ import annotations

import random
from pathlib import Path

from bench.measure.results import run_writer, write_json, write_summary
from bench.run.config import RunConfig
from bench.run.summary import summarize_runs

DEFAULTS = {"model": "tiny-llava", "family": "llava", "weights": "random", "variant": "fp16", "engine": "hf",
            "device": "cpu", "dtype": "float32", "cache_state": "none", "batch_size": 1, "question_tokens": None,
            "new_tokens": 8, "num_images": 1, "loader": ""}


def _timings(rng: random.Random, result: dict, spec: dict) -> dict:
    """One request's columns, its phases tiling e2e as the runner's do."""
    scale = spec.get("scale", 1.0)
    jitter = lambda v: v * scale * rng.uniform(0.97, 1.03)  # noqa: E731
    warm = result["cache_state"] == "warm"
    cached = result["cache_state"] in ("cold", "warm")
    new, batch = result["new_tokens"], result["batch_size"]
    p = {"preprocess_ms": jitter(3.0), "lookup_ms": jitter(0.02) if cached else 0.0,
         "restore_ms": jitter(0.3) if warm else 0.0, "vision_ms": 0.0 if warm else jitter(20.0 * batch),
         "prefill_ms": jitter(6.0 if warm else 30.0 * batch), "store_ms": jitter(0.5) if result["cache_state"] == "cold"
         else 0.0, "decode_ms": jitter(10.0 * (new - 1))}
    ttft = sum(v for k, v in p.items() if k not in ("store_ms", "decode_ms"))
    e2e = ttft + p["store_ms"] + p["decode_ms"]
    tpot = (e2e - ttft) / (new - 1)
    quantized = result["variant"].split("+")[0] in ("bnb8", "bnb4", "awq4", "rtn4")
    return {**p, "ttft_ms": ttft, "e2e_ms": e2e, "tpot_ms": tpot, "itl_p50_ms": tpot, "itl_p90_ms": tpot * 1.05,
            "itl_p99_ms": tpot * 1.1, "decode_tok_s": (new - 1) * batch / p["decode_ms"] * 1e3,
            "requests_per_s": batch / e2e * 1e3, "output_tok_s": new * batch / e2e * 1e3, "load_ms": 0.0,
            "stream_ms": e2e, "gpu_phase_pct": 95.0, "prompt_tokens": 106, "prefix_tokens": 79,
            "cached_tokens": 79 if warm else 0, "cache_hit": warm,
            "weight_mb": 0.3 if quantized else 0.76, "token_agree": spec.get("token_agree", 0.75 if quantized else 1.0),
            "kl_mean": spec.get("kl_mean", 0.02 if quantized else 0.0), "engine_kl_mean": 0.02 if quantized else 1e-8,
            "engine_top1_agree": 1.0, "output_text": "random weights"}


def write_results(out: Path, results: list[dict], runs: int = 5, run_id: str = "20260101-000000-abcdef",
                  seed: int = 0) -> Path:
    """A results directory at `out` holding `results` (see the module's doc), `runs` measured runs
    and one warm-up run each."""
    out.mkdir(parents=True)
    rng = random.Random(seed)
    rows = []
    writer = run_writer(out)
    for spec in results:
        result = {**DEFAULTS, **{k: v for k, v in spec.items() if k in DEFAULTS}}
        base = {**result, "run_id": run_id, "timestamp": "2026-01-01T00:00:00+00:00"}
        status = spec.get("status", "ok")
        if status != "ok":
            # the runner's one row for a variant that did not run: identity, status, reason
            row = {k: base[k] for k in ("timestamp", "run_id", "model", "family", "weights", "variant", "engine",
                                        "device", "dtype")}
            rows.append({**row, "status": status, "error": spec.get("error", "")})
            writer.write(rows[-1])
            continue
        for i in range(runs + 1):
            kind = "warmup" if i == 0 else "measured"
            rows.append({**base, "status": "ok", "kind": kind, "run_index": max(i - 1, 0),
                         **_timings(rng, result, spec)})
            writer.write(rows[-1])
    writer.close()
    write_summary(out, summarize_runs(rows, RunConfig(num_runs=runs, min_seconds=0.0)))
    write_json(out / "env.json", {"command": "synthetic results (tests)", "config": {"num_runs": runs}})
    return out
