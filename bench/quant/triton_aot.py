"""Our Triton kernels (bench.quant.triton_w4a16's, bench.engines.split_kv_attention's) compiled for a
CUDA GPU that is not here.

Triton's own compiler and the ptxas its wheel ships turn the kernel into PTX and a cubin for a
named compute capability without a GPU or a CUDA driver, specialized as the JIT specializes it for
a call of the given shape (argument types, 16-byte alignment and divisibility, a row count of 1 as
a constant). What Triton's interpreter does not check (power-of-two ranges, tl.dot's shapes and
types, layouts, constexpr types, atomics) fails here as it would on the GPU, and ptxas reports
the registers and the spills of each configuration (the tests and lab/triton_tiles_aot.py).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Compiled:
    registers: int
    spill_bytes: int  # spill stores + spill loads, bytes per thread
    shared_bytes: int
    ptx: str
    cubin: bytes = b""


def loop_instructions(cubin: bytes, capability: int = 90) -> Counter:
    """The machine instructions (SASS, by opcode) of the kernel's first loop, its K loop: what a
    thread issues per step, from the cuobjdump of Triton's wheel (beside its ptxas for `capability`;
    where none lies there, as beside a ptxas TRITON_PTXAS_PATH names, the one on PATH)."""
    from triton.backends.nvidia import compiler as nvidia

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.cubin"
        src.write_bytes(cubin)
        cuobjdump = Path(nvidia.get_ptxas(capability).path).with_name("cuobjdump")
        if not cuobjdump.is_file():  # a ptxas chosen by TRITON_PTXAS_PATH (e.g. torch's) with none beside it
            cuobjdump = Path(shutil.which("cuobjdump") or cuobjdump)
        sass = subprocess.run([str(cuobjdump), "-sass", str(src)],
                              capture_output=True, text=True, check=True).stdout
    code = [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    for at, text in code:  # the first branch back: the end of the first loop
        target = re.search(r"\bBRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < at:
            start = int(target.group(1), 16)
            ops = [t.split()[1] if t.startswith("@") else t.split()[0] for a, t in code if start <= a <= at]
            return Counter(op.split(".")[0] for op in ops)
    return Counter()


def unavailable(capability: int = 90) -> str | None:
    """Why the kernel cannot be compiled here for compute capability `capability`, or None."""
    try:
        from triton.backends.nvidia import compiler as nvidia
    except Exception as e:  # noqa: BLE001 - no Triton, or one without its NVIDIA backend
        return f"Triton's NVIDIA backend cannot be imported ({e.__class__.__name__}: {str(e)[:120]})"
    ptxas = nvidia.get_ptxas(capability).path
    if not ptxas or not Path(ptxas).is_file():
        return f"Triton's NVIDIA backend has no ptxas for compute capability {capability}"
    return None


def _ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spill bytes) ptxas -v reports for the kernel's PTX, by the ptxas Triton itself
    runs for `capability` (sm_100 and later have their own); RuntimeError with ptxas' own message
    when it refuses the PTX."""
    from triton.backends.nvidia import compiler as nvidia

    arch = nvidia.sm_arch_from_capability(capability)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([nvidia.get_ptxas(capability).path, "-v", f"--gpu-name={arch}", str(src), "-o",
                               str(Path(tmp) / "k.o")], capture_output=True, text=True)
    if done.returncode:
        said = "; ".join(line.strip() for line in done.stderr.splitlines() if line.strip())
        raise RuntimeError(f"ptxas for {arch} refused the kernel's PTX: {said or f'exit {done.returncode}'}")
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    return int(regs.group(1)), int(spill.group(1)) + int(spill.group(2))


def compile_tiles(rows: int, n: int, k: int, group_size: int, dtype: torch.dtype, split_k: bool, config: dict,
                  capability: int = 90, scale_dtype: torch.dtype | None = None) -> Compiled:
    """The kernel as bench.quant.triton_w4a16.tiles_mm launches it for x [rows, k] of `dtype` and
    a weight [n, k] in groups of `group_size`, with `config` (TN, BKT, SPLIT_K, num_warps,
    num_stages), compiled for compute capability `capability` (90: H100 / H200). Raises Triton's
    compile error (or ptxas') where the GPU's would."""
    from bench.quant import triton_w4a16 as tw

    # meta tensors give the JIT's binder what it reads (dtype, an aligned address) without memory
    x = torch.empty(rows, k, dtype=dtype, device="meta")
    packed = torch.empty(n // 8, k // 128, 32, 4, dtype=torch.int32, device="meta")
    sz = torch.empty(k // group_size, n, 2, dtype=scale_dtype or dtype, device="meta")
    y = torch.empty(rows, n, dtype=torch.float32 if split_k else dtype, device="meta")
    config = dict(config)
    kwargs = {"G": group_size, "BLOCK_M": tw.rows_block(rows), "MID": tw.TINYGEMM_MID,
              "num_warps": config.pop("num_warps", 4), "num_stages": config.pop("num_stages", 3), **config}
    return compile_call(tw._tiles_mm_kernel, (x, packed, sz, y, rows, n, k, x.stride(0), y.stride(0)), kwargs,
                        capability)


def compile_call(fn, args: tuple, kwargs: dict, capability: int = 90) -> Compiled:
    """Triton kernel `fn` specialized as its JIT would for the launch `fn[grid](*args, **kwargs)`
    (tensors on the meta device stand in for the GPU's), compiled for compute capability
    `capability`; Triton's compile error (or ptxas') where the GPU's would raise one."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    regs, spills = _ptxas_usage(kernel.asm["ptx"], capability)
    return Compiled(regs, spills, kernel.metadata.shared, kernel.asm["ptx"], kernel.asm["cubin"])
