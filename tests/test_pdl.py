"""Programmatic dependent launch of the project's Triton kernels (bench.pdl): on where inductor's
is, on sm_90 and later only, and where on, every kernel waits for the one before before it reads
or writes anything (PTX compiled for sm_90 without a GPU)."""
import re

import pytest
import torch

from bench import pdl
from tests.conftest import f16x2_meta_args, triton_aot_or_skip


def test_pdl_is_off_on_the_cpu_and_wherever_inductor_keeps_it_off(monkeypatch):
    from torch._inductor import config as inductor_config

    if not hasattr(inductor_config.triton, "enable_pdl"):
        pytest.skip("this torch's inductor has no PDL switch")
    # (inductor's config.patch, not monkeypatch: undoing that deletes a config attribute)
    with inductor_config.patch({"triton.enable_pdl": True}):
        assert not pdl.enabled(torch.device("cpu")) and not pdl.enabled(torch.device("meta"))
        assert "NVIDIA GPU" in pdl.unavailable(torch.device("cpu"))
    monkeypatch.setattr(pdl, "unavailable", lambda device: None)  # as on an H100
    for on in (True, False):
        with inductor_config.patch({"triton.enable_pdl": on}):
            assert pdl.enabled(torch.device("cuda")) == on


def _waits_first(ptx: str) -> bool:
    """griddepcontrol.wait comes before the kernel's first global load or store."""
    wait = ptx.find("griddepcontrol.wait")
    first = min((m.start() for m in re.finditer(r"\b(ld|st|atom|red)\.global", ptx)), default=len(ptx))
    return 0 <= wait < first and "griddepcontrol.launch_dependents" in ptx


