"""The one definition of every results column and metric, and of a result's identity.

- COLUMNS: every runs.csv column, in file order, with its unit, its direction (higher is
  better: True, lower is better: False, not a metric: None), its meaning and whether
  summary.csv summarises it. RUN_COLUMNS, SUMMARY_METRICS, the regression gate's direction
  (bench.analysis.regress), the console's labels and results/README.md (`python -m bench docs`)
  all come from it.
- RESULT_KEY: the columns that say which result a row belongs to. Rows that differ in any of
  them are never pooled (summaries, compare, report, console). Files written before a column
  existed load with IDENTITY_DEFAULTS for it (fill_identity_columns).

A new column is added here, then written by whatever measures it (bench.measure.metrics for
the per-request timings, bench.run for the rest) and the docs regenerated.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    name: str
    unit: str  # "" for text, identity and flags
    higher_is_better: bool | None  # None: not a metric (identity, facts about the request, text)
    description: str
    summarized: bool = False  # summary.csv has a row per group for it
    label: str = ""  # short title for tables (console); the name when empty

    @property
    def title(self) -> str:
        return self.label or self.name


def _c(name, unit, better, description, summarized=False, label=""):
    return Column(name, unit, better, description, summarized, label)


ENGINES = ("endpoint (an OpenAI-compatible server, measured as its client: `run --endpoint`) | "
           "hf (transformers eager forward + DynamicCache) | static (own decoder over fixed KV buffers, eager) | "
           "graph (static + CUDA graphs: compiled decode step, suffix buckets, one-row prefill per 64-token "
           "bucket, vision tower) | graph-exact (graph doing transformers' arithmetic: logits bit-identical to "
           "hf's, a decode graph per attended length)")

# runs.csv: one row per request (warm-up rows included and labelled), in this column order.
COLUMNS: tuple[Column, ...] = (
    _c("timestamp", "ISO 8601", None, "UTC time the row was written (ISO 8601)"),
    _c("run_id", "", None, "one id per invocation (UTC start time + random suffix), also in env.json: rows of "
                           "two invocations appended to one runs.csv are never summarised together"),
    _c("model", "", None, "preset name or checkpoint directory name"),
    _c("family", "", None, "llava | vila | internvl | internvideo | vita"),
    _c("weights", "", None, "random (preset, or checkpoint written from a preset) | checkpoint (real weights); "
       "endpoint rows: as the server states (vlm-bench serve does), else served"),
    _c("variant", "", None, "variant name: its parts other than the defaults in kind order (weights, cache, "
                            "engine), fp16 first where it names no weights or cache, e.g. fp16, bnb4+prefix, "
                            "fp16+graph"),
    _c("engine", "", None, ENGINES),
    _c("engine_detail", "", None, "how the engine ran this request: decoder, fused projections, what is graphed or "
                                  "compiled, and why anything is not"),
    _c("compiles", "events", None, "torch.compile compilations + CUDA graph captures during this request: warm-up "
                               "covers every shape, so a measured row with any is left out of summary.csv and "
                               "compare (and another clean run is made)"),
    _c("device", "", None, "cuda | cpu"),
    _c("dtype", "", None, "compute dtype of the unquantized parts"),
    _c("worker", "", None, "the process that measured the row: serial (the run's own), local:N (--executor "
                           "local's worker N) or `ray:<node id>` (--executor ray)"),
    _c("host", "", None, "host name of the machine that measured the row"),
    _c("gpu", "", None, "the GPU that measured the row as the machine numbers it (through CUDA_VISIBLE_DEVICES); "
                        "empty on the CPU"),
    _c("status", "", None, "ok | failed | skipped"),
    _c("error", "", None, "why a row is failed or skipped (empty when ok)"),
    _c("kind", "", None, "warmup | measured"),
    _c("run_index", "", None, "index within (variant, kind, cache_state)"),
    _c("question", "", None, "the question asked (the batch's first; warm-up questions are never measured ones)"),
    _c("batch_size", "requests", None, "requests run together as one batch (--batch-size); times are the batch's"),
    _c("question_tokens", "tokens", None, "--prompt-lengths point: questions repeated or cut to this many tokens "
                                          "(the question alone, no special tokens; empty: as written)"),
    _c("num_images", "images", None, "images in each request's prompt (--num-images; video frames are counted in "
                                     "prompt_tokens)"),
    _c("loader", "", None, "video frames: serial (each frame read + preprocessed when needed) | prefetch "
                           "(background thread ahead of the GPU) | empty for other inputs"),
    _c("load_ms", "ms", False, "waiting for the batch's frames from the loader (host clock; 0 for image input)", True),
    _c("stream_ms", "ms", False, "load_ms + e2e_ms: one step of a stream of requests (what GPU utilisation is "
                                 "sampled over)", True),
    _c("gpu_phase_pct", "%", True, "share of stream_ms in the GPU phases (restore + vision + prefill + store + "
                                   "decode), %: the rest is host-only work (reading frames, the image processor, "
                                   "tokenizing, hashing)", True),
    _c("cache_state", "", None, "none (variant keeps no cache) | cold (cache cleared before the run) | warm"),
    _c("cache_hit", "", None, "true when the request reused cached work (prefix KV or image embeddings)"),
    _c("prompt_tokens", "tokens", None, "tokens in the full prompt, image tokens included (a batch: its longest, "
                                        "every row padded to it)"),
    _c("prefix_tokens", "tokens", None, "tokens in the cacheable prefix (system prompt + image + separator)"),
    _c("cached_tokens", "tokens", None, "prompt tokens whose KV came from the prefix cache (not prefilled)"),
    _c("new_tokens", "tokens", None, "generated tokens (fixed: EOS ignored)"),
    _c("preprocess_device", "", None, "where the image processor ran: cpu | cuda (--preprocess; env.json's "
                                       "`preprocess` says why a processor stayed on the host)"),
    _c("preprocess_ms", "ms", False, "image processor (on preprocess_device, waited for) + tokenization (host "
                                     "clock; time it ran under the GPU's work of the phase before counts there, "
                                     "once)", True),
    _c("lookup_ms", "ms", False, "prefix-cache lookup: XXH3 of the image content + key match (0 for variants "
                                 "without a prefix cache)", True),
    _c("restore_ms", "ms", False, "making the request's working cache and copying a cached prefix's keys/values "
                                  "into it (the cost of reuse)", True),
    _c("vision_ms", "ms", False, "vision tower + projector (incl. host->device copy of pixels; ~0 on a cache hit)",
       True, "vision ms"),
    _c("prefill_ms", "ms", False, "LLM forward over the uncached prompt tokens until the first token id is on the "
                                  "host", True, "prefill ms"),
    _c("store_ms", "ms", False, "saving the prefix into the cache after a cold prefill (0 for variants without a "
                                "cache)", True),
    _c("ttft_ms", "ms", False, "request start -> first token id on host = preprocess + lookup + restore + vision + "
                               "prefill", True, "TTFT ms"),
    _c("decode_ms", "ms", False, "sum of the per-token decode steps (new_tokens - 1 steps)", True),
    _c("tpot_ms", "ms", False, "(e2e - ttft) / (new_tokens - 1)", True, "TPOT ms"),
    _c("itl_p50_ms", "ms", False, "median decode-step latency", True),
    _c("itl_p90_ms", "ms", False, "90th percentile decode-step latency"),
    _c("itl_p99_ms", "ms", False, "99th percentile decode-step latency", True, "ITL p99 ms"),
    _c("decode_tok_s", "tokens/s", True, "(new_tokens - 1) x batch_size / decode time: tokens per second over the "
                                         "batch", True, "decode tok/s"),
    _c("requests_per_s", "requests/s", True, "batch_size / e2e time", True, "req/s"),
    _c("output_tok_s", "tokens/s", True, "new_tokens x batch_size / e2e time: generated tokens per second, prefill "
                                         "included", True, "out tok/s"),
    _c("e2e_ms", "ms", False, "request start -> last token on host (wall clock)", True, "e2e ms"),
    _c("cpu_ttft_ms", "ms", False, "CPU device: process CPU time (every thread) over the ttft_ms interval: the "
                                   "work, which another program on the machine barely changes (empty on CUDA)", True),
    _c("cpu_tpot_ms", "ms", False, "CPU device: process CPU time per decode step, over the tpot_ms interval", True),
    _c("calib_ms", "ms", False, "--calibrate: process CPU time of a fixed reference workload "
                                "(bench.measure.calibration), mean of just before and just after the request", True),
    _c("ttft_rel", "x reference", False, "--calibrate: cpu_ttft_ms / calib_ms (comparable across load and machines)",
       True),
    _c("tpot_rel", "x reference", False, "--calibrate: cpu_tpot_ms / calib_ms (comparable across load and machines)",
       True),
    _c("peak_alloc_mb", "MiB", False, "torch.cuda.max_memory_allocated during the request, MiB (empty on CPU)",
       True, "peak MiB"),
    _c("peak_reserved_mb", "MiB", False, "torch.cuda.max_memory_reserved during the request, MiB (empty on CPU)",
       True),
    _c("nvml_used_mb", "MiB", False, "device memory used as NVML reports it (all processes), the larger of its "
                                     "readings just before and just after the request, MiB", True),
    _c("gpu_util_pct", "%", True, "mean of the driver's NVML GPU utilisation samples taken during load + request "
                                  "(stream_ms; its last period's reading when the request was shorter), %",
       True),
    _c("energy_j_per_token", "J/token", False, "NVML total-energy counter delta over load + request / (new_tokens x "
                                               "batch_size), J", True),
    _c("weight_mb", "MiB", False, "bytes of the model's parameters and buffers as loaded, MiB", True, "weights MiB"),
    _c("quantized", "", None, "what a weight variant quantized: none | llm | llm+vision"),
    _c("quantized_layers", "layers", None, "number of linear layers replaced by quantized ones"),
    _c("quantized_layers_mb", "MiB", None, "bytes those layers keep quantized (packed weights + scales), MiB"),
    _c("quantized_layers_fp16_mb", "MiB", None, "bytes the same layers' weights take in fp16, MiB"),
    _c("int4_prefill_copy_mb", "MiB", False, "int4: dense copies of the int4 weights kept for prefill "
                                             "(--int4-prefill-copy; 0 without), included in weight_mb"),
    _c("int4_prefetch_mb", "MiB", False, "int4 on the static and graph engines: the two dense slots prefill "
                                         "weights are dequantized into a layer ahead (--int4-prefetch), not in "
                                         "weight_mb; empty without"),
    _c("int4_kernels", "", None, "int4: the W4A16 kernel each weight shape runs per row count, e.g. '1-4 "
                                 "gemlite-gemv-revsplitk, 5-8 tinygemm, >8 dense' (--int4-kernels; shapes listed as "
                                 "out x in when they differ; dense: dequantize + GEMM)"),
    _c("int4_prefill_kernel", "", None, "int4: what every call above the decode kernels' rows runs (a full "
                                        "prefill, longer suffixes and batched steps): dense (dequantize + GEMM) "
                                        "or a W4A16 kernel (--int4-prefill-kernel; the static and graph engines "
                                        "only, the others run dense)"),
    _c("int4_kernel_mb", "MiB", False, "int4 on the static and graph engines: weights the chosen kernels keep in "
                                       "their own packed format beside the tinygemm-packed ones (gemlite, FBGEMM), not in "
                                       "weight_mb; 0 when none"),
    _c("quant_method", "", None, "how the int4 weights were made: awq | rtn | checkpoint (pre-quantized AWQ)"),
    _c("quant_err_ratio", "ratio", False, "awq4: calibration output error of AWQ divided by that of RTN (lower is "
                                          "better)"),
    _c("quant_source", "", None, "int4: calibrated in this run, or loaded from the saved file named here"),
    _c("quant_group_size", "channels", None, "int4: input channels per scale group as used: --int4-group-size, or "
                                            "for a layer whose in_features it does not divide the largest supported "
                                            "smaller size that does (several values listed as 64,128)"),
    _c("quant_dense_layers", "layers", None, "int4: decoder linears left in --dtype because no supported group size "
                                             "(32, 64, 128, 256) divides their in_features"),
    _c("token_agree", "share (0-1)", True, "share of greedy tokens equal, position by position, to the fp16 "
                                           "baseline's on the fidelity probe", True, "token agree"),
    _c("first_divergence", "token index", None, "index of the first generated token that differs from the baseline "
                                                "(empty: none differ)"),
    _c("divergence_margin", "nats", None, "at first_divergence: the baseline's log-prob margin of its token over the "
                                          "variant's (teacher-forced), nats; ~0 means a near-tie flipped by rounding"),
    _c("divergence_margin_steps", "rounding steps", None, "divergence_margin in rounding steps of the logits' dtype "
                                                          "at the baseline's top logit (fp16 at logit 4: 0.0039); "
                                                          "0-1: tied or adjacent values"),
    _c("ref_near_tie_share", "share (0-1)", None, "share of the baseline's teacher-forced positions whose top-2 "
                                                  "logits are within one rounding step: any engine not "
                                                  "bit-identical to the baseline flips these"),
    _c("kl_mean", "nats", False, "mean KL(baseline || variant) of next-token distributions, teacher-forced on the "
                                 "baseline's continuation", True, "KL mean"),
    _c("engine_kl_mean", "nats", False, "kl_mean with the variant's distributions from its own engine (prefill + "
                                        "one decode step per token, teacher-forced): weights and engine numerics "
                                        "together", True, "engine KL"),
    _c("engine_top1_agree", "share (0-1)", True, "share of teacher-forced positions where the engine's top token "
                                                 "equals the baseline's", True),
    _c("fidelity_probe", "", None, "the question the fidelity columns were measured on (against fp16 weights, hf "
                                   "engine, no cache)"),
    _c("concurrency", "requests", None, "endpoint mode: requests in flight at most (--concurrency); empty in-process"),
    _c("request_rate", "requests/s", None, "endpoint mode: mean arrival rate of the seeded Poisson arrivals "
                                           "(--request-rate; inf: all at once, held to the concurrency)"),
    _c("output_tokens", "tokens", None, "endpoint mode: tokens the server generated (its usage, else the content "
                                        "chunks counted)"),
    _c("server", "", None, "endpoint mode: the server's URL and what it says it is (its `server` header, its "
                           "/version)"),
    _c("server_prefix_hit_rate", "share (0-1)", True, "endpoint mode: prefix-cache hits / lookups over the point's "
                                                      "requests, from the server's /metrics before and after "
                                                      "(vlm-bench serve's counters; vLLM's prefix_cache ones, in "
                                                      "tokens); empty when the server exposes none"),
    _c("server_ttft_ms", "ms", False, "endpoint mode: the server's own time to first token for the request, where "
                                      "the response reports it (vlm-bench serve's `timings`, which also fill the "
                                      "row's preprocess_ms ... store_ms with its engine's phases); ttft_ms minus it "
                                      "is what HTTP, the client and the network add; empty when the response has "
                                      "none (server_mean_ttft_ms may have the point's mean)", True, "server TTFT ms"),
    _c("server_intake_ms", "ms", False, "endpoint mode against vlm-bench serve: the part of server_ttft_ms from the "
                                        "request read to its being queued (parsing, images)"),
    _c("server_queue_ms", "ms", False, "endpoint mode against vlm-bench serve: the part of server_ttft_ms from "
                                       "queued to its batch closing (other requests' batches, the thread's "
                                       "wake-up, the batching window)"),
    _c("server_handoff_ms", "ms", False, "endpoint mode against vlm-bench serve: the part of server_ttft_ms from the "
                                         "engine thread having the first token to its being handed to HTTP (the hop "
                                         "to the event loop)"),
    _c("server_mean_ttft_ms", "ms", False, "endpoint mode: the server's mean time to first token over the point's "
                                           "requests (the same on each of its rows), from its /metrics histogram "
                                           "before and after (vlm-bench serve's vlm_time_to_first_token_seconds, "
                                           "vLLM's time_to_first_token_seconds); not summarized (one value per "
                                           "point, not per request); empty when the server exposes none"),
    _c("slo_met", "", None, "endpoint mode with --slo: the request succeeded within every bound given (e.g. "
                            "ttft_ms=500,tpot_ms=50)"),
    _c("goodput_rps", "requests/s", True, "endpoint mode with --slo: the point's requests that met the SLO per second "
                                          "of the point's wall time (first request sent to last answer)"),
    _c("point_rps", "requests/s", True, "endpoint mode: the point's completed requests per second of its wall time "
                                        "(first request sent to last answer): the server's throughput at the point's "
                                        "concurrency and rate (the same on each of its rows, one sample in a summary "
                                        "or comparison; requests_per_s is one request's)", True, "point req/s"),
    _c("point_output_tok_s", "tokens/s", True, "endpoint mode: the point's completed requests' generated tokens per "
                                               "second of its wall time (the same on each of its rows, one sample)", True,
       "point tok/s"),
    _c("output_text", "", None, "decoded output (first 80 characters; meaningless for random weights)"),
)

BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
RUN_COLUMNS: dict[str, str] = {c.name: c.description for c in COLUMNS}
# Metrics summarised per result (RESULT_KEY, and run_id) in summary.csv, in this order (latency
# first, then throughput, host and GPU facts, memory, fidelity); exactly the `summarized` columns.
SUMMARY_METRICS: list[str] = [
    "ttft_ms", "prefill_ms", "vision_ms", "preprocess_ms", "lookup_ms", "restore_ms", "store_ms", "decode_ms",
    "tpot_ms", "itl_p50_ms", "itl_p99_ms", "decode_tok_s", "requests_per_s", "output_tok_s", "load_ms", "stream_ms",
    "gpu_phase_pct", "e2e_ms", "server_ttft_ms", "point_rps", "point_output_tok_s", "cpu_ttft_ms", "cpu_tpot_ms", "calib_ms", "ttft_rel", "tpot_rel", "peak_alloc_mb", "peak_reserved_mb", "nvml_used_mb", "gpu_util_pct",
    "energy_j_per_token", "weight_mb", "token_agree", "kl_mean", "engine_kl_mean", "engine_top1_agree",
]
assert sorted(SUMMARY_METRICS) == sorted(c.name for c in COLUMNS if c.summarized), "SUMMARY_METRICS != summarized"
# Summarized metrics that are one measurement of a whole point, written on each of its rows: a
# summary and a comparison take one sample of them per point, never its rows as many samples.
POINT_METRICS = ("point_rps", "point_output_tok_s")


# The phases a time is made of: when its cv makes a summary invalid, the phase with the largest
# standard deviation is named (invalid_reason), so host noise is told from device noise.
PHASES_OF = {
    "ttft_ms": ("preprocess_ms", "lookup_ms", "restore_ms", "vision_ms", "prefill_ms"),
    "e2e_ms": ("preprocess_ms", "lookup_ms", "restore_ms", "vision_ms", "prefill_ms", "store_ms", "decode_ms"),
    "stream_ms": ("load_ms", "preprocess_ms", "lookup_ms", "restore_ms", "vision_ms", "prefill_ms", "store_ms",
                  "decode_ms"),
}


def counts_in_summary(row) -> bool:
    """Whether a runs.csv row (dict) is summarised and compared: an ok measured run that neither
    compiled nor captured."""
    compiles = row.get("compiles")
    try:
        compiles = float(compiles) if compiles not in (None, "") else 0.0
    except (TypeError, ValueError):
        compiles = 0.0
    return row.get("status") == "ok" and row.get("kind") == "measured" and not compiles > 0


def counted(df):
    """The rows of a runs DataFrame that counts_in_summary keeps."""
    return df.loc[[counts_in_summary(r) for r in df.to_dict("records")]]


def higher_is_better(name: str) -> bool:
    """The direction of a metric: True when larger values are better. Columns without a
    direction (and names not in the table) count as costs, as ms, MiB and J do."""
    col = BY_NAME.get(name)
    return bool(col and col.higher_is_better)


def title(name: str) -> str:
    """A column's short label for tables (its name when it has none)."""
    col = BY_NAME.get(name)
    return col.title if col else name


