"""gemlite's Triton W4A16 kernels (Apache-2.0, `pip install gemlite`): GEMV, GEMV with split or
reversed split K, split-K GEMM and GEMM, each over gemlite's own packing of the layer's int4
codes: the codes (uint8 [N, K]), scales and integer zero points ([N, K/group], the activation
dtype) go in as they are, packed with fma_mode=False so the kernels compute (q - z) * s as ours
do (gemlite's default folds the zero point into -z * s rounded to the activation dtype and
computes q * s + that: in bfloat16 up to 6% of a quantization step off).

All share one packed copy per layer (state_key "gemlite"). gemlite imports on CUDA machines only
(it reads the GPU's name at import; it ships tuned configurations for a few GPUs, matched by
name, and tunes on others). Its kernels autotune on their first call at each shape and row
count (the three GEMVs key on the exact row count, the two GEMMs on a bucket of it; gemlite
0.6.0.post2, triton_kernels/*_kernels.py KEYS), benchmarking each candidate configuration (over
bench.quant.w4a16.base.autotune_bench's 15 ms, not Triton's default 125) with host
synchronization, which a CUDA graph capture cannot contain: a layer given a gemlite kernel is
therefore called once at every row count it serves when the kernel is chosen (W4A16Kernel.tunes_per_rows), and a tuning
that still falls inside a measured run is counted as one-time work (compile_events, the
autotuners' cache sizes). In bfloat16 the GEMVs' split-K sums use fp32 atomics, not bfloat16
ones (gemlite.set_native_atomic_bfp16(False)): rounded bfloat16 adds over K = 11008 cost about
1.5% of |y|. A call is gemlite's registered op (torch.ops.gemlite.forward_functional), which
torch.compile keeps in its graph as one opaque call.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from bench.measure import compile_events
from bench.quant.w4a16.base import W4A16Kernel, autotune_bench, cuda_half_unavailable

# gemlite's own dispatch sends 4-bit weights to a GEMV up to 4 rows (gemlite.core.get_matmul_type);
# a GEMV's time grows with the rows (it reads the weight once per row block), so above that it is
# neither tuned nor timed
GEMV_ROWS = 4
_TENSORS = ("W_q", "scales", "zeros", "meta_scale")  # GemLiteLinear.get_tensor_args(), in its order


@lru_cache(maxsize=None)
def _gemlite():
    """(the gemlite module, None) or (None, why it cannot be imported)."""
    try:
        import gemlite
        from gemlite.triton_kernels import gemm_kernels, gemm_splitK_kernels, gemv_kernels, gemv_revsplitK_kernels
        from gemlite.triton_kernels import gemv_splitK_kernels
    except Exception as e:  # noqa: BLE001 - not installed, no GPU, a Triton it cannot use
        return None, f"gemlite cannot be imported ({e.__class__.__name__}: {str(e)[:120]}); pip install gemlite"
    gemlite.set_native_atomic_bfp16(False)
    # each module's entry point holds its Triton autotuners in `.kernel`; an autotuner's `cache`
    # gains one entry per key it tuned (gemlite 0.6.0.post2 reads them so in core.cache_config)
    tuners = [k for entry in (gemv_kernels.gemv, gemv_revsplitK_kernels.gemv_revsplitK,
                              gemv_splitK_kernels.gemv_splitK, gemm_splitK_kernels.gemm_splitK, gemm_kernels.gemm)
              for k in entry.kernel]
    compile_events.add_counter("gemlite autotuning", lambda: sum(len(getattr(k, "cache", {})) for k in tuners))
    for k in tuners:  # gemlite builds its autotuners with Triton's default benchmark (25 + 100 ms per
        if hasattr(k, "_do_bench"):  # configuration); Triton 3.x keeps the one it runs here
            k._do_bench = autotune_bench
    return gemlite, None


class Gemlite(W4A16Kernel):
    state_key = "gemlite"
    tunes_per_rows = True

    def __init__(self, matmul_type: str):
        self.matmul_type = matmul_type  # gemlite's name: GEMV, GEMV_REVSPLITK, GEMV_SPLITK, GEMM_SPLITK, GEMM
        self.name = "gemlite-" + matmul_type.lower().replace("_", "-")
        if matmul_type.startswith("GEMV"):
            self.max_rows = GEMV_ROWS

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return cuda_half_unavailable(self.name, device, dtype) or _gemlite()[1]

    def shape_unsupported(self, layer) -> str | None:
        if layer.in_features % 32 or layer.group_size < 16:
            return f"{self.name} needs in_features % 32 == 0 and groups of 16 or more"
        return None

    def prepare(self, layer, dtype: torch.dtype):
        """gemlite's packing of the layer's codes; meta: (its meta arguments, {matmul type: the
        index forward_functional takes}), both plain values read when a call is traced."""
        gemlite, _ = _gemlite()
        t = layer.to_int4()
        dev = layer.packed.device
        kind = gemlite.DType.FP16 if dtype == torch.float16 else gemlite.DType.BF16
        g = gemlite.GemLiteLinear(4, group_size=t.group_size, in_features=layer.in_features,
                                  out_features=layer.out_features, input_dtype=kind, output_dtype=kind)
        g.pack(t.q.to(dev, torch.uint8).contiguous(), t.scale.to(dev, dtype).contiguous(),
               t.zero.to(dev, dtype).contiguous(), None, fma_mode=False)
        tensors = {n: a.detach() for n, a in zip(_TENSORS, g.get_tensor_args())}
        index = dict(gemlite.core.GEMLITE_MATMUL_TYPES_MAPPING)
        return tensors, (tuple(int(v) for v in g.get_meta_args()), index)

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        key = self.state_key
        args = layer.kernel_state(key, *_TENSORS)
        meta, index = layer.kernel_meta[key]
        x = x.to(args[1].dtype).contiguous()  # the activation dtype it was packed for (its scales')
        return torch.ops.gemlite.forward_functional(x, None, args, list(meta), index[self.matmul_type])
