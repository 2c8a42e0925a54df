"""Marlin's W4A16 GEMM (Frantar et al.) in vLLM's gptq_marlin form, which takes integer zero
points: `marlin`, over its own layout of the layer's int4 codes (state_key "marlin_layout").

Its CUDA source is in marlin_src/ (Apache-2.0; from danieldk/marlin-kernels v0.3.7, vLLM's copy,
cut to 4-bit weights with integer zero points in groups of 128 and float16 activations: see the
note at the top of gptq_marlin.cu). No wheel of it is built for every torch and CUDA release (none
for torch 2.11 with CUDA 13), so it is compiled on first use with torch.utils.cpp_extension
(CUDA's nvcc and ninja; about a minute) into a build directory kept per torch, CUDA and GPU
architecture (VLM_BENCH_MARLIN_BUILD, default ~/.cache/vlm-bench/); later processes load it.
A build that fails leaves the kernel out of `--int4-kernels measured` with the reason, and makes
`--int4-kernels marlin` or `--int4-prefill-kernel marlin` a skipped row saying why; from then on
in that process the kernel is unavailable (so no plan measured without it is kept as one with it).

The layout is Marlin's, made here from the layer's codes (q [N, K] in 0..15, scale and integer
zero [N, K / 128]; w = (q - zero) * scale): the weight as 16 x 16 tiles along K, each tile's
values permuted for the tensor cores' fragments and 8 nibbles packed per int32; scales and zero
points permuted per 64 columns, the zero points also interleaved and packed. The permutations
are IST-DASLab/marlin's and vLLM's (marlin_utils), hand-ported because the published code that
makes them is either bundled with a serving engine (vLLM) or symmetric-only (IST's Layer.pack).

One call is one registered op (vlm_bench::int4_marlin_mm), which torch.compile keeps as one opaque
call. Marlin reduces across thread blocks through a per-layer workspace of locks that each call
leaves zeroed again, so a call can be captured in a CUDA graph and replayed.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from bench.errors import VariantUnsupported
from bench.log import status
from bench.quant.w4a16.base import W4A16Kernel

BUILD_WAIT_S = 900  # the longest a process waits for another's build of the same directory

GROUP = 128  # the one group size this build dispatches (group_blocks 8)
TILE = 16
MIN_N = 64  # marlin::min_thread_n
SOURCES = Path(__file__).with_name("marlin_src")
_INTERLEAVE = (0, 2, 4, 6, 1, 3, 5, 7)  # the nibble order Marlin's dequantize reads


@lru_cache(maxsize=None)
def weight_perm() -> torch.Tensor:
    """The order of a 16 x 64 strip's 1024 codes in Marlin's layout (IST-DASLab/marlin _get_perms)."""
    perm = []
    for i in range(32):
        col = i // 4
        first = [16 * row + col + 8 * block for block in (0, 1)
                 for row in (2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1)]
        for j in range(4):
            perm.extend(p + 256 * j for p in first)
    return torch.tensor(perm).view(-1, 8)[:, list(_INTERLEAVE)].reshape(-1)


@lru_cache(maxsize=None)
def scale_perm() -> torch.Tensor:
    """The order of 64 consecutive columns' scales (and zero points) in Marlin's layout."""
    return torch.tensor([i + 8 * j for i in range(8) for j in range(8)])


def _pack8(values: torch.Tensor) -> torch.Tensor:
    """[R, C] nibbles (0..15) -> [R, C / 8] int32, value i of each 8 in bits 4i..4i+3."""
    v = values.to(torch.int64)
    packed = sum(v[:, i::8] << (4 * i) for i in range(8))
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def marlin_weight(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] (0..15) -> Marlin's packed weight [K / 16, 2 N] int32."""
    n, k = q.shape
    w = q.t().reshape(k // TILE, TILE, n // TILE, TILE).permute(0, 2, 1, 3).reshape(k // TILE, n * TILE)
    perm = weight_perm().to(w.device)
    w = w.reshape(-1, perm.numel())[:, perm].reshape(k // TILE, n * TILE)
    return _pack8(w)


def marlin_scales(scale: torch.Tensor) -> torch.Tensor:
    """Scales [N, K / 128] -> [K / 128, N] float16, permuted per 64 columns."""
    s = scale.t().to(torch.float16)
    return s.reshape(-1, 64)[:, scale_perm().to(s.device)].reshape(s.shape).contiguous()


def marlin_zeros(zero: torch.Tensor) -> torch.Tensor:
    """Integer zero points [N, K / 128] (0..15) -> [K / 128, N / 8] int32: permuted as the scales,
    interleaved as the weight's nibbles, packed 8 per word."""
    z = zero.t()
    z = z.reshape(-1, 64)[:, scale_perm().to(z.device)]
    z = z.reshape(-1, 8)[:, list(_INTERLEAVE)].reshape(zero.shape[1], zero.shape[0])
    return _pack8(z)


def check_codes(q: torch.Tensor, zero: torch.Tensor) -> None:
    """VariantUnsupported unless every code and zero point is 4-bit (0..15): packing 8 to a word does not
    mask them, so one out of range would change its neighbours."""
    for name, t in (("codes", q), ("zero points", zero)):
        low, high = int(t.min()), int(t.max())
        if low < 0 or high > 15:
            raise VariantUnsupported(f"marlin takes 4-bit {name} (0..15); this layer's run {low}..{high}")


def build_directory() -> Path:
    """Where the compiled kernels are kept: one directory per torch, CUDA and GPU architecture."""
    major, minor = torch.cuda.get_device_capability()
    root = os.environ.get("VLM_BENCH_MARLIN_BUILD") or Path.home() / ".cache" / "vlm-bench"
    return Path(root) / f"marlin-torch{torch.__version__}-cuda{torch.version.cuda}-sm{major}{minor}"


@lru_cache(maxsize=None)
def _toolchain_missing() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "bin" / "nvcc").is_file():
        return (f"marlin is compiled on first use and needs CUDA's nvcc: none found "
                f"({'no CUDA toolkit' if home is None else f'no bin/nvcc in {home}'}; set CUDA_HOME)")
    if not cpp_extension.is_ninja_available():
        return "marlin is compiled on first use and needs ninja: pip install ninja"
    return None


def build_failure(where: Path, e: BaseException) -> str:
    """One line saying why the build in `where` failed: the compiler's first error line if the
    message holds one (torch's holds the whole build log), else the message's first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    first = next((line for line in lines[1:] if "error" in line.lower() or "not found" in line.lower()),
                 lines[0] if lines else "")
    return f"marlin could not be built in {where} ({e.__class__.__name__}: {first[:200]})"


@lru_cache(maxsize=None)
def _built() -> str | None:
    """Compile (or load the compiled) kernels once per process, their op registering as
    torch.ops.vlm_bench_marlin; None, or why it failed (kept: no layer retries a failed build)."""
    from torch.utils.cpp_extension import load

    from filelock import FileLock, Timeout

    where = build_directory()
    status(f"marlin: loading its CUDA kernels (compiled into {where} on first use)")
    try:
        where.mkdir(parents=True, exist_ok=True)
        # torch's own build lock is a plain file that a process killed mid-build leaves behind, and
        # the next one would wait on it for ever; an OS lock (freed when its holder dies) is taken
        # first, and under it a leftover of torch's is stale
        with FileLock(str(where) + ".lock", timeout=BUILD_WAIT_S):
            (where / "lock").unlink(missing_ok=True)
            load(name="vlm_bench_marlin", sources=[str(SOURCES / "gptq_marlin.cu"), str(SOURCES / "binding.cpp")],
                 extra_include_paths=[str(SOURCES)], extra_cflags=["-O3"],
                 extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"], build_directory=str(where),
                 is_python_module=False, verbose=False)
    except Timeout:
        return f"marlin's build in {where} is held by another process for over {BUILD_WAIT_S} s"
    except Exception as e:  # noqa: BLE001 - a compiler, toolkit or linker failure: the kernel is left out
        return build_failure(where, e)
    return None


def _build() -> None:
    why = _built()
    if why:
        raise VariantUnsupported(why)


def _build_failed() -> str | None:
    """Why this process's build failed, if one was tried and failed (no build is started here)."""
    return _built() if _built.cache_info().currsize else None


@torch.library.custom_op("vlm_bench::int4_marlin_mm", mutates_args=())
def int4_marlin_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   workspace: torch.Tensor) -> torch.Tensor:
    return torch.ops.vlm_bench_marlin.w4a16_gemm(x, qweight, scales, zeros, workspace)


