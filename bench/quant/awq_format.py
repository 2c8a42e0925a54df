"""The AutoAWQ "GEMM" checkpoint format, read and written (AutoAWQ itself is archived; its CUDA
kernels do not build for torch 2.11 + CUDA 13, so the format is implemented here).

Per quantized linear with in_features K, out_features N, group size G:
- `qweight` int32 [K, N/8]: row k packs the int4 values of outputs 8j..8j+7, nibble i (bits
  4i..4i+3) holding output 8j + ORDER[i], ORDER = (0, 2, 4, 6, 1, 3, 5, 7);
- `qzeros`  int32 [K/G, N/8]: the integer zero points, packed the same way;
- `scales`  fp16  [K/G, N];
- dequantized weight W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n].
config.json carries quantization_config {"quant_method": "awq", "version": "gemm", "bits": 4,
"group_size": G, "zero_point": true, "modules_to_not_convert": [...]}.
"""
from __future__ import annotations

import torch

from bench.quant.int4 import Int4Tensors

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column ORDER[i] of each group of 8
SUFFIXES = ("qweight", "qzeros", "scales")


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """int [R, C] (0..15) -> int32 [R, C/8] in AWQ's interleaved nibble order (on the input's
    device; int32 shifts and ORs, a tenth of the time int64 sums took on the CPU: a 7B model's
    weights are packed whenever its int4 copy is saved)."""
    r, c = values.shape
    if c % 8:
        raise ValueError(f"AWQ packing needs a multiple of 8 columns, got {c}")
    v = values.to(torch.int32).view(r, c // 8, 8)
    packed = torch.zeros(r, c // 8, dtype=torch.int32, device=values.device)
    for nibble, column in enumerate(AWQ_ORDER):
        packed |= v[..., column] << (4 * nibble)  # nibble 7 sets the sign bit: int32's two's complement
    return packed


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] -> int32 [R, C] (0..15), undoing AWQ's nibble order (on the input's device)."""
    r, c8 = packed.shape
    packed = packed.to(torch.int32)
    out = torch.empty(r, c8, 8, dtype=torch.int32, device=packed.device)
    for nibble, column in enumerate(AWQ_ORDER):
        out[..., column] = (packed >> (4 * nibble)) & 15  # the arithmetic shift's sign bits masked off
    return out.view(r, c8 * 8)


def to_awq_gemm(t: Int4Tensors) -> dict[str, torch.Tensor]:
    """Int4Tensors (q [N, K]) -> {'qweight', 'qzeros', 'scales'}."""
    return {
        "qweight": pack_columns(t.q.t().contiguous()),
        "qzeros": pack_columns(t.zero.t().contiguous()),
        "scales": t.scale.t().contiguous().to(torch.float16),
    }


def from_awq_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  device: torch.device | str = "cpu") -> Int4Tensors:
    """{'qweight', 'qzeros', 'scales'} -> Int4Tensors on `device` (unpacked there: the layer's
    device is faster than the host for a 7B model's weights)."""
    q = unpack_columns(qweight.to(device)).t().contiguous()  # [N, K]
    zero = unpack_columns(qzeros.to(device)).t().contiguous()  # [N, K/G]
    k = qweight.shape[0]
    groups = scales.shape[0]
    if k % groups or scales.shape[1] != q.shape[0] or qzeros.shape[0] != groups:
        raise ValueError(f"inconsistent AWQ tensors: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)}")
    return Int4Tensors(q, scales.t().float().contiguous().to(device), zero, k // groups)


def awq_quantization_config(group_size: int, not_converted: list[str]) -> dict:
    return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group_size,
            "zero_point": True, "modules_to_not_convert": not_converted}


def check_awq_config(qc: dict) -> int:
    """The group size of a supported AWQ quantization_config, or ValueError saying why not."""
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm" or int(qc.get("bits", qc.get("w_bit", 4))) != 4 or not qc.get("zero_point", True):
        raise ValueError(f"only AutoAWQ GEMM 4-bit with zero points is supported, got {qc}")
    return int(qc.get("group_size", qc.get("q_group_size", 128)))
