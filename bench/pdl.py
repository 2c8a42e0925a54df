"""Programmatic dependent launch (PDL, Hopper and later): whether the project's own Triton
kernels launch with it. They do where torch.compile's generated kernels do
(torch._inductor.config.triton.enable_pdl, TORCHINDUCTOR_ENABLE_PDL=1, absent from older torch),
so that one switch covers every kernel of a compiled decode step.

A kernel launched with PDL may start while the kernel before it finishes; it waits
(griddepcontrol.wait, Triton's gdc_wait) before it reads anything that kernel may write or writes
anything at all, and lets the next kernel start (gdc_launch_dependents) once it has. What that
saves is the launch gap between two short kernels, many per decode step.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch
    triton = None


def enabled(device: torch.device) -> bool:
    """Whether kernels launched on `device` now take PDL: a CUDA device of compute capability 9
    or more, and inductor's PDL switch on."""
    if device.type != "cuda" or torch.version.hip:
        return False
    try:
        from torch._inductor import config as inductor_config
    except ImportError:
        return False
    if not getattr(inductor_config.triton, "enable_pdl", False):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


if triton is not None:
    @triton.jit
    def prefetch_l2(ptr, nbytes):
        """The program's first thread asks the L2 cache for [ptr, ptr + nbytes) (sm_90's bulk
        prefetch, one instruction; ptr 16-byte aligned, nbytes a multiple of 16) without waiting
        for it: what a kernel under PDL may read before its wait, of memory no kernel before it writes."""
        tl.inline_asm_elementwise("""{
        .reg .pred p;
        .reg .u32 t;
        mov.u32 t, %tid.x;
        setp.eq.u32 p, t, 0;
        @p cp.async.bulk.prefetch.L2.global [$1], $2;
        mov.u32 $0, 0;
        }""", "=r,l,r", [ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1)
