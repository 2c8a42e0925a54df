"""Which fused attention kernels torch's scaled_dot_product_attention may pick for calls of few
queries: a policy each engine gets in its spec (bench.engines.spec.EngineSpec.attention; a run's
--attention-kernels), written to env.json and to every row's engine_detail.

On the H200 (torch 2.11) SDPA picks cuDNN for every call. Its one-query kernel (decode) combines
split keys in a varying order: of 50 repeats of one decode call 48 gave a different output,
while its calls of 16 or more queries (prompts, suffixes after a cached prefix, vision towers)
and flash, memory-efficient and math attention repeated exactly
(f67f436:results/h200/attention_determinism.csv). With random weights two logits often nearly tie, so
greedy tokens then change between identical requests and token_agree is partly noise.

- "deterministic" (the default): calls of fewer than FEW_QUERIES new tokens run without cuDNN
  (flash attention without a mask, memory-efficient attention with one); longer calls keep
  torch's choice, which is faster there (cuDNN 19 us a layer for a 627-token prompt against
  flash's 36). The graph engine's compiled one-query steps attend by matmul + softmax instead
  (FastDecoder.one_query_matmul: 11.0 us a layer over 1024 columns, against cuDNN's 9.7 and
  memory-efficient attention's 40.8).
- "auto": torch's own choice everywhere (fastest decode attention, not reproducible).
"""
from __future__ import annotations

from contextlib import contextmanager

from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.errors import UsageError

ATTENTION_KERNELS = ("deterministic", "auto")
# cuDNN repeated exactly at 16, 64 and 627 queries (attention_determinism.csv); 2-15 were not
# measured and are treated as the one-query case
FEW_QUERIES = 16
_REPRODUCIBLE = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def check(choice: str) -> None:
    if choice not in ATTENTION_KERNELS:
        raise UsageError(f"unknown --attention-kernels {choice!r}; choose {' or '.join(ATTENTION_KERNELS)}")


def deterministic(policy: str) -> bool:
    return policy == "deterministic"


@contextmanager
def few_queries(policy: str, n: int):
    """Around eager SDPA calls of `n` new tokens each (decode: 1) under `policy`: without cuDNN
    when deterministic and n < FEW_QUERIES, else unchanged."""
    if not deterministic(policy) or n >= FEW_QUERIES:
        yield
        return
    with sdpa_kernel(_REPRODUCIBLE):
        yield


def describe(policy: str) -> str:
    """What `policy` does, for engine_detail and env.json."""
    if deterministic(policy):
        return f"SDPA without cuDNN below {FEW_QUERIES} queries (deterministic)"
    return "SDPA as torch picks (auto)"


def note(device, policy: str) -> str:
    """", SDPA ..." for an engine_detail on CUDA; nothing elsewhere (the choice is CUDA's)."""
    return f", {describe(policy)}" if device.type == "cuda" else ""
