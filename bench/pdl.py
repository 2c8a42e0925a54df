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
