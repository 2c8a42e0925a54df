"""The one place where result columns and metrics are defined (name, unit, meaning).

results/README.md is generated from these tables (`python -m bench docs`), and a test checks
that every CSV column written is documented here.
"""
from __future__ import annotations

import math
import statistics

from bench.measure.request import RequestResult

# runs.csv: one row per request (warm-up rows included and labelled), in this column order.
RUN_COLUMNS: dict[str, str] = {
    "timestamp": "UTC time the row was written (ISO 8601)",
    "model": "preset name or checkpoint directory name",
    "family": "llava | vila | internvl",
    "weights": "random (preset, or checkpoint written from a preset) | checkpoint (real weights)",
    "variant": "variant spec as given, e.g. fp16, bnb4+prefix",
    "engine": "hf (transformers eager forward + DynamicCache) | static (own decoder over fixed KV buffers, eager) | "
              "graph (static + CUDA graphs: compiled decode step, suffix buckets, one-row prefill per 64-token "
              "bucket, vision tower) | graph-exact (graph doing transformers' arithmetic: logits bit-identical to "
              "hf's, a decode graph per attended length)",
    "engine_detail": "how the engine ran this request: decoder, fused projections, what is graphed or compiled, "
                     "and why anything is not",
    "device": "cuda | cpu",
    "dtype": "compute dtype of the unquantized parts",
    "status": "ok | failed | skipped",
    "error": "why a row is failed or skipped (empty when ok)",
    "kind": "warmup | measured",
    "run_index": "index within (variant, kind, cache_state)",
    "question": "the question asked (the batch's first; warm-up questions are never measured ones)",
    "batch_size": "requests run together as one batch (--batch-size); times are the batch's",
    "question_tokens": "--prompt-lengths point: questions repeated or cut to this many tokens (empty: as written)",
    "num_images": "images in each request's prompt (--num-images; video frames are counted in prompt_tokens)",
    "loader": "video frames: serial (each frame read + preprocessed when needed) | prefetch (background thread "
              "ahead of the GPU) | empty for other inputs",
    "load_ms": "waiting for the batch's frames from the loader (host clock; 0 for image input)",
    "stream_ms": "load_ms + e2e_ms: one step of a stream of requests (what GPU utilisation is sampled over)",
    "gpu_phase_pct": "share of stream_ms in the GPU phases (restore + vision + prefill + store + decode), %: the "
                     "rest is host-only work (reading frames, the image processor, tokenizing, hashing)",
    "cache_state": "none (variant keeps no cache) | cold (cache cleared before the run) | warm",
    "cache_hit": "true when the request reused cached work (prefix KV or image embeddings)",
    "prompt_tokens": "tokens in the full prompt, image tokens included (a batch: its longest, every row padded to it)",
    "prefix_tokens": "tokens in the cacheable prefix (system prompt + image + separator)",
    "cached_tokens": "prompt tokens whose KV came from the prefix cache (not prefilled)",
    "new_tokens": "generated tokens (fixed: EOS ignored)",
    "preprocess_ms": "CPU: image decode + processor + tokenization (host clock)",
    "lookup_ms": "prefix-cache lookup: image-content SHA-256 + key match (0 for variants without a prefix cache)",
    "restore_ms": "copying a cached prefix's keys/values into the request's working cache (the cost of reuse)",
    "vision_ms": "vision tower + projector (incl. host->device copy of pixels; ~0 on a cache hit)",
    "prefill_ms": "LLM forward over the uncached prompt tokens until the first token id is on the host",
    "store_ms": "saving the prefix into the cache after a cold prefill (0 for variants without a cache)",
    "ttft_ms": "request start -> first token id on host = preprocess + lookup + restore + vision + prefill",
    "decode_ms": "sum of the per-token decode steps (new_tokens - 1 steps)",
    "tpot_ms": "(e2e - ttft) / (new_tokens - 1)",
    "itl_p50_ms": "median decode-step latency",
    "itl_p90_ms": "90th percentile decode-step latency",
    "itl_p99_ms": "99th percentile decode-step latency",
    "decode_tok_s": "(new_tokens - 1) x batch_size / decode time: tokens per second over the batch",
    "requests_per_s": "batch_size / e2e time",
    "output_tok_s": "new_tokens x batch_size / e2e time: generated tokens per second, prefill included",
    "e2e_ms": "request start -> last token on host (wall clock)",
    "peak_alloc_mb": "torch.cuda.max_memory_allocated during the request, MiB (empty on CPU)",
    "peak_reserved_mb": "torch.cuda.max_memory_reserved during the request, MiB (empty on CPU)",
    "nvml_used_mb": "peak device memory used as NVML reports it (all processes), MiB",
    "gpu_util_pct": "mean NVML GPU utilisation sampled every 10 ms over load + request (stream_ms), %",
    "energy_j_per_token": "NVML total-energy counter delta over load + request / (new_tokens x batch_size), J",
    "weight_mb": "bytes of the model's parameters and buffers as loaded, MiB",
    "quantized": "what a weight variant quantized: none | llm | llm+vision",
    "quantized_layers": "number of linear layers replaced by quantized ones",
    "quantized_layers_mb": "bytes those layers keep quantized (packed weights + scales), MiB",
    "quantized_layers_fp16_mb": "bytes the same layers' weights take in fp16, MiB",
    "quant_method": "how the int4 weights were made: awq | rtn | checkpoint (pre-quantized AWQ)",
    "quant_err_ratio": "awq4: calibration output error of AWQ divided by that of RTN (lower is better)",
    "quant_source": "int4: calibrated in this run, or loaded from the saved file named here",
    "token_agree": "share of greedy tokens equal, position by position, to the fp16 baseline's on the fidelity probe",
    "first_divergence": "index of the first generated token that differs from the baseline (empty: none differ)",
    "divergence_margin": "at first_divergence: the baseline's log-prob margin of its token over the variant's "
                         "(teacher-forced), nats; ~0 means a near-tie flipped by rounding",
    "divergence_margin_steps": "divergence_margin in rounding steps of the logits' dtype at the baseline's top "
                               "logit (fp16 at logit 4: 0.0039); 0-1: tied or adjacent values",
    "ref_near_tie_share": "share of the baseline's teacher-forced positions whose top-2 logits are within one "
                          "rounding step: any engine not bit-identical to the baseline flips these",
    "kl_mean": "mean KL(baseline || variant) of next-token distributions, teacher-forced on the baseline's continuation",
    "engine_kl_mean": "kl_mean with the variant's distributions from its own engine (prefill + one decode step per "
                      "token, teacher-forced): weights and engine numerics together",
    "engine_top1_agree": "share of teacher-forced positions where the engine's top token equals the baseline's",
    "fidelity_probe": "the question the fidelity columns were measured on (against fp16 weights, hf engine, no cache)",
    "output_text": "decoded output (first 80 characters; meaningless for random weights)",
}

