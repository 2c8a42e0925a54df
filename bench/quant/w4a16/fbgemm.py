"""FBGEMM's CUTLASS mixed-input int4 kernels (`pip install fbgemm-gpu-genai`, BSD): bfloat16
activations times int4 weights with a bfloat16 scale and zero per group. torchao 0.18's
Int4Tensor / Int4PreshuffledTensor call the same kernels under MSLK's op names
(torch.ops.mslk.bf16i4bf16_rowwise / _shuffled / preshuffle_i4: same schemas, same formats).

Their format is tinygemm's convention, w = (q - 8) * scale + zero, so the layer's own codes and
scale_and_zero pairs go in exactly (the codes recentred to int8 and packed two per byte by
FBGEMM's pack_int4; the scales and zeros rounded to bfloat16):
- `fbgemm-rowwise`: `bf16i4bf16_rowwise` on the packed codes as they are;
- `fbgemm-shuffled`: `bf16i4bf16_shuffled` on the codes FBGEMM's `preshuffle_i4` reorders (a
  bfloat16 scale comes back as it went in; the zero is never reordered, as in torchao's
  Int4PreshuffledTensor), groups of 128 or more as FBGEMM's quantize_int4_preshuffle asks.
Both are one CUTLASS SM90 kernel (TMA, warp-specialized wgmma; K tile 64): Hopper only, and a
group must span whole K tiles. FBGEMM does not check that at the call (it never asks CUTLASS's
can_implement), so shape_unsupported refuses other group sizes here. Activations of another
dtype are cast to bfloat16 and the output back (Int4Linear.run_kernel does the latter).
FBGEMM 1.6.0 registers no fake (meta) implementation of bf16i4bf16_shuffled, which torch.compile
needs to trace a call: one is registered here, giving the output's shape and dtype.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from bench.quant.w4a16.base import W4A16Kernel


@lru_cache(maxsize=None)
def _gen_ai():
    """(FBGEMM's gen_ai quantize module, None) or (None, why it cannot be used)."""
    try:
        # (the package's __init__, run by this import, registers torch.ops.fbgemm's gen_ai kernels)
        from fbgemm_gpu.experimental.gen_ai import quantize
    except Exception as e:  # noqa: BLE001 - not installed, or built for another torch / CUDA
        return None, (f"FBGEMM gen_ai cannot be imported ({e.__class__.__name__}: {str(e)[:120]}); "
                      "pip install fbgemm-gpu-genai (the build for this torch)")
    _register_fakes()
    return quantize, None


def _register_fakes() -> None:
    """A fake implementation of each op that lacks one (torch.compile traces calls with it)."""
    for op in ("bf16i4bf16_rowwise", "bf16i4bf16_shuffled"):
        if not hasattr(torch.ops.fbgemm, op) or torch._C._dispatch_has_kernel_for_dispatch_key(f"fbgemm::{op}",
                                                                                               "Meta"):
            continue
        torch.library.register_fake(f"fbgemm::{op}")(
            lambda X, W, w_scale_group, w_zero_group: X.new_empty((*X.shape[:-1], W.shape[0]), dtype=torch.bfloat16))


K_TILE = 64  # the kernels' K tile (128 bytes of bfloat16): CUTLASS takes groups of whole tiles
SHUFFLED_MIN_GROUP = 128


def arch_unsupported(name: str, capability: tuple[int, int]) -> str | None:
    """Why kernel `name` cannot run on a GPU of `capability`: SM90 (wgmma) code runs on Hopper
    alone, neither on earlier GPUs nor on Blackwell (sm_90a code is not forward compatible)."""
    if capability[0] != 9:
        return f"{name} needs a Hopper GPU (compute capability 9.x), not {capability[0]}.{capability[1]}"
    return None


class Fbgemm(W4A16Kernel):
    def __init__(self, op: str, shuffled: bool):
        self.op, self.shuffled = op, shuffled
        self.name = "fbgemm-shuffled" if shuffled else "fbgemm-rowwise"
        self.state_key = self.name.replace("-", "_")

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return f"{self.name} runs on CUDA only"
        why = arch_unsupported(self.name, torch.cuda.get_device_capability(device)) or _gen_ai()[1]
        if why is None and not hasattr(torch.ops.fbgemm, self.op):
            why = f"this FBGEMM build has no {self.op}"
        return why

    def shape_unsupported(self, layer) -> str | None:
        g = layer.group_size
        if self.shuffled and g < SHUFFLED_MIN_GROUP:
            return f"{self.name} needs groups of {SHUFFLED_MIN_GROUP} or more, not {g}"
        if g % K_TILE and g != layer.in_features:
            return f"{self.name} needs groups of a multiple of {K_TILE} inputs (its K tile), not {g}"
        return None

    def prepare(self, layer, dtype: torch.dtype):
        quantize, _ = _gen_ai()
        dev = layer.packed.device
        q = (layer.to_int4().q - 8).to(torch.int8).to(dev)
        sz = layer.scale_and_zero  # [K/G, N, 2]: (scale, zero) of w = (q - 8) * scale + zero
        scale = sz[..., 0].to(torch.bfloat16).contiguous()
        zero = sz[..., 1].to(torch.bfloat16).contiguous()
        wq = quantize.pack_int4(q)
        if self.shuffled:
            # it reorders wq in place on CUDA's legacy default stream: nothing else may be pending
            torch.cuda.current_stream(dev).synchronize()
            wq, scale = torch.ops.fbgemm.preshuffle_i4(wq, scale)
        return {"wq": wq, "scale": scale, "zero": zero}, None

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        key = self.state_key
        wq, scale, zero = layer.kernel_state(key, "wq", "scale", "zero")
        return getattr(torch.ops.fbgemm, self.op)(x.to(torch.bfloat16).contiguous(), wq, scale, zero)