@pytest.mark.parametrize("on", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_split_kv_kernels_wait_for_the_kernel_before_under_pdl(monkeypatch, on, prefetch):
    triton_aot = triton_aot_or_skip()
    from bench.engines import split_kv_attention as sk

    monkeypatch.setattr(sk, "pdl_enabled", lambda device: on)
    monkeypatch.setattr(pdl, "PREFETCH", 4)  # the GEMV's setting: not the attention's
    meta = torch.device("meta")
    buf = torch.empty(1, 32, 1024, 128, dtype=torch.float16, device=meta)
    q = torch.empty(1, 32, 1, 128, dtype=torch.float16, device=meta)
    config = sk.Config(prefetch=prefetch, fused_combine=False)
    calls, _ = sk.launches(q, buf[:, :, :640], buf[:, :, :640], None, 128 ** -0.5, sk.splits_for(1, 32, 640, 264),
                           config)
    assert len(calls) == 2
    for kernel, _, args, kwargs in calls:
        assert kwargs.get("launch_pdl", False) == on
        c = triton_aot.compile_call(kernel, args, kwargs)
        assert _waits_first(c.ptx) == on and ("griddepcontrol" in c.ptx) == on
        # the partial kernel asks L2 for its split's keys and values before the wait (Config.prefetch;
        # off by default)
        prefetches = on and prefetch and kernel is sk._partial
        assert c.ptx.count("cp.async.bulk.prefetch.L2.global") == (2 if prefetches else 0)
    assert not sk.DEFAULT.prefetch


@pytest.mark.parametrize("on", [False, True])
@pytest.mark.parametrize("tn,split,quarters", [(1, 1, 4), (2, 1, 4), (2, 4, 4), (2, 1, 1), (2, 1, 0)])
def test_the_f16x2_kernel_prefetches_its_weights_then_waits_for_the_kernel_before_under_pdl(on, tn, split, quarters):
    """Under PDL the program's weights (no kernel's output) are asked of L2 before the wait, one
    bulk prefetch per tile row of the first `quarters` quarters of its k-tiles (bench.pdl.PREFETCH;
    none at 0); the activations are read after it."""
    triton_aot = triton_aot_or_skip()
    from bench.quant import triton_f16x2

    n, k, g = 4096, 4096, 128
    c = triton_aot.compile_call(triton_f16x2._f16x2_kernel, f16x2_meta_args(n, k, g, split),
                                {"G": g, "EMULATE": False, "TN": tn, "BKT": 4, "SPLIT_K": split, "ROWS_FIRST": True,
                                 "num_warps": 4, "num_stages": 3, "PREFETCH": quarters,
                                 **({"PDL": True, "launch_pdl": True} if on else {})})
    assert _waits_first(c.ptx) == on and ("griddepcontrol" in c.ptx) == on
    prefetches = on and quarters > 0
    prefetch = c.ptx.find("cp.async.bulk.prefetch.L2.global")
    assert (0 <= prefetch < c.ptx.find("griddepcontrol.wait")) == prefetches
    assert c.ptx.count("cp.async.bulk.prefetch.L2.global") == (tn if prefetches else 0)
    if prefetches:  # a k-tile of a tile row is 512 bytes: the size asked for is k-tiles x 128 x quarters
        size = re.search(r"cp\.async\.bulk\.prefetch\.L2\.global \[%rd\d+\], (%r\d+);", c.ptx).group(1)
        shifts = re.findall(rf"shl\.b32\s+{size}, %r\d+, (\d+);", c.ptx)
        assert shifts == [str((128 * quarters).bit_length() - 1)]
    assert c.spill_bytes == 0


def _bytes_loaded(ptx: str) -> int:
    """Bytes a thread reads by the global loads in `ptx` (ld.global[.vN].bBITS each)."""
    loads = re.findall(r"\bld\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s", ptx)
    return sum(int(v or 1) * int(bits) // 8 for v, bits in loads)


def _partial_compiled(triton_aot, sk, config, writes: bool = True, mask: bool = True, causal: bool = False):
    """split-KV's partial kernel under PDL for llava-1.5-7b's one-row step (32 heads of 128, 640
    of 1024 columns attended) compiled for sm_90: writing the step's new key and value (`writes`),
    with the caller's mask (`mask`) or the causal one made from the new column (`causal`)."""
    meta = torch.device("meta")
    pair = torch.empty(2, 1, 32, 1024, 128, dtype=torch.float16, device=meta)
    q = torch.empty(1, 32, 1, 128, dtype=torch.float16, device=meta)
    new = (torch.empty(1, 32, 1, 128, dtype=torch.float16, device=meta),
           torch.empty(1, 32, 1, 128, dtype=torch.float16, device=meta),
           torch.empty(1, dtype=torch.int64, device=meta), 1024) if writes else None
    additive = torch.empty(1, 1, 1, 640, dtype=torch.float16, device=meta) if mask else None
    calls, _ = sk.launches(q, pair[0, :, :, :640], pair[1, :, :, :640], additive, 128 ** -0.5,
                           sk.splits_for(1, 32, 640, 264), config, new=new, causal=causal)
    (kernel, _, args, kwargs), = calls
    return triton_aot.compile_call(kernel, args, kwargs)


@pytest.mark.parametrize("writes,mask", [(False, True), (True, True), (True, False)])
def test_split_kv_attention_preloads_its_first_keys_before_the_wait_only_where_it_writes_the_new_ones(
        monkeypatch, writes, mask):
    """Config.preload under PDL: where the partial kernel writes the step's new key and value
    itself (write_kv) and the mask is the caller's, each program loads its split's first keys,
    values and mask before the wait, nothing else (not q, written by the kernel before), and
    stores nothing there; where a kernel before wrote the new key and value, or the launch made
    the mask (zeros for None) just before, it waits first (a load before the wait could read
    them before they are written)."""
    triton_aot = triton_aot_or_skip()
    from bench.engines import split_kv_attention as sk

    monkeypatch.setattr(sk, "pdl_enabled", lambda device: True)
    config = sk.Config(preload=True)
    compiled = {preload: _partial_compiled(triton_aot, sk, sk.Config(preload=preload), writes, mask)
                for preload in (False, True)}
    assert _waits_first(compiled[False].ptx)
    pre = compiled[True]
    ahead = writes and mask
    assert _waits_first(pre.ptx) != ahead and pre.spill_bytes == 0
    before = pre.ptx[:pre.ptx.find("griddepcontrol.wait")]
    assert not re.search(r"\b(st|atom|red)\.global", before)
    # a thread's share of the block's keys and values (64 x 128 fp16 each over 128 threads), and of
    # its 64-column mask: 256 bytes and a few more (q's share would be 32 more)
    kv = 2 * config.block * 128 * 2 // (config.num_warps * 32)
    assert kv <= _bytes_loaded(before) <= kv + 16 if ahead else _bytes_loaded(before) == 0
    assert not sk.DEFAULT.preload


@pytest.mark.parametrize("early", [False, True])
def test_split_kv_attention_reads_the_new_columns_index_before_the_wait_with_pos_early(monkeypatch, early):
    """Config.pos_early under PDL: where the partial kernel writes the step's new key and value,
    the column's index (one int64) is its only read before the wait; without it, nothing is."""
    triton_aot = triton_aot_or_skip()
    from bench.engines import split_kv_attention as sk

    monkeypatch.setattr(sk, "pdl_enabled", lambda device: True)
    c = _partial_compiled(triton_aot, sk, sk.Config(pos_early=early))
    before = c.ptx[:c.ptx.find("griddepcontrol.wait")]
    assert _bytes_loaded(before) == (8 if early else 0) and not re.search(r"\b(st|atom|red)\.global", before)
    assert c.spill_bytes == 0 and not sk.DEFAULT.pos_early
    # the causal mask made from the column (`causal`, Config.causal_mask): the mask's loads gone, nothing else
    made = _partial_compiled(triton_aot, sk, sk.Config(pos_early=early), mask=False, causal=True)
    mask_pointer = "_partial_param_3]"  # M, the fourth argument: its address never even read
    assert mask_pointer in c.ptx and mask_pointer not in made.ptx and made.spill_bytes == 0
    copies = [len(re.findall(r"cp\.async\.c[ag]", k.ptx)) for k in (c, made)]
    assert copies[0] > copies[1], copies  # (the keys and values still copied as before)
    assert sk.DEFAULT.causal_mask


@pytest.mark.parametrize("rows_first,split", [(True, 1), (False, 1), (True, 4)])
def test_the_f16x2_kernel_preloads_its_first_weights_before_the_wait_under_pdl(rows_first, split):
    """With PRELOAD (bench.pdl.PRELOAD) the program's first block of weights and of their scales
    is loaded before the PDL wait (no kernel writes them) and nothing else is: no store, and the
    activations (the kernel before's output) after it; its K loop keeps its per-weight cost."""
    triton_aot = triton_aot_or_skip()
    from bench.quant import triton_f16x2

    n, k, g, tn, bkt, warps = 4096, 4096, 128, 2, 4, 4
    meta = dict(device="meta")
    args = (torch.empty(k // 2, dtype=torch.int32, **meta),
            torch.empty(n // 8, k // 128, 32, 4, dtype=torch.int32, **meta),
            torch.empty(k // g, n, 1, dtype=torch.int32, **meta),
            torch.empty(n, dtype=torch.float16, **meta),
            *((torch.empty(split * n, **meta), torch.empty(n // 8, dtype=torch.int32, **meta)) if split > 1
              else (None, None)), n, k)
    cfg = {"G": g, "EMULATE": False, "TN": tn, "BKT": bkt, "SPLIT_K": split, "ROWS_FIRST": rows_first,
           "num_warps": warps, "num_stages": 3, "PREFETCH": 0, "PDL": True, "launch_pdl": True}
    plain = triton_aot.compile_call(triton_f16x2._f16x2_kernel, args, cfg)
    pre = triton_aot.compile_call(triton_f16x2._f16x2_kernel, args, {**cfg, "PRELOAD": True})
    assert _waits_first(plain.ptx) and not _waits_first(pre.ptx)
    before = pre.ptx[:pre.ptx.find("griddepcontrol.wait")]
    assert re.search(r"\bld\.global", before) and not re.search(r"\b(st|atom|red)\.global", before)
    # the first block's words and scales: each thread's share of TN x 8 rows x BKT k-tiles x 16 words, and a
    # scale pair per row and k-tile (vector loads may fetch several of either at once)
    assert len(re.findall(r"\bld\.global", before)) <= tn * 8 * bkt * (16 + 1) // (warps * 32)
    assert pre.spill_bytes == 0
    loops = [triton_aot.loop_instructions(c.cubin) for c in (plain, pre)]
    assert sum(loops[1].values()) <= sum(loops[0].values()) * 1.05, loops


def test_an_engine_sets_pdl_for_the_process_when_made(tiny_llava_dir, monkeypatch):
    """Each engine switches PDL on (auto, where it can run) or off for what is compiled and
    launched after it is made, so no earlier engine's setting carries over; engine_detail names
    it where a kernel the engine runs takes it (an eager engine: an int4 kernel that does)."""
    from torch._inductor import config as inductor_config

    from bench.engines.cache_policy import CachePolicy
    from bench.engines.spec import EngineSpec
    from bench.engines.static import StaticEngine
    from bench.quant.w4a16.registry import KERNELS
    from tests.test_int4_kernels import _int4_rtn

    if not hasattr(inductor_config.triton, "enable_pdl"):
        pytest.skip("this torch's inductor has no PDL switch")
    adapter = _int4_rtn(tiny_llava_dir)  # tinygemm up to 8 rows, dense above
    with pytest.raises(ValueError, match="unknown PDL mode 'on'"):
        EngineSpec(pdl="on")
    with inductor_config.patch({"triton.enable_pdl": True}):  # as an earlier engine on a GPU left it
        engine = StaticEngine(adapter, CachePolicy(), EngineSpec(pdl="auto"))
        assert not engine.pdl and not inductor_config.triton.enable_pdl and "PDL" not in engine.describe()
        monkeypatch.setattr(pdl, "unavailable", lambda device: None)  # as on an H100
        engine = StaticEngine(adapter, CachePolicy(), EngineSpec(pdl="auto"))
        assert engine.pdl and inductor_config.triton.enable_pdl
        assert "PDL" not in engine.describe()  # tinygemm and dense launch without it
        monkeypatch.setattr(KERNELS["tinygemm"], "launches_pdl", True)
        assert "PDL (programmatic dependent launch)" in engine.describe()
        assert StaticEngine(adapter, CachePolicy(), EngineSpec()).pdl  # auto, the default
        engine = StaticEngine(adapter, CachePolicy(), EngineSpec(pdl="off"))
        assert not engine.pdl and not inductor_config.triton.enable_pdl and "PDL" not in engine.describe()


def test_the_f16x2_kernel_refuses_a_prefetch_that_is_no_count_of_quarters(monkeypatch):
    """bench.pdl.PREFETCH is 0 to 4 quarters: True (its old form) or 8 would ask L2 for the wrong
    bytes (past the program's weights), so a launch under PDL refuses them."""
    pytest.importorskip("triton")
    from bench.quant import triton_f16x2

    monkeypatch.setattr(triton_f16x2, "pdl_enabled", lambda device: True)
    x = torch.zeros(1, 256, dtype=torch.float16)
    for bad in (True, 8, -1, 1.5):
        monkeypatch.setattr(pdl, "PREFETCH", bad)
        with pytest.raises(ValueError, match="quarters of a program's weights, 0 to 4"):
            triton_f16x2.f16x2_mm(x, torch.zeros(4, 2, 32, 4, dtype=torch.int32),
                                  torch.zeros(2, 32, 2, dtype=torch.float16), 32, 128, False)


def _between(ptx: str, marker: str) -> tuple[int, int, int]:
    """(where launch_dependents is, where the first and the last `marker` instruction are) in `ptx`."""
    marks = [m.start() for m in re.finditer(re.escape(marker), ptx)]
    assert marks, marker
    return ptx.find("griddepcontrol.launch_dependents"), marks[0], marks[-1]


@pytest.mark.parametrize("late", [False, True])
def test_the_kernels_let_the_next_start_after_their_main_loop_when_late(monkeypatch, late):
    """bench.pdl.LATE: triton-f16x2 and split-KV attention's partial kernel let the next kernel
    start (launch_dependents) after their main loop (the GEMV's f16x2 products, the attention's
    exponentials) instead of right after their wait; they wait first either way."""
    triton_aot = triton_aot_or_skip()
    from bench.engines import split_kv_attention as sk
    from bench.quant import triton_f16x2

    n, k, g = 4096, 4096, 128
    meta = dict(device="meta")
    args = (torch.empty(k // 2, dtype=torch.int32, **meta),
            torch.empty(n // 8, k // 128, 32, 4, dtype=torch.int32, **meta),
            torch.empty(k // g, n, 1, dtype=torch.int32, **meta), torch.empty(n, dtype=torch.float16, **meta),
            None, None, n, k)
    c = triton_aot.compile_call(triton_f16x2._f16x2_kernel, args,
                                {"G": g, "EMULATE": False, "TN": 2, "BKT": 4, "SPLIT_K": 1, "ROWS_FIRST": True,
                                 "num_warps": 4, "num_stages": 3, "PDL": True, "LATE": late, "launch_pdl": True})
    launch, first, last = _between(c.ptx, "fma.rn.f16x2")
    assert _waits_first(c.ptx) and c.ptx.count("griddepcontrol.launch_dependents") == 1
    assert (launch > last) if late else (launch < first), (launch, first, last)

    monkeypatch.setattr(sk, "pdl_enabled", lambda device: True)
    monkeypatch.setattr(pdl, "LATE", late)
    buf = torch.empty(1, 32, 1024, 128, dtype=torch.float16, **meta)
    q = torch.empty(1, 32, 1, 128, dtype=torch.float16, **meta)
    calls, _ = sk.launches(q, buf[:, :, :640], buf[:, :, :640], None, 128 ** -0.5, sk.splits_for(1, 32, 640, 264),
                           sk.Config(fused_combine=False))  # (the fused combine's exponentials: after the loop)
    kernel, _, args, kwargs = calls[0]
    c = triton_aot.compile_call(kernel, args, kwargs)
    launch, first, last = _between(c.ptx, "ex2.approx")
    assert _waits_first(c.ptx) and c.ptx.count("griddepcontrol.launch_dependents") == 1
    assert (launch > last) if late else (launch < first), (launch, first, last)