# Metrics summarised per (model, variant, engine, cache_state) in summary.csv.
SUMMARY_METRICS = [
    "ttft_ms", "prefill_ms", "vision_ms", "preprocess_ms", "lookup_ms", "restore_ms", "store_ms", "decode_ms", "tpot_ms",
    "itl_p50_ms", "itl_p99_ms", "decode_tok_s", "requests_per_s", "output_tok_s", "load_ms", "stream_ms", "gpu_phase_pct", "e2e_ms", "peak_alloc_mb", "peak_reserved_mb",
    "nvml_used_mb", "gpu_util_pct", "energy_j_per_token", "weight_mb", "token_agree", "kl_mean",
    "engine_kl_mean", "engine_top1_agree",
]

SUMMARY_COLUMNS: dict[str, str] = {
    "model": "as in runs.csv", "family": "as in runs.csv", "weights": "as in runs.csv",
    "variant": "as in runs.csv", "engine": "as in runs.csv", "device": "as in runs.csv", "dtype": "as in runs.csv",
    "cache_state": "none | cold | warm: cold and warm runs are never pooled",
    "batch_size": "as in runs.csv (workload point)", "question_tokens": "as in runs.csv (workload point)",
    "new_tokens": "as in runs.csv (workload point)", "num_images": "as in runs.csv (workload point)",
    "loader": "as in runs.csv (workload point)",
    "status": "ok | failed | skipped (then metric is empty and error says why)",
    "error": "reason for failed/skipped",
    "metric": "a runs.csv column name (unit in its name)",
    "n": "measured runs summarised",
    "median": "median of the runs", "mean": "mean of the runs",
    "p90": "90th percentile", "p99": "99th percentile", "stdev": "sample standard deviation",
    "ci_low": "bootstrap 95% CI of the median, lower bound", "ci_high": "upper bound",
    "cv": "coefficient of variation (stdev / mean)",
    "measured_s": "wall time of the measured runs summed, s",
    "valid": "n >= --num-runs AND measured_s >= --min-seconds AND cv <= --max-cv",
}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of a non-empty list."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def request_metrics(r: RequestResult, new_tokens: int) -> dict:
    """Derived per-run metrics from one request's timed phases (definitions as RUN_COLUMNS)."""
    p = r.phases_ms
    ttft = sum(p.get(k, 0.0) for k in ("preprocess", "lookup", "restore", "vision", "prefill"))
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
