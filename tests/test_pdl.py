"""Programmatic dependent launch of the project's Triton kernels (bench.pdl): on where inductor's
is, on sm_90 and later only, and where on, every kernel waits for the one before before it reads
or writes anything (PTX compiled for sm_90 without a GPU)."""
import re

import pytest
import torch

from bench import pdl


def test_pdl_is_off_on_the_cpu_and_wherever_inductor_keeps_it_off(monkeypatch):
    from torch._inductor import config as inductor_config

    if not hasattr(inductor_config.triton, "enable_pdl"):
        pytest.skip("this torch's inductor has no PDL switch")
    monkeypatch.setattr(inductor_config.triton, "enable_pdl", True)
    assert not pdl.enabled(torch.device("cpu")) and not pdl.enabled(torch.device("meta"))
    if torch.cuda.is_available():
        assert pdl.enabled(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
        monkeypatch.setattr(inductor_config.triton, "enable_pdl", False)
        assert not pdl.enabled(torch.device("cuda"))


def _waits_first(ptx: str) -> bool:
    """griddepcontrol.wait comes before the kernel's first global load or store."""
    wait = ptx.find("griddepcontrol.wait")
    first = min((m.start() for m in re.finditer(r"\b(ld|st|atom|red)\.global", ptx)), default=len(ptx))
    return 0 <= wait < first and "griddepcontrol.launch_dependents" in ptx


def _aot():
    pytest.importorskip("triton")
    from bench.quant import triton_aot

    if why := triton_aot.unavailable():
        pytest.skip(why)
    return triton_aot


@pytest.mark.parametrize("on", [False, True])
def test_split_kv_kernels_wait_for_the_kernel_before_under_pdl(monkeypatch, on):
    triton_aot = _aot()
    from bench.engines import split_kv_attention as sk

    monkeypatch.setattr(sk, "pdl_enabled", lambda device: on)
    meta = torch.device("meta")
    buf = torch.empty(1, 32, 1024, 128, dtype=torch.float16, device=meta)
    q = torch.empty(1, 32, 1, 128, dtype=torch.float16, device=meta)
    calls, _ = sk.launches(q, buf[:, :, :640], buf[:, :, :640], None, 128 ** -0.5, sk.splits_for(1, 32, 640, 264))
    for kernel, _, args, kwargs in calls:
        assert kwargs.get("launch_pdl", False) == on
        c = triton_aot.compile_call(kernel, args, kwargs)
        assert _waits_first(c.ptx) == on and ("griddepcontrol" in c.ptx) == on
        # the partial kernel asks L2 for its split's keys and values before the wait
        assert c.ptx.count("cp.async.bulk.prefetch.L2.global") == (2 if on and kernel is sk._partial else 0)


@pytest.mark.parametrize("on", [False, True])
@pytest.mark.parametrize("tn,split", [(1, 1), (2, 1), (2, 4)])
def test_the_f16x2_kernel_prefetches_its_weights_then_waits_for_the_kernel_before_under_pdl(on, tn, split):
    """Under PDL the program's weights (no kernel's output) are asked of L2 before the wait, one
    bulk prefetch per tile row; the activations are read after it."""
    triton_aot = _aot()
    from bench.quant import triton_f16x2

    n, k, g = 4096, 4096, 128
    meta = dict(device="meta")
    args = (torch.empty(k // 2, dtype=torch.int32, **meta), torch.empty(n // 8, k // 128, 32, 4, dtype=torch.int32, **meta),
            torch.empty(k // g, n, 1, dtype=torch.int32, **meta),
            torch.empty(n, dtype=torch.float32 if split > 1 else torch.float16, **meta), n, k)
    c = triton_aot.compile_call(triton_f16x2._f16x2_kernel, args,
                                {"G": g, "EMULATE": False, "TN": tn, "BKT": 4, "SPLIT_K": split, "ROWS_FIRST": True,
                                 "num_warps": 4, "num_stages": 3, **({"PDL": True, "launch_pdl": True} if on else {})})
    assert _waits_first(c.ptx) == on and ("griddepcontrol" in c.ptx) == on
    prefetch = c.ptx.find("cp.async.bulk.prefetch.L2.global")
    assert (0 <= prefetch < c.ptx.find("griddepcontrol.wait")) == on
    assert c.ptx.count("cp.async.bulk.prefetch.L2.global") == (tn if on else 0)
    assert c.spill_bytes == 0