# ---- a result's identity --------------------------------------------------------------------
# The workload point: one point of the sweep axes (bench.run.workload.WorkloadPoint has these fields).
WORKLOAD_KEYS = ("batch_size", "question_tokens", "new_tokens", "num_images", "loader")
# Results written before the sweep axes existed ran the default point; new_tokens 0 = unknown.
POINT_DEFAULTS = {"batch_size": 1, "question_tokens": 0, "new_tokens": 0, "num_images": 1, "loader": ""}
assert tuple(POINT_DEFAULTS) == WORKLOAD_KEYS

# Which result a row belongs to, across results directories: what compare matches a baseline's
# rows to a candidate's by, and what summaries, the report and the console never pool across.
RESULT_KEY = ("model", "family", "weights", "variant", "engine", "device", "dtype", "cache_state", *WORKLOAD_KEYS)
# Within one results directory, the invocation too (runs.csv is appended to when a directory is
# reused): summary.csv groups by this. compare pools the runs of one side across run ids.
SUMMARY_KEY = (*RESULT_KEY, "run_id")

# Values for identity columns a results file lacks (written before the column existed) or
# leaves empty: no engine column meant the transformers engine, no cache_state no cache;
# "" is "not recorded" (then such rows match only rows that did not record it either).
IDENTITY_DEFAULTS = {"model": "", "family": "", "weights": "", "variant": "", "engine": "hf", "device": "",
                     "dtype": "", "cache_state": "none", **POINT_DEFAULTS, "run_id": ""}
