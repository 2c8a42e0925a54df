"""An engine's knobs, as one frozen value given at construction (`Engine(adapter, policy, spec)`).

Every engine class has its default (`default_spec`); a run replaces the fields its options set
(the attention kernels, the int4 prefetch and kernels: variants.base.EnginePart.spec) and
writes the spec of each engine it uses to env.json. Nothing an engine does depends on
process-wide settings.

The hf engine reads `attention` only; the rest is for the engines over our own decoder
(bench.engines.static and the graph engines).
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.engines import attention_kernels
from bench.engines.fused_linear import FUSED_MAX_ROWS
from bench.pdl import MODES as PDL_MODES

CACHE_ROUND = 256  # buffer length granularity; a longer request reallocates (and recaptures)
SUFFIX_BUCKETS = (16, 32, 64)  # suffix lengths (after a prefix hit) run as padded fixed-shape steps
# A suffix bucket, and the graph engine's decode step, attend over the buffers' columns up to
# their end rounded up to this, not over all of them: cuDNN attention of 32 queries costs 21.9 us
# per layer over 768 columns against 26.9 us over 1024 (f67f436:results/h200/sdpa_backends_h200.csv),
# 0.16 ms of a 7B warm suffix; a decode step reads each row's keys and values up to it.
KEY_ROUND = 128
PREFILL_ROWS = 4096  # a full-prompt prefill's length, for which linears it runs (fused or not)
# GraphEngine captures a full-prompt prefill per prompt length rounded up to this (padding after
# the prompt, which causal attention keeps out of it): a replay costs the host one launch instead
# of the compiled layers' ~500, so prefill time stops depending on host speed (on the H200 the
# uncaptured compiled prefill of llava-1.5-7b varied 16.5-20.6 ms between machines, CV 0.2, with
# 13.9 ms of kernels: f67f436:results/h200/llava-1.5-7b-*-s15, prefill_profile_llava-1.5-7b.csv).
PREFILL_ROUND = 64
# GraphEngine also captures a whole batch's full-prompt prefill, laid out at its prompts' longest
# length rounded up the same way (the rows' gaps widened), up to this many tokens (batch x that
# length): uncaptured, vila1.5-3b's batch-4 prefill of 4 x 247 tokens took 21.5-26.5 ms on an H100,
# no less than batch 8's 21.8 ms and with a CV of 0.07: the host's launches, not the GPU, set it
# (one row took 4.1 ms captured; cf5ae3d:results/reference/h100/vila1.5-3b-int4-graph-batch);
# captured, 10.8 ms with a CV of 0.003 (f1e1e1d:results/reference/h100/vila1.5-3b-int4-graph-batch). Longer
# batches keep the GPU busy past the host's launches, and their graphs' activations would hold more
# memory.
BATCH_PREFILL_TOKENS = 4096

# How traced (torch.compile'd) layers compute RMSNorm and SiLU-gating (`FastDecoder.numerics`):
#  "fused": the modules as written; inductor fuses them and skips eager's fp16 roundings between ops.
#  "eager-casts": eager's formulas op by op, for inductor's emulate_precision_casts to round where
#    eager does (the compiling engine turns that option on); only the fp32 mean of RMSNorm sums in
#    inductor's order.
#  "eager-exact": also that mean in eager's own summation order (an opaque op, eager_row_mean:
#    ATen's kernel, or on CUDA bench.engines.row_mean's where it matched it): bit-identical to eager, on
#    the CPU and on the H200 (llava-1.5-7b decode
#    layers: 0 of their outputs differ, against 0.92% eager-casts and 48% fused, with
#    deterministic attention kernels: f67f436:results/h200/compile_numerics_llava-1.5-7b-deterministic.csv;
#    the 0.03% measured earlier with cuDNN attention was that kernel's run-to-run noise).
NUMERICS = ("fused", "eager-casts", "eager-exact")
# How the graph engines' compiled one-query steps attend: "matmul" (FastDecoder._matmul_attention),
# "split-kv" (bench.engines.split_kv_attention: Triton, the keys read in splits at once) or "auto"
# (split-kv where it runs, CUDA with Triton and a power-of-two head size, under deterministic attention
# kernels; else the matmul path: split-kv gave the lower TPOT at every batch
# size measured, results/reference/h100/llava-1.5-7b-int4-graph-batch-splitkv against the run beside it)
DECODE_ATTENTION = ("auto", "matmul", "split-kv")


@dataclass(frozen=True)
class EngineSpec:
    # SDPA kernels for calls of few queries (bench.engines.attention_kernels): "deterministic" or "auto"
    attention: str = "deterministic"
    # how compiled layers round (NUMERICS); engines that compile nothing ignore it
    numerics: str = "fused"
    # how compiled one-query decode steps attend (DECODE_ATTENTION); engines that compile nothing ignore it
    decode_attention: str = "auto"
    # programmatic dependent launch of compiled steps' kernels and the project's Triton kernels
    # (bench.pdl.MODES: auto = where the GPU and torch have it, or off); set when an engine is made
    pdl: str = "auto"
    # above this many input rows q/k/v and gate/up run as their separate modules (fused_linear)
    fused_max_rows: int = FUSED_MAX_ROWS
    suffix_buckets: tuple[int, ...] = SUFFIX_BUCKETS
    cache_round: int = CACHE_ROUND
    key_round: int = KEY_ROUND
    prefill_rows: int = PREFILL_ROWS
    # a captured one-row prefill's length granularity (graph engines; 1: every prompt length)
    prefill_round: int = PREFILL_ROUND
    # a whole batch's prefill is captured up to this many tokens, batch x padded length (graph engine; 0: never)
    batch_prefill_tokens: int = BATCH_PREFILL_TOKENS
    # a step's separate projections side by side on CUDA side streams (graph-exact)
    concurrent_projections: bool = False
    # int4 weights: a side stream dequantizes the next layer's prefill weights (bench.quant.prefetch),
    # where the engine's prefill runs the dense path (see int4_prefill_kernel)
    int4_prefetch: bool = True
    # int4 weights: the kernel per row count of the step's linears (bench.quant.w4a16.choice:
    # tinygemm | measured | a kernel's name) and the file measurements are kept in ('' = not kept)
    int4_kernels: str = "tinygemm"
    int4_kernel_cache: str = ""
    int4_kernel_candidates: tuple[str, ...] = ()  # the kernels `measured` chooses from (empty: all)
    # the graph engine's step layer (graph-exact's makes transformers' additions: not this) makes
    # each RMSNorm with the residual add before it, and where an int4 o_proj or down_proj runs
    # triton-f16x2 (one row) that kernel does both in its launch, and the fused gate/up projection's
    # SiLU(gate) * up in its own (FastDecoder.layer_at_folded, _gated; FastDecoder.fold_gate);
    # off: layer_at_deferred. The kernel's mean sums in its own order, so under "eager-exact"
    # numerics the norms stay kernels of their own. The awq4/rtn4 variants set it on by default
    # (--int4-fold-norms); fp16 runs leave it off (no kernel there folds anything).
    fold_norms: bool = False
    # int4 weights: the kernel every call above the decode kernels' rows runs (a full prefill,
    # longer suffixes and batched steps; "dense": dequantize + GEMM)
    int4_prefill_kernel: str = "dense"

    def __post_init__(self):
        attention_kernels.check(self.attention)
        if self.numerics not in NUMERICS:
            raise ValueError(f"unknown numerics {self.numerics!r}; choose from {', '.join(NUMERICS)}")
        if self.decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"unknown decode attention {self.decode_attention!r}; choose from "
                             f"{', '.join(DECODE_ATTENTION)}")
        if self.pdl not in PDL_MODES:
            raise ValueError(f"unknown PDL mode {self.pdl!r}; choose from {', '.join(PDL_MODES)}")
        buckets = tuple(self.suffix_buckets)
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"suffix buckets must be distinct positive lengths in ascending order, got {buckets}")
        object.__setattr__(self, "suffix_buckets", buckets)
        if (min(self.cache_round, self.key_round, self.prefill_round, self.prefill_rows) < 1 or self.fused_max_rows < 0
                or self.batch_prefill_tokens < 0):
            raise ValueError(f"engine spec with a round below 1, or a negative fused_max_rows or "
                             f"batch_prefill_tokens: {self}")
