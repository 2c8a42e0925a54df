"""What a W4A16 kernel is to Int4Linear."""
from __future__ import annotations

import importlib
from functools import lru_cache

import torch


class W4A16Kernel:
    """y = x @ W^T for an Int4Linear's weight and x of any number of rows (the calls its layer
    gives it: few under --int4-kernels, many under --int4-prefill-kernel).

    `state_key`: the name of the extra weight format the kernel reads (None: it reads the
    layer's own packed weight); kernels with the same key share one prepared copy, which the
    layer holds as buffers named `kernel_<state_key>_<name>` (counted in the int4_kernel_mb
    column, not in weight_mb)."""

    name = ""
    state_key: str | None = None
    # Tunes itself on its first call at each row count (gemlite's autotuners): a layer given it is
    # called once at every row count it serves when chosen, so no tuning falls in a measured run
    # or a CUDA graph capture.
    tunes_per_rows = False
    # The most rows `--int4-kernels measured` times it at (None: every row count): a kernel built
    # for few rows, whose time grows with them (a GEMV), is not tuned and timed where it cannot win.
    max_rows: int | None = None
    # Reads the layer's dense copy where it keeps one (--int4-prefill-copy): its time with a copy is
    # another measurement. The others read their own formats, whose times a copy does not change.
    reads_dense_copy = False
    # Launches with programmatic dependent launch where it is on (bench.pdl): its time with PDL is
    # another measurement. The others launch as they always do.
    launches_pdl = False
    # What a key without the kernel's timing_settings was measured with (None: it had none then).
    settings_before: dict | None = None

    def timing_settings(self) -> dict | None:
        """What the kernel's time depends on besides its name, the device, the library versions
        and how it is launched (the configurations its autotuner chooses from, say), as JSON
        values: each is another measurement (bench.quant.w4a16.measurements.cache_key). None: nothing."""
        return None

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this kernel cannot run on `device` with activations of `dtype`; None when it can."""
        return None

    def shape_unsupported(self, layer) -> str | None:
        """Why this kernel cannot take the layer's weight (its shape, group size); None when it can."""
        return None

    def prepare(self, layer, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], object]:
        """(tensors, meta) of the kernel's own weight format, made from the layer's int4 codes."""
        return {}, None

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in_features] (the activation dtype) -> [rows, out_features], no bias."""
        raise NotImplementedError


def autotune_bench(fn, quantiles):
    """The benchmark Triton's autotuners run for each candidate configuration of triton-tiles and
    gemlite's kernels (triton-f16x2 tunes in CUDA graphs instead: bench.quant.triton_f16x2._tune):
    Triton's own (L2 flushed between calls) over 5 ms of warm-up and 10 ms of calls, not its
    default 25 and 100; a kernel of a few to tens of microseconds still gets hundreds of calls,
    and a 7B's weight shapes tune in seconds, not minutes."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=10, quantiles=quantiles)


def cuda_half_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a CUDA kernel taking float16 or bfloat16 activations cannot run on `device` with `dtype`."""
    if device.type != "cuda":
        return f"{name} runs on CUDA only"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{name} takes float16 or bfloat16 activations, not {dtype}"
    return None


@lru_cache(maxsize=None)
def triton_module(name: str, counter: str):
    """(bench.quant.`name`, None) for one of our Triton kernel modules, its tunings
    counted by compile_events as `counter` (its tuning_count()); (None, why Triton cannot run it)."""
    from bench.measure import compile_events

    try:
        module = importlib.import_module(f"bench.quant.{name}")
    except Exception as e:  # noqa: BLE001 - no Triton (CPU builds of torch), or one too old
        return None, f"Triton cannot be imported ({e.__class__.__name__}: {str(e)[:120]})"
    compile_events.add_counter(counter, module.tuning_count)
    return module, None