assert set(IDENTITY_DEFAULTS) == set(SUMMARY_KEY)
# runs.csv's cells that must hold a number (or be empty): the metrics, and the identity columns
# that are counts (a whole number)
RUN_METRICS = frozenset(c.name for c in COLUMNS if c.higher_is_better is not None)
WHOLE_IDENTITY = frozenset(k for k, v in IDENTITY_DEFAULTS.items() if isinstance(v, int))

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
    "excluded": "measured runs left out: they compiled or captured (runs.csv column compiles > 0)",
    "median": "median of the runs", "mean": "mean of the runs",
    "p90": "90th percentile", "p99": "99th percentile", "stdev": "sample standard deviation",
    "ci_low": "bootstrap 95% CI of the median, lower bound", "ci_high": "upper bound",
    "cv": "coefficient of variation (stdev / mean)",
    "measured_s": "wall time of the measured runs summed, s",
    "valid": "n >= --num-runs AND measured_s >= --min-seconds AND cv <= --max-cv",
    "invalid_reason": "why valid is false: each unmet condition, and for a time made of phases (ttft_ms, e2e_ms, "
                      "stream_ms) its noisiest phase with that phase's cv",
    "run_id": "as in runs.csv: runs of different invocations are never pooled",
}
assert set(SUMMARY_KEY) <= set(SUMMARY_COLUMNS)


