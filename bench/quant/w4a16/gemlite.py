"""gemlite's Triton W4A16 kernels (Apache-2.0, `pip install gemlite`): GEMV, GEMV with split or
reversed split K, split-K GEMM and GEMM, each over gemlite's own packing of the layer's int4
codes (its (q - z) * s convention is ours, so the same codes, scales and zero points go in).

All share one packed copy per layer (state_key "gemlite"). gemlite imports on CUDA machines only
(it reads the GPU's name at import) and autotunes each kernel per shape on first use: the
measured choice (bench.quant.w4a16.choice) calls every kernel before timing it, so the tuning
is done before any CUDA graph is captured.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from bench.quant.w4a16.base import W4A16Kernel


@lru_cache(maxsize=None)
def _gemlite():
    """(the gemlite module, None) or (None, why it cannot be imported)."""
    try:
        import gemlite
    except Exception as e:  # noqa: BLE001 - not installed, no GPU, a Triton it cannot use
        return None, f"gemlite cannot be imported ({e.__class__.__name__}: {str(e)[:120]}); pip install gemlite"
    return gemlite, None


class Gemlite(W4A16Kernel):
    state_key = "gemlite"

    def __init__(self, matmul_type: str):
        self.matmul_type = matmul_type  # gemlite's name: GEMV, GEMV_REVSPLITK, GEMV_SPLITK, GEMM_SPLITK, GEMM
        self.name = "gemlite-" + matmul_type.lower().replace("_", "-")

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return f"{self.name} runs on CUDA only"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"{self.name} takes float16 or bfloat16 activations, not {dtype}"
        return _gemlite()[1]

    def shape_unsupported(self, layer) -> str | None:
        if layer.in_features % 32 or layer.group_size < 16:
            return f"{self.name} needs in_features % 32 == 0 and groups of 16 or more"
        return None

    def prepare(self, layer, dtype: torch.dtype):
        gemlite, _ = _gemlite()
        t = layer.to_int4()
        dev = layer.packed.device
        kind = gemlite.DType.FP16 if dtype == torch.float16 else gemlite.DType.BF16
        g = gemlite.GemLiteLinear(4, group_size=t.group_size, in_features=layer.in_features,
                                  out_features=layer.out_features, input_dtype=kind, output_dtype=kind)
        g.pack(t.q.to(dev, torch.uint8), t.scale.to(dev, dtype), t.zero.to(dev, dtype), None)
        names = ("W_q", "scales", "zeros", "meta_scale")
        tensors = {n: a.detach() for n, a in zip(names, g.get_tensor_args())}
        return tensors, tuple(int(v) for v in g.get_meta_args())

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        gemlite, _ = _gemlite()
        key = self.state_key
        args = [getattr(layer, f"kernel_{key}_{n}") for n in ("W_q", "scales", "zeros", "meta_scale")]
        kind = gemlite.core.GEMLITE_MATMUL_TYPES_MAPPING[self.matmul_type]
        return gemlite.forward_functional(x.contiguous(), None, args, list(layer.kernel_meta[key]), kind)
