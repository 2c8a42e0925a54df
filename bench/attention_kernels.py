"""Which fused attention kernels torch's scaled_dot_product_attention may pick: one run-wide
setting (--attention-kernels), written to env.json and to every row's engine_detail.

- "deterministic" (the default): cuDNN attention off, so SDPA picks flash attention (no mask) or
  memory-efficient attention (a mask), both of which give the same output for the same input.
  On the H200 (torch 2.11) torch otherwise picks cuDNN for every call, and cuDNN's one-query
  kernel (decode) combines its split keys in a varying order: repeating one call changes a few
  output elements (results/h200/attention_determinism.csv), so transformers' own greedy tokens
  change between identical requests wherever two logits nearly tie, and token_agree measured
  against such a baseline is partly noise.
- "auto": torch's own choice (cuDNN first where available; fastest, not reproducible).

The static engines' compiled steps attend by matmul + softmax (FastDecoder._matmul_attention),
which is deterministic either way; with cuDNN off their one-query decode attention uses it too
(memory-efficient attention would be ~4x slower there, results/h200/sdpa_backends_h200.csv).
"""
from __future__ import annotations

import torch

from bench.errors import UsageError

ATTENTION_KERNELS = ("deterministic", "auto")


def use(choice: str) -> None:
    """Apply `choice` (process-wide, as torch's own SDPA switches are)."""
    if choice not in ATTENTION_KERNELS:
        raise UsageError(f"unknown --attention-kernels {choice!r}; choose {' or '.join(ATTENTION_KERNELS)}")
    torch.backends.cuda.enable_cudnn_sdp(choice == "auto")


def cudnn_allowed() -> bool:
    return torch.backends.cuda.cudnn_sdp_enabled()


def describe() -> str:
    """The CUDA SDPA kernels allowed now, e.g. 'SDPA flash/efficient/math'."""
    b = torch.backends.cuda
    allowed = [name for name, on in (("cudnn", b.cudnn_sdp_enabled()), ("flash", b.flash_sdp_enabled()),
                                     ("efficient", b.mem_efficient_sdp_enabled()), ("math", b.math_sdp_enabled()))
               if on]
    return "SDPA " + "/".join(allowed)


def note(device: torch.device) -> str:
    """", SDPA ..." for an engine_detail on CUDA; nothing elsewhere (the switches are CUDA's)."""
    return f", {describe()}" if device.type == "cuda" else ""