# A result is valid (the console's and the report's `valid`) when its summaries of these are.
VALIDITY_METRICS = ("ttft_ms", "tpot_ms")


def point_label(row) -> str:
    """A results row's (or summary row's) workload point, e.g. 'b4 n128 q32 img2 prefetch'
    (bench.run.workload.WorkloadPoint.label writes the same)."""
    get = row.get
    parts = [f"b{int(get('batch_size') or 1)}", f"n{int(get('new_tokens') or 0)}"]
    if int(get("question_tokens") or 0):
        parts.append(f"q{int(get('question_tokens'))}")
    if int(get("num_images") or 1) > 1:
        parts.append(f"img{int(get('num_images'))}")
    if get("loader"):
        parts.append(get("loader"))
    return " ".join(parts)


def _fill(df, defaults: dict) -> None:
    for col, default in defaults.items():
        if col not in df:
            df[col] = default
        elif isinstance(default, str):
            df[col] = df[col].astype(object).where(df[col].notna(), default).astype(str)
        else:
            df[col] = df[col].fillna(default).astype(int)


def fill_identity_columns(df) -> None:
    """Give a results DataFrame (runs.csv or summary.csv) every SUMMARY_KEY column, never NaN:
    missing columns and empty cells take IDENTITY_DEFAULTS."""
    _fill(df, IDENTITY_DEFAULTS)


def result_key(row, keys=RESULT_KEY) -> tuple:
    """A row's (dict's) identity as a tuple, in `keys` order."""
    return tuple(row.get(k) for k in keys)
