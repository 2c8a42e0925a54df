"""The project's f16x2 Triton GEMV (bench.quant.triton_f16x2) on the layer's packed weight, for one
row (a batch-1 decode step): `triton-f16x2` (one program per block of weight rows and all of K,
or per block and share of K where its tuning finds a split faster: bench.quant.triton_f16x2.SPLITS)
and `triton-f16x2-splitk` (K split in shares always; the shares' fp32 sums added by the program
that finishes last, in order, in 1 MB of scratch per GPU, bench.quant.triton_f16x2._scratch).

They read the tiles triton-tiles reads, and are its kernel class with their own limits. The
kernel multiplies by fp16 scales and zeros: where the layer keeps them in bfloat16 (what tinygemm
takes on CUDA builds without a float16 kernel, e.g. torch 2.11 on an H100), both hold one float16
copy of them (state key "f16x2", [K / group, N, 2]: 1/16 of the int4 weight's bytes at groups of
128, counted in int4_kernel_mb). The copy is exact for every bfloat16 value in float16's normal
range; the dense path rounds the weights it makes to float16 too.

A call is one registered op (vlm_bench::int4_f16x2_mm), which torch.compile keeps in its graph as
one opaque call; so is a call that also adds its output to the residual stream and normalizes the
sum (vlm_bench::int4_f16x2_mm_add_norm, `run_add_norm`: a decoder layer's o_proj or down_proj
followed by the next RMSNorm, in one launch: bench.quant.triton_f16x2._add_norm), and one that
applies SiLU to a fused gate/up projection's gate half and multiplies by its up half
(vlm_bench::int4_f16x2_mm_gated, `run_gated`: bench.quant.triton_f16x2._gated). All tune on
the first call at each shape (host-synchronized), so a layer given one is called once when it is
chosen (tunes_per_rows), before any capture; the gated op, which that call does not run (a
layer does not know it is a gate/up pair), tunes on the graph engine's first call of its step,
in the warm-ups before the capture (never inside one: the tuning refuses). A tuning that still
falls inside a measured run is counted as one-time work (compile_events).
"""
from __future__ import annotations

import torch

from bench.quant.w4a16.base import triton_module
from bench.quant.w4a16.tiles import Tiles, tiles_op


@torch.library.custom_op("vlm_bench::int4_f16x2_mm_add_norm", mutates_args=())
def _mm_add_norm(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, out_features: int,
                 group_size: int, split_k: bool, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    module = triton_module(F16x2.module, F16x2.counter)[0]
    return module.f16x2_mm_add_norm(x, packed, scale_and_zero, out_features, group_size, split_k, residual, weight,
                                    eps)


@_mm_add_norm.register_fake
def _(x, packed, scale_and_zero, out_features, group_size, split_k, residual, weight, eps):
    return residual.new_empty(1, out_features), residual.new_empty(1, out_features)


@torch.library.custom_op("vlm_bench::int4_f16x2_mm_gated", mutates_args=())
def _mm_gated(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, out_features: int,
              group_size: int, split_k: bool) -> torch.Tensor:
    module = triton_module(F16x2.module, F16x2.counter)[0]
    return module.f16x2_mm_gated(x, packed, scale_and_zero, out_features, group_size, split_k)


@_mm_gated.register_fake
def _(x, packed, scale_and_zero, out_features, group_size, split_k):
    return x.new_empty(1, out_features // 2)


class F16x2(Tiles):
    max_rows = 1  # a GEMV of one row (more run row by row): measured at one row only
    family = "triton-f16x2"
    module, counter = "triton_f16x2", "int4 f16x2 tuning"
    op = tiles_op("int4_f16x2_mm", module, counter, "f16x2_mm")
    state_key = "f16x2"  # a float16 copy of the scales and zeros, where the layer's are not float16
    launches_pdl = True  # bench.quant.triton_f16x2 under bench.pdl
    settings_before = {"k_loops": ["1"]}  # measured before its tuning chose among K loops

    def timing_settings(self) -> dict | None:
        """The K loops its tuning chooses from (bench.quant.triton_f16x2.K_LOOPS, sorted), how it
        tunes: "graph" (bench.quant.triton_f16x2._tune; a measurement without it was of the
        configuration Triton's autotuner chose), and the K splits it tries where it tries any (a
        measurement without them was of no split, or for triton-f16x2-splitk of its shares' sums
        added by atomics, up to afcdc78)."""
        module = triton_module(self.module, self.counter)[0]
        if module is None:
            return None
        settings = {"k_loops": list(module.k_loops()), "tuning": "graph"}
        splits = module.SPLIT_SHARES if self.split_k else module.splits()
        if splits:  # (none: as before the tuning could split)
            settings["splits"] = list(splits)
        return settings

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        why = super().unavailable(device, dtype)
        if why is None and dtype != torch.float16:
            why = f"{self.name} computes in f16x2 (float16 activations), not {dtype}"
        return why

    def shape_unsupported(self, layer) -> str | None:
        if why := super().shape_unsupported(layer):
            return why
        if layer.group_size % 128:
            return f"{self.name} takes groups of a multiple of 128 inputs, not {layer.group_size}"
        return None

    def prepare(self, layer, dtype: torch.dtype):
        """The float16 copy of the scales and zeros, none where the layer's are float16."""
        if layer.scale_and_zero.dtype == torch.float16:
            return {}, None
        return {"scale_and_zero": layer.scale_and_zero.to(torch.float16)}, "copy"

    def scale_and_zero(self, layer) -> torch.Tensor:
        """The float16 scales and zeros the kernel reads: the layer's, the copy it holds, or (a
        call before the layer was given the kernel) one made for this call alone."""
        if layer.kernel_meta.get(self.state_key) == "copy":
            return layer.kernel_state(self.state_key, "scale_and_zero")[0]
        return layer.scale_and_zero.to(torch.float16)

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.op(x.contiguous(), layer.packed, self.scale_and_zero(layer), layer.out_features,
                       layer.group_size, self.split_k)

    def run_add_norm(self, layer, x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + layer(x), norm(residual + layer(x))) for one row x [1, in_features] (float16),
        `norm` an RMSNorm (weight, variance_epsilon), in one launch."""
        return torch.ops.vlm_bench.int4_f16x2_mm_add_norm(
            x.contiguous(), layer.packed, self.scale_and_zero(layer), layer.out_features, layer.group_size,
            self.split_k, residual, norm.weight, norm.variance_epsilon)

    def run_gated(self, layer, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up [1, out_features / 2] for one row x [1, in_features] (float16) of a fused
        gate/up layer (its first half of rows the gate's), in one launch."""
        return torch.ops.vlm_bench.int4_f16x2_mm_gated(x.contiguous(), layer.packed, self.scale_and_zero(layer),
                                                        layer.out_features, layer.group_size, self.split_k)
