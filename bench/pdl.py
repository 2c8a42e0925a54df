"""Programmatic dependent launch (PDL, Hopper and later) of a compiled decode step's kernels:
torch.compile's generated kernels (inductor's switch, torch._inductor.config.triton.enable_pdl,
absent from older torch) and the project's own Triton kernels (triton-f16x2, split-KV attention),
which launch with it exactly where inductor's do, so one switch covers the step. The engines set
it from their spec (`--pdl auto|off`) when they are made (`configure`).

A kernel launched with PDL may start while the kernel before it finishes; it waits
(griddepcontrol.wait, Triton's gdc_wait) before it reads anything that kernel may write or writes
anything at all, and lets the next kernel start (gdc_launch_dependents) once it has (the
project's kernels, with LATE, after their main loop instead). Before the wait the project's
kernels can ask the L2 cache for their weights, or their split's keys and values (PREFETCH;
`prefetch_l2`: a hint that only warms L2, where a write of the kernel before lands whenever it
comes), or read into registers what no kernel writes (triton-f16x2's PRELOAD: its weights) or
what only kernels before the one before wrote (split-KV attention's Config.preload: its keys,
values and mask; Config.pos_early: the new column's index): every kernel under PDL waits for the
one before it before it lets the next start, so when a kernel starts, all but the one just before
it have finished and their writes are visible. What that saves is the gap between two short kernels, of which a decode
step has several per layer. The engines' default (`--pdl auto`).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch
    triton = None

MODES = ("auto", "off")  # auto: on where the GPU (compute capability 9+) and torch have it
# How much of its weights a triton-f16x2 program launched with PDL asks L2 for before its wait, in
# quarters (4: all of them; 0: none): read at each launch; lab/gpu_step_ab.py --ab pdl-prefetch
# times the step at other values. None by default: on an H100 (results/lab/h100/pdl-prefetch_ab_*.csv)
# PDL without prefetching shortened llava-1.5-7b's int4 decode step by 5% and vila1.5-3b's by 8%,
# one quarter about as much, and all four quarters lengthened both (by 7% and 15%), more than PDL
# saved. Split-KV attention's keys and values were prefetched with any quarters there (up to
# 9d5d362); they are its own setting since (bench.engines.split_kv_attention.Config.prefetch).
PREFETCH = 0
# Whether a triton-f16x2 program launched with PDL loads the first block of its weights and their
# scales into registers before its wait (as a software pipeline's first stage, with no traffic of
# its own; the activations are read after it): lab/gpu_step_ab.py --ab pdl-preload times it. Off:
# on an H100 it lengthened llava-1.5-7b's and vila1.5-3b's int4 decode step a little in every
# round (results/lab/h100/pdl-preload_ab_*.csv).
PRELOAD = False
# Where the project's kernels launched with PDL let the next kernel start (gdc_launch_dependents):
# right after their wait (False), as inductor's kernels do, or after their main loop (True: the
# triton-f16x2 GEMV's K loop, split-KV attention's keys loop), so the next kernel's programs are
# placed on the SMs when this one's are nearly done, not wherever room was left beside them while
# it ran. On by default: on an H100 it shortened the int4 decode step of llava-1.5-7b by 22-23 us and
# of vila1.5-3b by 54 us in every round (fp16: within the rounds' spread), and where a GEMV follows a
# GEMV directly (the SiLU knockout) it turned 0.17 ms longer into 0.05 ms shorter
# (results/lab/h100/pdl-late_ab_*.csv, knockout_ab_late_llava-1.5-7b.csv; lab/gpu_step_ab.py --ab
# pdl-late). Launches measured without it are another measurement (`pdl_late` in kernels.json's keys).
LATE = True


def _inductor_triton():
    """inductor's Triton settings, imported when first asked for (not when the command line starts)."""
    from torch._inductor import config as inductor_config

    return inductor_config.triton


def unavailable(device: torch.device) -> str | None:
    """Why kernels on `device` cannot launch with PDL, or None."""
    if device.type != "cuda" or torch.version.hip:
        return "PDL needs an NVIDIA GPU"
    if not hasattr(_inductor_triton(), "enable_pdl"):
        return f"torch {torch.__version__}'s inductor has no PDL switch"
    if triton is None or not hasattr(tl.extra.cuda, "gdc_wait"):
        return "PDL needs Triton's grid dependency control (gdc_wait)"
    major = torch.cuda.get_device_capability(device)[0]
    if major < 9:
        return f"PDL needs compute capability 9 or more (this GPU: {major})"
    return None


def configure(mode: str, device: torch.device) -> bool:
    """Switch PDL on (mode "auto", where it can run on `device`) or off for the kernels compiled
    and launched from now on in this process; whether it is on."""
    if mode not in MODES:
        raise ValueError(f"unknown PDL mode {mode!r}; choose {' or '.join(MODES)}")
    on = mode == "auto" and unavailable(device) is None
    if hasattr(_inductor_triton(), "enable_pdl"):
        _inductor_triton().enable_pdl = on
    return on


def enabled(device: torch.device) -> bool:
    """Whether kernels launched on `device` now take PDL: inductor's switch on, and PDL able to
    run there."""
    return bool(getattr(_inductor_triton(), "enable_pdl", False)) and unavailable(device) is None


if triton is not None:
    @triton.jit
    def prefetch_l2(ptr, nbytes):
        """The program's first thread asks the L2 cache for [ptr, ptr + nbytes) (sm_90's bulk
        prefetch, one instruction; ptr 16-byte aligned, nbytes a multiple of 16) without waiting
        for it: what a kernel under PDL may ask for before its wait (nothing is read into registers)."""
        tl.inline_asm_elementwise("""{
        .reg .pred p;
        .reg .u32 t;
        mov.u32 t, %tid.x;
        setp.eq.u32 p, t, 0;
        @p cp.async.bulk.prefetch.L2.global [$1], $2;
        mov.u32 $0, 0;
        }""", "=r,l,r", [ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1)