@int4_marlin_mm.register_fake
def _(x, qweight, scales, zeros, workspace):
    return x.new_empty(x.shape[0], scales.shape[1])


class Marlin(W4A16Kernel):
    name = "marlin"
    state_key = "marlin_layout"
    _TENSORS = ("qweight", "scales", "zeros", "workspace")

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return "marlin runs on CUDA only"
        if dtype != torch.float16:
            return f"marlin is built here for float16 activations, not {dtype}"
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "marlin needs a GPU of compute capability 8.0 or newer"
        return _toolchain_missing() or _build_failed()

    def shape_unsupported(self, layer) -> str | None:
        if (layer.group_size != GROUP or layer.in_features % GROUP or layer.in_features <= GROUP
                or layer.out_features % MIN_N):
            return (f"marlin (built for groups of {GROUP}, two or more per row) needs in_features a multiple of "
                    f"{GROUP} above it, out_features % {MIN_N} == 0 and groups of {GROUP}")
        return None

    def prepare(self, layer, dtype: torch.dtype):
        t = layer.to_int4()
        check_codes(t.q, t.zero)
        _build()
        dev = layer.packed.device
        tensors = {"qweight": marlin_weight(t.q.to(dev)), "scales": marlin_scales(t.scale.to(dev)),
                   "zeros": marlin_zeros(t.zero.to(dev)),
                   # Marlin's locks: (N / 64) * max_par (16) ints, zero between calls
                   "workspace": torch.zeros(layer.out_features // MIN_N * 16, dtype=torch.int32, device=dev)}
        return tensors, None

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        args = layer.kernel_state(self.state_key, *self._TENSORS)
        return torch.ops.vlm_bench.int4_marlin_mm(x.to(torch.float16).contiguous(), *args)
