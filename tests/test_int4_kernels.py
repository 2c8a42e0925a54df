"""W4A16 kernels per row count (--int4-kernels): each kernel against dequantize + matmul at every
row count it serves, the measured choice (never a slower or a wrong kernel; kept once per device
and shape), and the flag end to end."""
from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from bench.engines.fused_linear import FUSED_MAX_ROWS
from bench.quant.int4 import Int4Linear, quantize_int4
from bench.quant.w4a16 import choice, measurements
from bench.quant.w4a16.base import W4A16Kernel
from bench.quant.w4a16.registry import KERNELS
from bench.errors import VariantUnsupported
from tests.conftest import f16x2_meta_args, triton_aot_or_skip

pytest.importorskip("torchao")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
ERR = 1e-3 if DTYPE == torch.float32 else 5e-3  # a kernel's relative error against fp32 dequantize + matmul
RUN = ["--preset", "tiny-llava", "--variants", "rtn4", "--engine", "static", "--num-runs", "2", "--min-seconds", "0",
       "--max-new-tokens", "6", "--warmup", "0", "--no-fidelity", "--int4-group-size", "32"]


def _layer(n=256, k=256, group=64, bias=True, seed=0) -> Int4Linear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    return Int4Linear.from_int4(quantize_int4(w, group), DEVICE, DTYPE, bias=b)


def _unrunnable() -> str | None:
    """A kernel this device cannot run at the runs' dtype (RUN's: DTYPE), if there is one."""
    return next((n for n, k in KERNELS.items() if k.unavailable(DEVICE, DTYPE)), None)


def _reference(m: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    w = m.to_int4().dequantize(torch.float32).to(x.device)
    y = x.float() @ w.T
    return y if m.bias is None else y + m.bias.float()


@pytest.mark.parametrize("name", list(KERNELS))
def test_each_kernel_gives_dequantize_matmul_at_every_row_count_it_serves(name):
    kernel = KERNELS[name]
    why = kernel.unavailable(DEVICE, DTYPE)
    if why:
        pytest.skip(why)
    m = _layer(group=128) if kernel.shape_unsupported(_layer()) else _layer()  # marlin: groups of 128
    m.set_row_plan(((choice.ROW_POINTS[-1], name),), DTYPE)
    assert all(m.kernel_at(r) == name for r in range(1, choice.ROW_POINTS[-1] + 1))
    assert m.kernel_at(choice.ROW_POINTS[-1] + 1) == "dense"
    for rows in (*choice.ROW_POINTS, 3, 5):
        x = torch.randn(1, rows, m.in_features, device=DEVICE).to(DTYPE)
        y, want = m(x), _reference(m, x)
        assert y.shape == (1, rows, m.out_features) and y.dtype == DTYPE
        err = ((y.float() - want).abs().max() / want.abs().max()).item()
        assert err < (1e-5 if DTYPE == torch.float32 else ERR), (name, rows, err)


def test_a_prefill_under_a_measured_plan_runs_the_prefill_path_at_any_rows():
    """A prefill's call (Int4Linear.prefill_calls) under a measured plan, which now covers up to
    512 rows for batched suffixes, runs the prefill path where it is set up for the layer: its
    prefetched dense slot, a prefill kernel, or its dense copy; with none set up, or outside a
    prefill, the plan; without a measured plan (the default and named kernels, the exact
    engines) the row rule as before, so the exact engines stay transformers' arithmetic."""
    m = _layer()
    x = torch.randn(1, 200, m.in_features, device=DEVICE).to(DTYPE)
    want = _reference(m, x)

    def runs_plan(y):
        return ((y.float() - want).abs().max() / want.abs().max()).item() < ERR

    bias_only = m.bias.expand(1, 200, -1).to(DTYPE)
    m.set_row_plan(((choice.ROW_POINTS[-1], "tinygemm"),), DTYPE)
    m.prefill_weight = torch.zeros(m.out_features, m.in_features, dtype=DTYPE, device=DEVICE)  # y: the bias
    m.read_prefill_weight = True  # DensePrefetch.reading
    with Int4Linear.prefill_calls([m]):
        assert m.prefilling and torch.equal(m(x), bias_only)  # the prefetched slot
    assert not m.prefilling and runs_plan(m(x))  # a batched suffix: the plan
    m.prefill_weight, m.read_prefill_weight = None, False
    with Int4Linear.prefill_calls([m]):
        assert runs_plan(m(x))  # no slot, no copy, dense prefill: nothing set up, the plan
        m.dense_copy = torch.zeros(m.out_features, m.in_features, dtype=DTYPE, device=DEVICE)
        assert torch.equal(m(x), bias_only)  # --int4-prefill-copy
        m.dense_copy = None
    m.set_row_plan(None, DTYPE)  # the default: tinygemm up to dense_rows
    m.dense_rows = 1000
    m.prefill_weight = torch.zeros(m.out_features, m.in_features, dtype=DTYPE, device=DEVICE)
    m.read_prefill_weight = True
    with Int4Linear.prefill_calls([m]):
        assert m.kernel_at(200) == "tinygemm" and runs_plan(m(x))


def test_an_engine_tells_its_int4_layers_when_a_prompt_prefill_calls_them(tiny_llava_dir, demo_image, monkeypatch):
    """Under a measured plan the static engine's prefill from column 0 calls its int4 linears with
    `prefilling` on (the prefill path at any rows); a suffix run as a prefill (longer than a
    bucket, or a batch's of unequal lengths) and decode steps with it off (the plan)."""
    from bench.engines.spec import EngineSpec
    from bench.engines.static import StaticEngine
    from bench.models.loader import load_checkpoint
    from bench.quant.awq import Int4Options, quantize_model
    from variants.prefix import PrefixKVPolicy

    adapter = load_checkpoint(tiny_llava_dir, None, torch.device("cpu"), torch.float32)
    quantize_model(adapter, Int4Options(method="rtn", group_size=64))
    engine = StaticEngine(adapter, PrefixKVPolicy(64),
                          EngineSpec(int4_kernels="measured", int4_kernel_candidates=("dense", "tinygemm")))
    assert engine._prefill_int4 and all(m.row_plan is not None for m in engine._prefill_int4)
    seen = []
    forward = Int4Linear.forward

    def recording(self, x):
        if self.row_plan is not None:  # (the separate projections above 64 rows keep the default: no flag)
            seen.append((x.numel() // self.in_features, self.prefilling))
        return forward(self, x)

    monkeypatch.setattr(Int4Linear, "forward", recording)
    cold = engine.run(demo_image, "What is shown?", 3)
    assert {p for rows, p in seen if rows == cold.prompt_tokens} == {True}
    assert {p for rows, p in seen if rows == 1} == {False}
    seen.clear()
    long = "Describe " + "every small detail of the picture, " * 12
    warm = engine.run(demo_image, long, 3)
    suffix = warm.prompt_tokens - warm.cached_tokens
    assert warm.cache_hit and suffix > 64 and {p for rows, p in seen if rows == suffix} == {False}
    assert not any(m.prefilling for m in engine._prefill_int4)


def test_the_graph_engine_measures_its_fused_projections_up_to_the_batched_suffix_rows(tiny_llava_dir, monkeypatch):
    """The graph engine runs its fused projections at every length, so its measured choice
    covers ROW_POINTS up to 512 (a batch of 16's 32-token suffixes); the static engine's, whose
    separate projections run above FUSED_MAX_ROWS, stops there."""
    from bench.engines.cache_policy import CachePolicy
    from bench.engines.graph import GraphEngine
    from bench.engines.spec import EngineSpec
    from bench.engines.static import StaticEngine
    from bench.models.loader import load_checkpoint
    from bench.quant.awq import Int4Options, quantize_model

    monkeypatch.setattr(GraphEngine, "requires_cuda", False)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    adapter = load_checkpoint(tiny_llava_dir, None, torch.device("cpu"), torch.float32)
    quantize_model(adapter, Int4Options(method="rtn", group_size=64))
    spec = dict(int4_kernels="measured", int4_kernel_candidates=("dense", "tinygemm"))
    try:
        graph = GraphEngine(adapter, CachePolicy(), EngineSpec(**spec, fused_max_rows=2**62)).int4_kernels
    finally:
        torch._dynamo.reset()
    assert all(m.decode_rows() == 512 for m in graph.layers)  # (until the next engine sets its own)
    static = StaticEngine(adapter, CachePolicy(), EngineSpec(**spec)).int4_kernels
    for plan in graph.plans.values():
        assert set(plan.us["dense"]) == set(choice.ROW_POINTS) and plan.plan[-1][0] == 512
    for plan in static.plans.values():
        assert max(plan.us["dense"]) == FUSED_MAX_ROWS


def _unpack8(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([(packed.to(torch.int64) >> (4 * i)) & 15 for i in range(8)], dim=-1).flatten(-2)


def test_marlin_layout_holds_every_code_scale_and_zero_once_where_its_kernel_reads_them():
    """Marlin's weight is 16 x 16 tiles along K, each strip of 64 columns' 1024 codes in the
    tensor-core fragment order, 8 nibbles a word; its scales and zero points are permuted per 64
    columns (the zero points also interleaved). Undoing each step gives the layer's codes back."""
    from bench.quant.w4a16 import marlin

    n, k, g = 192, 384, 128
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (n, k), generator=gen)
    zero = torch.randint(0, 16, (n, k // g), generator=gen)
    scale = torch.rand(n, k // g, generator=gen) + 0.5
    perm, sperm = marlin.weight_perm(), marlin.scale_perm()
    assert sorted(perm.tolist()) == list(range(1024)) and sorted(sperm.tolist()) == list(range(64))
    w = marlin.marlin_weight(q)
    assert w.shape == (k // 16, 2 * n) and w.dtype == torch.int32
    tiles = torch.empty(k // 16, n * 16, dtype=torch.int64)
    tiles.view(-1, 1024)[:, perm] = _unpack8(w).view(-1, 1024)
    back = tiles.view(k // 16, n // 16, 16, 16).permute(0, 2, 1, 3).reshape(k, n).t()
    assert torch.equal(back, q)
    s = marlin.marlin_scales(scale)
    assert s.shape == (k // g, n) and s.dtype == torch.float16
    unperm = torch.empty_like(s).view(-1, 64)
    unperm[:, sperm] = s.view(-1, 64)
    torch.testing.assert_close(unperm.view(k // g, n).t().float(), scale.half().float())
    z = marlin.marlin_zeros(zero)
    assert z.shape == (k // g, n // 8) and z.dtype == torch.int32
    inter = torch.tensor((0, 2, 4, 6, 1, 3, 5, 7))
    flat = torch.empty(k // g * n // 8, 8, dtype=torch.int64)
    flat[:, inter] = _unpack8(z).view(-1, 8)
    zp = torch.empty(k // g * n // 64, 64, dtype=torch.int64)
    zp[:, sperm] = flat.view(-1, 64)
    assert torch.equal(zp.view(k // g, n).t(), zero)


def test_marlin_refuses_codes_its_packing_would_spill_into_their_neighbours():
    from bench.quant.w4a16.marlin import check_codes

    gen = torch.Generator().manual_seed(0)
    q, zero = torch.randint(0, 16, (64, 256), generator=gen), torch.randint(0, 16, (64, 2), generator=gen)
    check_codes(q, zero)
    with pytest.raises(VariantUnsupported, match=r"4-bit zero points \(0..15\); this layer's run 16..16"):
        check_codes(q, torch.full((64, 2), 16))
    with pytest.raises(VariantUnsupported, match=r"4-bit codes \(0..15\); this layer's run -1..15"):
        check_codes(torch.cat([q, torch.full((64, 1), -1)], 1), zero)


def test_a_failed_marlin_build_is_one_line_naming_the_compilers_error(tmp_path):
    from bench.quant.w4a16.marlin import build_failure

    log = RuntimeError("Error building extension 'vlm_bench_marlin': [1/3] nvcc ...\n"
                       "gptq_marlin.cu(12): error: identifier \"x\" is undefined\n1 error detected")
    why = build_failure(tmp_path, log)
    assert why == (f"marlin could not be built in {tmp_path} (RuntimeError: "
                   'gptq_marlin.cu(12): error: identifier "x" is undefined)')
    assert build_failure(tmp_path, OSError("no space left")).endswith("(OSError: no space left)")


def test_marlin_refuses_what_its_build_does_not_dispatch():
    m = KERNELS["marlin"]
    assert m.unavailable(torch.device("cpu"), torch.float16) == "marlin runs on CUDA only"
    why = {(n, k, g): m.shape_unsupported(_layer(n=n, k=k, group=g)) for n, k, g in
           ((256, 256, 128), (256, 256, 64), (96, 256, 128), (256, 128, 128))}
    assert why[(256, 256, 128)] is None
    assert all(why[s] and "groups of 128" in why[s] for s in ((256, 256, 64), (96, 256, 128), (256, 128, 128)))
    from bench.quant.w4a16.marlin import SOURCES

    source = (SOURCES / "gptq_marlin.cu").read_text()  # one dispatch line per tile shape, groups of 128 only
    assert source.count("AWQ_G128_CALL_IF(marlin_kernels::kU4") == 4
    assert "GPTQ_CALL_IF(marlin_kernels" not in source and "HQQ_CALL_IF(marlin_kernels" not in source


def test_fbgemm_kernels_take_the_layers_own_codes_scales_and_zeros():
    """FBGEMM's int4 format is w = (q - 8) * scale + zero per group (int4_row_quantize_zp): the
    recentred codes with the layer's scale_and_zero pairs give the weight the layer's own dense
    path gives, exactly (on CUDA those pairs are bfloat16, as tinygemm takes them)."""
    m = _layer(bias=False)
    t = m.to_int4()
    sz = m.scale_and_zero.float().cpu()  # [K/G, N, 2]
    n, k, g = m.out_features, m.in_features, m.group_size
    q8 = (t.q - 8).to(torch.int8).float().view(n, k // g, g)
    w = q8 * sz[..., 0].t().unsqueeze(-1) + sz[..., 1].t().unsqueeze(-1)
    torch.testing.assert_close(w.view(n, k), m.dense_weight(torch.float32).cpu(), rtol=1e-6, atol=1e-6)
    assert int(q8.min()) >= -8 and int(q8.max()) <= 7  # int4 as FBGEMM's pack_int4 takes it


def test_fbgemm_kernels_refuse_gpus_and_groups_their_cutlass_code_cannot_take():
    """Both FBGEMM kernels are SM90 CUTLASS code with a K tile of 64: Hopper alone (not Ampere,
    not Blackwell), groups of whole tiles (the shuffled one 128 or more, as FBGEMM asks)."""
    from bench.quant.w4a16.fbgemm import arch_unsupported

    for name in ("fbgemm-rowwise", "fbgemm-shuffled"):
        assert arch_unsupported(name, (9, 0)) is None
        assert all(name in arch_unsupported(name, cc) for cc in ((8, 0), (8, 9), (10, 0), (12, 0)))
        assert KERNELS[name].unavailable(torch.device("cpu"), torch.bfloat16) == f"{name} runs on CUDA only"
    why = {g: {n: KERNELS[n].shape_unsupported(_layer(group=g)) for n in ("fbgemm-rowwise", "fbgemm-shuffled")}
           for g in (32, 64, 128)}
    assert why[32]["fbgemm-rowwise"] and why[32]["fbgemm-shuffled"]
    assert why[64]["fbgemm-rowwise"] is None and why[64]["fbgemm-shuffled"]
    assert why[128] == {"fbgemm-rowwise": None, "fbgemm-shuffled": None}


def test_a_plan_sends_each_row_count_to_its_kernel():
    m = _layer()
    assert [m.kernel_at(r) for r in (1, 8, 9, 500)] == ["tinygemm"] * 2 + ["dense"] * 2  # no plan: dense_rows
    m.set_row_plan(((2, "dense"), (16, "tinygemm")), DTYPE)
    assert [m.kernel_at(r) for r in (1, 2, 3, 16, 17)] == ["dense", "dense", "tinygemm", "tinygemm", "dense"]
    assert choice.plans_column([m]) == "1-2 dense, 3-16 tinygemm, >16 dense"
    assert choice.plan_text(((4, "tinygemm"), (64, "dense")), 8) == "1-4 tinygemm, >4 dense"
    assert choice.plan_text(((64, "dense"),), 8) == "dense"
    m.set_row_plan(None, DTYPE)
    assert choice.plans_column([m, _layer(128, 256)]) == "1-8 tinygemm, >8 dense"


def test_a_plan_compiles_whole_once_per_row_count():
    """The graph engine compiles decoder layers calling Int4Linear: under a plan the forward
    traces without a graph break, compiles once per row count (never per call), and computes
    what eager does."""
    import torch._dynamo.testing

    m = _layer()
    m.set_row_plan(((2, "dense"), (16, "tinygemm")), DTYPE)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda t: m(t), backend=counter, fullgraph=True, dynamic=False)
    for rows in (1, 1, 4, 4, 40, 40):
        x = torch.randn(1, rows, m.in_features, device=DEVICE).to(DTYPE)
        torch.testing.assert_close(compiled(x), m(x))
    assert counter.frame_count == 3


class _Slow(W4A16Kernel):
    """Right, and much slower than tinygemm: tinygemm 10 times."""

    name = "test-slow"

    def run(self, layer, x):
        for _ in range(10):
            y = KERNELS["tinygemm"].run(layer, x)
        return y


class _Wrong(W4A16Kernel):
    """Fast and wrong."""

    name = "test-wrong"

    def run(self, layer, x):
        return x.new_zeros(x.shape[0], layer.out_features)


class _Broken(W4A16Kernel):
    name = "test-broken"

    def run(self, layer, x):
        raise RuntimeError("no kernel image for this device")


@pytest.fixture
def odd_kernels(monkeypatch):
    for k in (_Slow(), _Wrong(), _Broken()):
        monkeypatch.setitem(KERNELS, k.name, k)


@pytest.fixture
def one_thread():
    """One intra-op thread: a CPU op's threads spin-waiting for each other on a loaded machine
    make its time erratic (tens of times over), which no comparison of timings survives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_measured_choice_takes_neither_a_slower_nor_a_wrong_kernel(odd_kernels, one_thread):
    m = _layer(bias=False)
    plan = choice.measure(m, DTYPE, points=(1, 4))
    names = {name for _, name in plan.plan}
    assert names and not any(n.startswith("test-") for n in names), plan.plan
    assert [top for top, _ in plan.plan][-1] == 4 and list(plan.plan) == sorted(plan.plan)
    assert all(plan.err["test-wrong"][r] == pytest.approx(1.0) for r in (1, 4))
    assert set(plan.us["test-slow"]) == {1, 4}  # timed, and not chosen
    assert "no kernel image" in plan.left_out["test-broken"]
    rows = choice.table_rows([plan])
    assert not any(r["chosen"] for r in rows if r["kernel"].startswith("test-"))
    timed = [r for r in rows if r["us"] is not None]  # and the bandwidth each call's time would take
    assert timed and all(r["int4_gb_per_s"] == pytest.approx(
        choice.int4_gb_per_s(r["out_features"], r["in_features"], r["group_size"], r["us"]), rel=1e-3) for r in timed)
    assert sum(r["chosen"] for r in rows) == 2  # one kernel per measured row count
    assert [r["left_out"] for r in rows if r["kernel"] == "test-broken"] != [""]


def test_a_kernels_bandwidth_counts_the_int4_weights_with_their_scales_and_zeros():
    # 4096 x 4096 at group 128: 8 MiB of nibbles + 4096 * 32 groups * (fp16 scale + fp16 zero)
    assert choice.int4_gb_per_s(4096, 4096, 128, 10.0) == pytest.approx((8388608 + 524288) / 10e-6 / 1e9)
    assert choice.int4_gb_per_s(4096, 4096, 128, 20.0) == pytest.approx(choice.int4_gb_per_s(4096, 4096, 128, 10.0) / 2)


class _FewRows(W4A16Kernel):
    """Right, for few rows only (a GEMV): it records the rows it is called at."""

    name = "test-few-rows"
    max_rows = 2

    def __init__(self):
        self.rows = set()

    def run(self, layer, x):
        self.rows.add(x.shape[0])
        return KERNELS["tinygemm"].run(layer, x)


def test_a_kernel_with_a_row_limit_is_measured_and_chosen_up_to_it_only(monkeypatch, tmp_path, capsys):
    """gemlite's GEMVs serve at most 4 rows under gemlite's own dispatch: they are neither tuned
    nor timed above (each tuning costs seconds per row count on the GPU), and never chosen there;
    the measurement's status line says which row counts such a kernel is measured at."""
    few = _FewRows()
    monkeypatch.setitem(KERNELS, few.name, few)
    m = _layer(bias=False)
    choice.choose_kernels([m], "measured", DTYPE, tmp_path / "kernels.json", points=(1, 2, 4, 8),
                          allowed=("tinygemm", few.name))
    assert f"measuring tinygemm, {few.name} (1,2 rows) for 256x256 (group 64) at 4 row counts" in capsys.readouterr().err
    few.rows.clear()
    plan = choice.measure(m, DTYPE, points=(1, 2, 4, 8), names=["tinygemm", few.name])
    assert few.rows == {1, 2} and set(plan.us[few.name]) == set(plan.err[few.name]) == {1, 2}
    assert set(plan.us["tinygemm"]) == {1, 2, 4, 8}
    assert plan.plan[-1] == (8, "tinygemm") and all(top <= 2 for top, n in plan.plan if n == few.name)
    rows = choice.table_rows([plan])
    assert sorted(r["rows"] for r in rows if r["kernel"] == few.name) == [1, 2]
    assert measurements.ShapePlan.from_json(plan.shape, plan.to_json()).us == plan.us  # kept and read back

    monkeypatch.setattr(few, "max_rows", 1)
    plan = choice.measure(m, DTYPE, points=(2, 4), names=["tinygemm", few.name])
    assert few.name not in plan.us and "at most 1 row;" in plan.left_out[few.name]
    assert {n for _, n in plan.plan} == {"tinygemm"}
    gemvs = [k for k in KERNELS.values() if k.name.startswith("gemlite-gemv")]
    assert len(gemvs) == 3 and {k.max_rows for k in gemvs} == {4}
    assert KERNELS["gemlite-gemm"].max_rows is None and KERNELS["gemlite-gemm-splitk"].max_rows is None


class _FailsToBuild(W4A16Kernel):
    """Builds its code on first use (as marlin does); while `toolchain` is broken the build fails,
    and the kernel says so from then on."""

    name = "test-builds"
    state_key = "test-build"

    def __init__(self):
        self.toolchain_ok, self.failed = False, None

    def unavailable(self, device, dtype):
        return self.failed

    def prepare(self, layer, dtype):
        if not self.toolchain_ok:
            self.failed = "test-builds could not be built (no compiler)"
            raise VariantUnsupported(self.failed)
        return {}, None

    def run(self, layer, x):
        return KERNELS["tinygemm"].run(layer, x)


def test_a_plan_measured_while_a_candidates_build_failed_is_not_kept(tmp_path, monkeypatch):
    """A kernel whose build fails during a measurement is left out with the reason; that plan is
    not kept (a later process, its toolchain fixed, measures the shape again with the kernel),
    while a shape measured after the failure, the kernel no longer a candidate, is kept."""
    kernel = _FailsToBuild()
    monkeypatch.setitem(KERNELS, kernel.name, kernel)
    cache = tmp_path / "kernels.json"
    allowed = ("tinygemm", kernel.name)
    got = choice.choose_kernels([_layer(), _layer(128, 256)], "measured", DTYPE, cache, points=(1, 2), allowed=allowed)
    assert "could not be built" in got.plans[(256, 256, 64)].left_out[kernel.name]
    assert kernel.name not in got.plans[(128, 256, 64)].us
    kept = json.loads(cache.read_text())["entries"]
    assert [json.loads(key)["shape"] for key in kept] == [[128, 256, 64]]
    kernel.toolchain_ok, kernel.failed = True, None  # the next process, the toolchain fixed
    again = choice.choose_kernels([_layer(seed=3)], "measured", DTYPE, cache, points=(1, 2), allowed=allowed)
    assert not again.plans[(256, 256, 64)].cached and kernel.name in again.plans[(256, 256, 64)].us


def _rewrite_entry(cache, candidates, **times):
    """Give the file's one entry the candidates `candidates` and, per kernel of `times`, those
    times (row count -> us) with errors of 0."""
    entries = json.loads(cache.read_text())["entries"]
    key, entry = next(iter(entries.items()))
    fields = json.loads(key)
    fields["candidates"] = list(candidates)
    for name, by_rows in times.items():
        entry = {**entry, "us": {**entry["us"], name: {str(r): t for r, t in by_rows.items()}},
                 "err": {**entry["err"], name: {str(r): 0.0 for r in by_rows}}}
    cache.write_text(json.dumps({"version": measurements.CACHE_VERSION,
                                 "entries": {json.dumps(fields, sort_keys=True): entry}}))


def test_a_kernel_whose_times_are_taken_is_still_made_and_checked_here_where_it_is_chosen(tmp_path, monkeypatch):
    """Times taken from a measurement for other candidates (another process, another machine of
    the kind) skip the timing: the kernel's format is made on the layer and its error taken there
    where it would be chosen, so one whose build fails here is left out and that plan is not kept;
    and a kernel's times are taken only where they cover exactly the row counts it would be timed
    at now."""
    kernel, few = _FailsToBuild(), _FewRows()
    monkeypatch.setitem(KERNELS, kernel.name, kernel)
    monkeypatch.setitem(KERNELS, few.name, few)
    cache = tmp_path / "kernels.json"
    kernel.toolchain_ok = True
    choice.choose_kernels([_layer()], "measured", DTYPE, cache, points=(1, 2), allowed=("tinygemm", kernel.name))
    _rewrite_entry(cache, ("tinygemm", kernel.name), **{kernel.name: {1: 1e-3, 2: 1e-3}})  # the fastest
    monkeypatch.setattr(measurements, "_KEPT", {})  # the next process, on a machine that cannot build it
    kernel.toolchain_ok = False
    got = choice.choose_kernels([_layer()], "measured", DTYPE, cache, points=(1, 2),
                                allowed=("dense", "tinygemm", kernel.name)).plans[(256, 256, 64)]
    assert got.reused == {"tinygemm": (1, 2)} and "could not be built" in got.left_out[kernel.name]
    assert len(json.loads(cache.read_text())["entries"]) == 1  # not kept
    # an entry whose GEMV was timed past its row limit now
    _rewrite_entry(cache, ("tinygemm", few.name), **{few.name: {1: 1e-3, 2: 1e-3, 4: 1e-3}})
    monkeypatch.setattr(measurements, "_KEPT", {})
    plan = choice.choose_kernels([_layer()], "measured", DTYPE, cache, points=(1, 2),
                                 allowed=("tinygemm", few.name, "dense")).plans[(256, 256, 64)]
    assert few.name not in plan.reused and plan.us[few.name][1] != 1e-3  # 1, 2 and 4 rows kept: timed again
    assert few.rows == {1, 2}
    bad = {**plan.to_json(), "reused": ["nope"]}
    with pytest.raises(ValueError, match="reused"):
        measurements.ShapePlan.from_json(plan.shape, bad)
    older = {k: v for k, v in plan.to_json().items() if k not in ("reused", "unchecked")}  # before reuse existed
    assert measurements.ShapePlan.from_json(plan.shape, older).reused == {}
    listed = {**plan.to_json(), "reused": ["tinygemm"]}  # a list of kernels: every row count taken
    assert measurements.ShapePlan.from_json(plan.shape, listed).reused == {"tinygemm": (1, 2)}


class _Counting(W4A16Kernel):
    """tinygemm's result (or, while `wrong`, twice it), recording the rows of every call."""

    def __init__(self, name):
        self.name, self.calls, self.wrong = name, [], False

    def run(self, layer, x):
        self.calls.append(x.shape[0])
        y = KERNELS["tinygemm"].run(layer, x)
        return 2 * y if self.wrong else y


def test_a_kernel_whose_times_are_all_taken_is_called_only_where_it_would_be_chosen(tmp_path, monkeypatch):
    """Checking every reused kernel at every row count compiled each one's code at each (tens of
    seconds a shape on an H100) for kernels that served nothing: now the fastest by its kept times
    is checked at a row count before it is chosen there, the others keep their earlier errors
    (`unchecked`, the table's error_reused), and one wrong here is passed over for the next."""
    fast, slow = _Counting("test-fast"), _Counting("test-slow")
    for k in (fast, slow):
        monkeypatch.setitem(KERNELS, k.name, k)
    cache, names = tmp_path / "kernels.json", ("tinygemm", fast.name, slow.name)
    choice.choose_kernels([_layer()], "measured", DTYPE, cache, points=(1, 2, 4), allowed=names)
    slowest = {1: 1e9, 2: 1e9, 4: 1e9}
    _rewrite_entry(cache, names, **{fast.name: {1: 1e-3, 2: 1e-3, 4: 1e9}, slow.name: slowest,
                                    "tinygemm": {1: 1e9, 2: 1e9, 4: 1e-3}})

    def again():
        monkeypatch.setattr(measurements, "_KEPT", {})  # another process
        fast.calls.clear(), slow.calls.clear()
        return choice.choose_kernels([_layer()], "measured", DTYPE, cache, points=(1, 2, 4),
                                     allowed=(*names, "dense")).plans[(256, 256, 64)]

    plan = again()  # dense, a new candidate, is timed; the others' times are taken
    assert plan.reused == {n: (1, 2, 4) for n in names}
    assert sorted(fast.calls) == [1, 2] and slow.calls == []
    assert plan.plan == ((2, fast.name), (4, "tinygemm"))
    assert plan.unchecked == {fast.name: (4,), slow.name: (1, 2, 4), "tinygemm": (1, 2)}
    assert all(plan.err[fast.name][r] < ERR for r in (1, 2)) and plan.err[slow.name] == {1: 0.0, 2: 0.0, 4: 0.0}
    rows = {(r["kernel"], r["rows"]): r["error_reused"] for r in choice.table_rows([plan])}
    assert rows[(fast.name, 1)] is False and rows[(fast.name, 4)] is True and rows[("dense", 4)] is False
    assert measurements.ShapePlan.from_json(plan.shape, json.loads(json.dumps(plan.to_json()))).unchecked == plan.unchecked
    with pytest.raises(ValueError, match="unchecked"):  # errors taken where times were not
        measurements.ShapePlan.from_json(plan.shape, {**plan.to_json(), "unchecked": {"dense": [1]}})

    _rewrite_entry(cache, names, **{fast.name: {1: 1e-3, 2: 1e-3, 4: 1e9}, slow.name: slowest,
                                    "tinygemm": {1: 1e9, 2: 1e9, 4: 1e-3}})
    fast.wrong = True  # its kept errors say it is right; here it is not
    plan = again()
    assert sorted(fast.calls) == [1, 2] and all(plan.err[fast.name][r] > choice.TOLERANCE for r in (1, 2))
    assert {n for top, n in plan.plan if top <= 2} == {"dense"}  # the fastest of the rest, checked


def test_measured_choice_is_made_once_per_device_and_shape(tmp_path):
    cache = tmp_path / "kernels.json"
    layers = [_layer(seed=i) for i in range(3)] + [_layer(128, 256, seed=9)]
    first = choice.choose_kernels(layers, "measured", DTYPE, cache, points=(1, 8))
    assert set(first.plans) == {(256, 256, 64), (128, 256, 64)}  # measured on one layer per shape
    assert not any(p.cached for p in first.plans.values())
    assert all(m.row_plan == first.plans[(m.out_features, m.in_features, 64)].plan for m in layers)
    saved = json.loads(cache.read_text())
    assert len(saved["entries"]) == 2 and all(json.loads(k)["device"] for k in saved["entries"])
    again = choice.choose_kernels([_layer(seed=5)], "measured", DTYPE, cache, points=(1, 8))
    assert again.plans[(256, 256, 64)].cached and again.plans[(256, 256, 64)].plan == first.plans[(256, 256, 64)].plan
    choice.choose_kernels([_layer(seed=5)], "measured", DTYPE, cache, points=(1, 2))  # other points: measured
    assert len(json.loads(cache.read_text())["entries"]) == 3
    cache.write_text("{not json")  # unreadable: replaced, holding what this process measured
    redo = choice.choose_kernels([_layer()], "measured", DTYPE, cache, points=(1, 8))
    assert redo.plans[(256, 256, 64)].plan == first.plans[(256, 256, 64)].plan
    assert len(json.loads(cache.read_text())["entries"]) == 1


def test_a_malformed_entry_is_left_out_and_dropped_at_the_next_save(tmp_path, monkeypatch, capsys):
    """One malformed entry of a kernels.json (a negative time) spoils no other: a run warns once
    (not once per shape or save), reuses the well-formed entry and writes the file without the
    malformed one, so that `int4-kernels` then lists it without a warning."""
    from bench.cli import main

    cache = tmp_path / "kernels.json"
    monkeypatch.setattr(measurements, "_KEPT", {})
    first = choice.choose_kernels([_layer()], "measured", DTYPE, cache, points=(1, 2))
    (good, entry), = json.loads(cache.read_text())["entries"].items()
    bad = good.replace('"shape": [256, 256, 64]', '"shape": [512, 256, 64]')
    assert bad != good
    cache.write_text(json.dumps({"version": measurements.CACHE_VERSION,
                                 "entries": {good: entry, bad: {**entry, "us": {"tinygemm": {"1": -1.0}}}}}))
    monkeypatch.setattr(measurements, "_KEPT", {})
    capsys.readouterr()
    again = choice.choose_kernels([_layer(seed=3), _layer(128, 256), _layer(64, 256)], "measured", DTYPE, cache,
                                  points=(1, 2))
    err = capsys.readouterr().err
    assert err.count("entries malformed") == 1 and "1 of 2 entries malformed" in err, err
    assert again.plans[(256, 256, 64)].cached and again.plans[(256, 256, 64)].plan == first.plans[(256, 256, 64)].plan
    entries = json.loads(cache.read_text())["entries"]
    assert good in entries and bad not in entries and len(entries) == 3
    assert main(["int4-kernels", str(cache)]) == 0 and not capsys.readouterr().err


def test_a_newer_versions_kernels_file_is_read_by_no_run_and_never_replaced(tmp_path, monkeypatch, capsys):
    """A kernels.json of a later version than this harness writes (a newer harness's) is not
    replaced: the run measures without it, says so once, and leaves the file as it was."""
    cache = tmp_path / "kernels.json"
    newer = json.dumps({"version": measurements.CACHE_VERSION + 1, "entries": {"a newer key": {"plan": "?"}}})
    cache.write_text(newer)
    capsys.readouterr()
    chosen = choice.choose_kernels([_layer(), _layer(128, 256)], "measured", DTYPE, cache, points=(1, 2))
    assert not any(p.cached for p in chosen.plans.values())
    err = capsys.readouterr().err
    assert err.count("written by a newer version") == 1 and "saving nothing there" in err, err
    assert cache.read_text() == newer


def test_a_kernels_file_that_cannot_be_used_is_measured_again_not_waited_on(tmp_path, monkeypatch, capsys):
    """A kernels.json that is a FIFO is not opened (reading one blocks until a writer comes): the
    plans are measured and the file replaced. A kept plan naming a kernel outside its own
    candidates (a file edited by hand) is measured again. A held lock is waited on once per run,
    not once per shape."""
    import os
    import threading

    from filelock import FileLock

    cache = tmp_path / "kernels.json"
    os.mkfifo(cache)
    done = []
    t = threading.Thread(target=lambda: done.append(choice.choose_kernels([_layer()], "measured", DTYPE, cache,
                                                                          points=(1, 2))), daemon=True)
    t.start()
    t.join(60)
    assert done, "blocked reading a FIFO"
    assert "not a regular file" in capsys.readouterr().err and cache.is_file()
    entries = json.loads(cache.read_text())["entries"]
    key, entry = next(iter(entries.items()))
    assert "marlin" not in json.loads(key)["candidates"]
    cache.write_text(json.dumps({"version": measurements.CACHE_VERSION,
                                 "entries": {key: {**entry, "plan": [[2, "marlin"]]}}}))
    monkeypatch.setattr(measurements, "_KEPT", {})
    plan = choice.choose_kernels([_layer()], "measured", DTYPE, cache, points=(1, 2)).plans[(256, 256, 64)]
    assert not plan.cached and "marlin" not in dict(plan.plan).values()
    assert "outside their own candidates (marlin); measuring again" in capsys.readouterr().err
    monkeypatch.setattr(measurements, "_KEPT", {})
    monkeypatch.setattr(measurements, "LOCK_SECONDS", 0.05)
    with FileLock(f"{cache}.lock"):  # another process saving
        choice.choose_kernels([_layer(), _layer(128, 256)], "measured", DTYPE, cache, points=(1, 4))
        choice.choose_kernels([_layer(64, 256)], "measured", DTYPE, cache, points=(1, 4))  # another engine
    err = capsys.readouterr().err
    assert err.count("its lock was held") == 1, err  # three shapes measured, the lock waited on once
    # an error measured as NaN (a kernel that returned NaN) is kept and read back, never chosen
    entries = json.loads(cache.read_text())["entries"]
    key, entry = next(iter(entries.items()))
    entry["err"]["tinygemm"] = {r: float("nan") for r in entry["err"]["tinygemm"]}
    assert measurements.ShapePlan.from_json(json.loads(key)["shape"], entry).err["tinygemm"]


def test_an_error_of_nan_or_inf_is_saved_as_null_and_read_back_as_nan(tmp_path):
    from bench.measure.results import write_json

    plan = measurements.ShapePlan((256, 256, 64), ((4, "dense"),), us={"dense": {1: 2.0, 4: 3.0}},
                                  err={"dense": {1: float("nan"), 4: float("inf")}})
    write_json(tmp_path / "kernels.json", plan.to_json())
    text = (tmp_path / "kernels.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = measurements.ShapePlan.from_json([256, 256, 64], json.loads(text))
    assert all(e != e for e in back.err["dense"].values())  # NaN: never within the tolerance, never chosen


def test_forced_kernel_the_device_cannot_run_is_refused():
    from bench.errors import VariantUnsupported

    name = _unrunnable()
    if name is None:
        pytest.skip("every kernel runs here")
    with pytest.raises(VariantUnsupported, match=name):
        choice.choose_kernels([_layer()], name, DTYPE)


def test_a_forced_kernel_serves_up_to_dense_rows_as_it_is_when_called(odd_kernels):
    """--int4-kernels NAME runs NAME up to the layer's dense_rows, also when dense_rows is set
    after the choice (bench.quant.awq.set_dense_rows sets the attribute)."""
    m = _layer()
    chosen = choice.choose_kernels([m], "test-slow", DTYPE)
    assert [m.kernel_at(r) for r in (1, 8, 9)] == ["test-slow", "test-slow", "dense"]
    m.dense_rows = 16
    assert [m.kernel_at(r) for r in (9, 16, 17)] == ["test-slow", "test-slow", "dense"]
    assert chosen.column() == "1-16 test-slow, >16 dense"


def _plan(kernel="tinygemm") -> "choice.ShapePlan":
    return choice.ShapePlan((32, 256, 64), ((1, kernel),), {kernel: {1: 1.0}}, {kernel: {1: 0.0}})


def _key(points=(1,), shape=(32, 256, 64)) -> str:
    from bench.quant.w4a16.measurements import cache_key

    return cache_key(DEVICE, DTYPE, shape, points, ["tinygemm"])


def test_two_writers_keep_each_others_measurements(tmp_path):
    """Two runs (on two GPUs, say) open kernels.json before either saves: the file ends up with
    both runs' plans, not the last writer's alone."""
    from bench.quant.w4a16.measurements import PlanCache

    path = tmp_path / "kernels.json"
    first, second = PlanCache(path), PlanCache(path)
    first.put(_key((1, 3)), _plan())
    second.put(_key((1, 5)), _plan())
    assert set(json.loads(path.read_text())["entries"]) == {_key((1, 3)), _key((1, 5))}


def test_a_kept_plan_naming_an_unknown_kernel_is_measured_again(tmp_path, capsys):
    """An entry naming a kernel this harness does not have (another version's file) is not
    used: the shape is measured again, and the entry stays in the file for its owner (and
    `int4-kernels` lists it)."""
    from bench.cli import main
    from bench.quant.w4a16.measurements import PlanCache

    path = tmp_path / "kernels.json"
    PlanCache(path).put(_key((7,)), _plan())
    data = json.loads(path.read_text())
    data["entries"] = {_key((1, 2), (96, 256, 64)): {**data["entries"][_key((7,))], "plan": [[2, "machete"]]}}
    path.write_text(json.dumps(data))
    got = choice.choose_kernels([_layer(96, 256)], "measured", DTYPE, path, points=(1, 2))
    assert not got.plans[(96, 256, 64)].cached and {n for _, n in got.plans[(96, 256, 64)].plan} <= set(KERNELS)
    assert len(json.loads(path.read_text())["entries"]) == 2
    capsys.readouterr()
    assert main(["int4-kernels", str(path)]) == 0 and "1-2 machete, >2 dense" in capsys.readouterr().out


def test_a_dense_copy_is_measured_apart(tmp_path):
    """--int4-prefill-copy makes `dense` read a kept dense weight instead of dequantizing: a plan
    measured with copies is not reused for layers without (nor the other way round), and `dense`
    is timed again there; the other kernels, which read their own formats, lend their times."""
    path = tmp_path / "kernels.json"
    plain = choice.choose_kernels([_layer(64, 256)], "measured", DTYPE, path, points=(1, 2))
    copied = _layer(64, 256)
    copied.keep_dense_copy(DTYPE)
    with_copy = choice.choose_kernels([copied], "measured", DTYPE, path, points=(1, 2))
    first, second = plain.plans[(64, 256, 64)], with_copy.plans[(64, 256, 64)]
    assert not first.cached and not second.cached
    assert sorted(json.loads(k)["dense_copy"] for k in json.loads(path.read_text())["entries"]) == [False, True]
    assert "dense" in first.us and "dense" not in second.reused and second.us["dense"] != first.us["dense"]
    assert set(second.reused) == set(first.us) - {"dense"} and second.reused
    assert all(second.us[n] == first.us[n] for n in second.reused)


def test_kernels_that_launch_with_pdl_are_measured_apart_under_pdl(tmp_path, monkeypatch, capsys):
    """Under programmatic dependent launch (bench.pdl) a kernel that launches with it is another
    measurement: a plan measured without is not reused, that kernel is timed again and the others
    lend their times; with no such kernel among the candidates PDL changes nothing (same plan)."""
    path = tmp_path / "kernels.json"
    plain = choice.choose_kernels([_layer(64, 256)], "measured", DTYPE, path, points=(1, 2)).plans[(64, 256, 64)]
    monkeypatch.setattr(choice, "pdl_enabled", lambda device: True)
    assert choice.choose_kernels([_layer(64, 256)], "measured", DTYPE, path, points=(1, 2)).plans[(64, 256, 64)].cached
    monkeypatch.setattr(KERNELS["tinygemm"], "launches_pdl", True)
    under = choice.choose_kernels([_layer(64, 256)], "measured", DTYPE, path, points=(1, 2)).plans[(64, 256, 64)]
    assert not under.cached and "tinygemm" in under.us and "tinygemm" not in under.reused
    assert set(under.reused) == set(plain.us) - {"tinygemm"} and under.reused
    assert sorted(bool(json.loads(k).get("pdl")) for k in json.loads(path.read_text())["entries"]) == [False, True]
    # another share of the weights asked of L2 before the wait (bench.pdl.PREFETCH) is another
    # measurement again, of that kernel only
    from bench import pdl

    monkeypatch.setattr(pdl, "PREFETCH", 2)
    other = choice.choose_kernels([_layer(64, 256)], "measured", DTYPE, path, points=(1, 2)).plans[(64, 256, 64)]
    assert not other.cached and "tinygemm" not in other.reused and set(other.reused) == set(under.reused)
    keys = [json.loads(k) for k in json.loads(path.read_text())["entries"]]
    assert sorted(str(k.get("pdl_prefetch")) for k in keys) == ["0", "2", "None"]
    monkeypatch.setattr(pdl, "PRELOAD", True)  # its first block loaded before the wait: another again
    preloaded = choice.choose_kernels([_layer(64, 256)], "measured", DTYPE, path, points=(1, 2)).plans[(64, 256, 64)]
    assert not preloaded.cached and "tinygemm" not in preloaded.reused
    assert [json.loads(k).get("pdl_preload") for k in json.loads(path.read_text())["entries"]].count(True) == 1
    monkeypatch.setattr(pdl, "PRELOAD", False)
    assert pdl.LATE  # the next kernel let start after the main loop by default: in the keys so far
    assert all(k.get("pdl_late") is True for k in map(json.loads, json.loads(path.read_text())["entries"])
               if k.get("pdl"))
    monkeypatch.setattr(pdl, "LATE", False)  # let start right after the wait: another measurement again
    early = choice.choose_kernels([_layer(64, 256)], "measured", DTYPE, path, points=(1, 2)).plans[(64, 256, 64)]
    assert not early.cached and "tinygemm" not in early.reused and set(early.reused) == set(under.reused)
    assert [k.get("pdl_late") for k in map(json.loads, json.loads(path.read_text())["entries"])
            if k.get("pdl")].count(None) == 1
    from bench.cli import main

    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "400")  # the table unwrapped, whatever the device's name takes
    assert main(["int4-kernels", str(path)]) == 0
    listing = capsys.readouterr().out
    assert listing.count("PDL (prefetch") == 4, listing
    assert main(["int4-kernels", str(path), "--out", str(tmp_path / "t.csv")]) == 0
    with open(tmp_path / "t.csv", newline="") as f:
        assert {(r["pdl"], r["pdl_prefetch"], r["pdl_late"]) for r in csv.DictReader(f)} == {
            ("false", "", ""), ("true", "0", "true"), ("true", "2", "true"), ("true", "2", "false")}


def test_a_kernels_own_timing_settings_are_measured_apart(tmp_path, monkeypatch, capsys):
    """A kernel's timing settings (W4A16Kernel.timing_settings: triton-f16x2's K loops) key its
    measurement: other settings time that kernel again, the others lend their times; a key from
    before the kernel had settings stands for its settings_before, reused where they still hold."""
    path = tmp_path / "kernels.json"
    tinygemm = KERNELS["tinygemm"]
    monkeypatch.setattr(tinygemm, "settings_before", {"k_loops": ["1"]})
    before = choice.choose_kernels([_layer(64, 256)], "measured", DTYPE, path, points=(1, 2)).plans[(64, 256, 64)]
    assert "kernel_settings" not in json.loads(next(iter(json.loads(path.read_text())["entries"])))
    settings = {"k_loops": ["1"]}
    monkeypatch.setattr(tinygemm, "timing_settings", lambda: settings)
    # the settings it had before it had any: the same measurement, its times lent (not timed again)
    same = choice.choose_kernels([_layer(64, 256)], "measured", DTYPE, path, points=(1, 2)).plans[(64, 256, 64)]
    assert not same.cached and "tinygemm" in same.reused and set(same.reused) == set(before.us)
    settings = {"k_loops": ["1", "3"]}
    other = choice.choose_kernels([_layer(64, 256)], "measured", DTYPE, path, points=(1, 2)).plans[(64, 256, 64)]
    assert not other.cached and "tinygemm" in other.us and "tinygemm" not in other.reused
    assert set(other.reused) == set(before.us) - {"tinygemm"} and other.reused
    keys = [json.loads(k) for k in json.loads(path.read_text())["entries"]]
    assert sorted(str(k.get("kernel_settings")) for k in keys) == [
        "None", "{'tinygemm': {'k_loops': ['1', '3']}}", "{'tinygemm': {'k_loops': ['1']}}"]
    assert choice.choose_kernels([_layer(64, 256)], "measured", DTYPE, path, points=(1, 2)).plans[(64, 256, 64)].cached
    from bench.cli import main

    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "400")  # the table unwrapped, whatever the device's name takes
    assert main(["int4-kernels", str(path)]) == 0
    out = capsys.readouterr().out  # each measurement names the settings tinygemm was timed with
    assert out.count("k_loops=1,3") == 1 and len(re.findall(r"k_loops=1(?!,)", out)) == 2, out
    assert main(["int4-kernels", str(path), "--out", str(tmp_path / "t.csv")]) == 0
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["kernel_settings"] for r in rows if r["kernel"] == "tinygemm"} == {'{"k_loops": ["1"]}',
                                                                                 '{"k_loops": ["1", "3"]}'}
    assert {r["kernel_settings"] for r in rows if r["kernel"] != "tinygemm"} == {""}  # none, or left out


def test_f16x2_k_loops_key_its_tuning_and_its_measurements(monkeypatch):
    """triton-f16x2's K loops (bench.quant.triton_f16x2.K_LOOPS): checked and sorted, the only
    loops its tuning keeps (never none, a short K included), part of its tuning key and of the
    kernel measurement key with how it tunes; an entry from before the key had them (or from
    before it tuned in CUDA graphs) is not taken for it."""
    pytest.importorskip("triton")
    from bench.quant import triton_f16x2 as f
    from bench.quant.w4a16.measurements import PlanCache, cache_key

    assert f.loop_name({"KS": 3, "XW": True}) == "3w" and f.loop_name({}) == "1"
    pdl = {"PDL": True, "PREFETCH": 0, "PRELOAD": False, "LATE": True}
    before = f.tuning_key(DEVICE, 4096, 4096, 128, False, pdl)
    monkeypatch.setattr(f, "K_LOOPS", ("1",))
    assert f.tuning_key(DEVICE, 4096, 4096, 128, False, pdl) != before  # another choice of loops: tuned afresh
    assert f.tuning_key(DEVICE, 4096, 4096, 128, False, {**pdl, "PDL": False}) != \
        f.tuning_key(DEVICE, 4096, 4096, 128, False, pdl)
    assert {f.loop_name(c.kwargs) for c in f._configs(False)} == set(f.LOOP_NAMES)
    for bad in ((), "1", ("5",), ["1", "2x"]):
        monkeypatch.setattr(f, "K_LOOPS", bad)
        with pytest.raises(ValueError, match="K_LOOPS"):
            f.k_loops()
    monkeypatch.setattr(f, "K_LOOPS", ("3", "1", "3"))
    assert f.k_loops() == ("1", "3")
    monkeypatch.setattr(f, "SPLITS", ())  # no split tried: the settings it had before it could split
    assert KERNELS["triton-f16x2"].timing_settings() == {"k_loops": ["1", "3"], "tuning": "graph"}
    monkeypatch.setattr(f, "SPLITS", (4, 2))
    assert KERNELS["triton-f16x2"].timing_settings() == {"k_loops": ["1", "3"], "tuning": "graph", "splits": [2, 4]}
    assert KERNELS["triton-f16x2-splitk"].timing_settings() == {"k_loops": ["1", "3"], "tuning": "graph",
                                                                "splits": [2, 4]}
    for k, loops in ((4096, ("1", "3")), (4096, ("3w",)), (128, ("1", "1w"))):  # 128: one k-tile, fewer than any block
        kept = f._prune(f._configs(False), k, loops)
        assert kept and {f.loop_name(c.kwargs) for c in kept} <= set(loops), (k, loops)
    assert len(f._prune(f._configs(False), 4096, ("1", "3"))) == 14
    names = ["tinygemm", "triton-f16x2"]
    key = cache_key(DEVICE, DTYPE, (32, 256, 128), (1,), names)
    assert json.loads(key)["kernel_settings"] == {"triton-f16x2": {"k_loops": ["1", "3"], "tuning": "graph",
                                                                   "splits": [2, 4]}}
    cache = PlanCache(None)
    plan = choice.ShapePlan(
        (32, 256, 128), ((2, "triton-f16x2"),), {"triton-f16x2": {1: 1.0, 2: 2.0}, "tinygemm": {1: 3.0, 2: 4.0}},
        {"triton-f16x2": {1: 0.0, 2: 0.0}, "tinygemm": {1: 0.0, 2: 0.0}}).to_json()
    for settings in (None, {"k_loops": ["1", "3"]}):  # before the K loops were in the key; before the graph tuning
        old = json.loads(key)
        old["points"] = [1, 2]
        if settings is None:
            del old["kernel_settings"]
        else:
            old["kernel_settings"] = {"triton-f16x2": settings}
        cache.entries[json.dumps(old, sort_keys=True)] = plan
    assert set(cache.earlier(key)) == {"tinygemm"}  # triton-f16x2 timed otherwise tuned: not taken
    monkeypatch.setattr(f, "K_LOOPS", ("1",))
    single = cache_key(DEVICE, DTYPE, (32, 256, 128), (1,), names)
    assert single != key and set(cache.earlier(single)) == {"tinygemm"}


def test_f16x2_launches_with_the_pdl_late_start_it_is_tuned_under(monkeypatch):
    """Under PDL, f16x2_mm launches the kernel with bench.pdl.LATE as it is at the call (where the
    next kernel may start: after the K loop or right after the wait), and a tuning is kept apart
    for each (tuning_key); without PDL the setting is off."""
    pytest.importorskip("triton")
    from bench import pdl
    from bench.quant import triton_f16x2 as f

    seen = []

    def launch(x32, packed, sz32, n, k, group_size, config, pdl_launch, emulate=False, norm=None, gate=False):
        seen.append(pdl_launch)
        return torch.zeros(n, dtype=torch.float16)

    monkeypatch.setattr(f, "_launch", launch)
    x, packed = torch.randn(1, 256).half(), torch.zeros(8, 2, 32, 4, dtype=torch.int32)
    sz = torch.zeros(2, 64, 2).half()
    config = {"TN": 1, "BKT": 2, "SPLIT_K": 1}
    for on in (True, False):
        monkeypatch.setattr(f, "pdl_enabled", lambda device: on)
        for late in (True, False):
            monkeypatch.setattr(pdl, "LATE", late)
            f.f16x2_mm(x, packed, sz, 64, 128, False, config)
            assert seen[-1]["PDL"] == on and seen[-1]["LATE"] == (on and late), seen[-1]
    keys = {f.tuning_key(DEVICE, 4096, 4096, 128, False, launch) for launch in seen[:2]}
    assert len(keys) == 2  # late or not: tuned apart


def test_f16x2_splits_are_among_its_tunings_candidates_and_key_its_tuning(monkeypatch):
    """The K splits triton-f16x2's tuning tries besides no split (bench.quant.triton_f16x2.SPLITS):
    checked and sorted, its split candidates those splits' (none for an empty choice), part of
    its tuning key; triton-f16x2-splitk's candidates are every split's, whatever SPLITS says."""
    pytest.importorskip("triton")
    from bench.quant import triton_f16x2 as f

    pdl = {"PDL": True, "PREFETCH": 0, "PRELOAD": False, "LATE": True}
    assert f.SPLIT_SHARES == (2, 4)
    for chosen, want in (((), set()), ((2,), {2}), ((4, 2, 4), {2, 4})):
        monkeypatch.setattr(f, "SPLITS", chosen)
        assert f.splits() == tuple(sorted(want))
        shares = {c.kwargs["SPLIT_K"] for c in f.candidates(False)}
        assert shares == {1} | want, (chosen, shares)
        assert {c.kwargs["SPLIT_K"] for c in f.candidates(True)} == {2, 4}
        assert [c for c in f.candidates(False) if c.kwargs["SPLIT_K"] == 1] == f._configs(False)
    keys = set()
    for chosen in ((), (2,), (2, 4)):
        monkeypatch.setattr(f, "SPLITS", chosen)
        keys.add(f.tuning_key(DEVICE, 4096, 4096, 128, False, pdl))
        assert f.tuning_key(DEVICE, 4096, 4096, 128, True, pdl)[-1] == ()  # split K's own: not keyed by SPLITS
    assert len(keys) == 3  # another choice of splits: tuned afresh
    for bad in ((3,), "2", (1, 2), None):
        monkeypatch.setattr(f, "SPLITS", bad)
        with pytest.raises(ValueError, match="SPLITS"):
            f.splits()


@pytest.mark.parametrize("distribution", ["fbgemm_gpu_genai", "gemlite"])
def test_a_kernel_librarys_upgrade_is_measured_again(tmp_path, monkeypatch, distribution):
    """A measurement is keyed by the versions of the libraries whose kernels it timed (FBGEMM's
    too): after an upgrade the kept plan is not reused."""
    keys = []
    for version in ("1.0.0", "1.1.0"):
        info = tmp_path / version / f"{distribution}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        with monkeypatch.context() as m:
            m.syspath_prepend(str(tmp_path / version))
            keys.append(_key())
    assert keys[0] != keys[1] and all(json.loads(k)["versions"] for k in keys)


def _recorded_logits(engine, image) -> list[torch.Tensor]:
    logits, step = [], engine.decode_step

    def recording(token, cache):
        out = step(token, cache)
        logits.append(out.clone())
        return out

    engine.decode_step = recording
    engine.run(image, "What is shown?", 6)
    return logits


def test_engines_over_one_model_each_run_their_own_kernels(tiny_llava_dir, demo_image):
    """Engines made one after another over one loaded model (a run's variants and fidelity
    probe): each sets every int4 linear of its decoder, fused or not, whatever the one before
    chose; a measured choice is measured once, kept file or not; the exact engine runs the hf
    engine's kernels whatever --int4-kernels says, so its logits stay bit-identical."""
    from bench.engines.cache_policy import CachePolicy
    from bench.engines.hf import HFEngine
    from bench.engines.spec import EngineSpec
    from bench.engines.static import StaticEngine
    from bench.engines.static_exact import StaticExactEngine
    from bench.models.loader import load_checkpoint
    from bench.quant.awq import Int4Options, quantize_model

    adapter = load_checkpoint(tiny_llava_dir, None, torch.device("cpu"), torch.float32)
    quantize_model(adapter, Int4Options(method="rtn", group_size=64))
    forced = StaticEngine(adapter, CachePolicy(), EngineSpec(int4_kernels="dense"))
    every = [m for m in forced.decoder.modules() if isinstance(m, Int4Linear)]
    assert len(every) > len([m for m in adapter.model.modules() if isinstance(m, Int4Linear)])  # + fused
    few = forced.int4_kernels.layers  # what steps and short suffixes run: fused q/k/v and gate/up, o, down
    assert {m.kernel_at(1) for m in few} == {"dense"} and forced.memory_columns()["int4_kernels"] == "dense"
    assert {m.kernel_at(1) for m in every if m not in few} == {"tinygemm"}  # the separate ones, for prefill
    first = StaticEngine(adapter, CachePolicy(), EngineSpec(int4_kernels="measured")).int4_kernels
    again = StaticEngine(adapter, CachePolicy(), EngineSpec(int4_kernels="measured")).int4_kernels
    assert all(p.cached for p in again.plans.values())
    assert {s: p.plan for s, p in again.plans.items()} == {s: p.plan for s, p in first.plans.items()}
    assert {(m.kernel, m.row_plan) for m in every if m not in again.layers} == {("tinygemm", None)}
    want = _recorded_logits(HFEngine(adapter, CachePolicy()), demo_image)
    exact = StaticExactEngine(adapter, CachePolicy(), EngineSpec(int4_kernels="dense"))
    assert exact.memory_columns()["int4_kernels"] == "1-8 tinygemm, >8 dense"
    got = _recorded_logits(exact, demo_image)
    assert len(got) == len(want) == 5 and all(torch.equal(g, w) for g, w in zip(got, want))


def test_int4_kernels_flag_end_to_end(tmp_path, capsys):
    """--int4-kernels measured on the static engine: same tokens as tinygemm, the choice in every
    row, measurements kept in --int4-cache-dir and written out by `int4-kernels --out`; a kernel
    this device cannot run is a skipped row; an unknown one a usage error."""
    from bench.cli import main, run_main

    cache_dir = tmp_path / "int4"
    rows = {}
    for mode in ("tinygemm", "measured"):
        out = tmp_path / mode
        assert run_main([*RUN, "--int4-cache-dir", str(cache_dir), "--int4-kernels", mode,
                         "--output-dir", str(out)]) == 0
        rows[mode] = [r for r in csv.DictReader(open(out / "runs.csv")) if r["kind"] == "measured"]
    assert {r["int4_kernels"] for r in rows["tinygemm"]} == {"1-8 tinygemm, >8 dense"}
    measured = rows["measured"][0]["int4_kernels"]
    assert measured == "dense" or measured.endswith(" dense")
    if DEVICE.type == "cpu":  # the CPU's kernels (tinygemm, dense) read the layers' own weights
        assert [r["output_text"] for r in rows["measured"]] == [r["output_text"] for r in rows["tinygemm"]]
        assert "tinygemm" in measured and float(rows["measured"][0]["int4_kernel_mb"]) == 0
    # (on CUDA another kernel may win and round otherwise: with random weights a near-tie flips a token)
    assert (cache_dir / "kernels.json").is_file()

    table = tmp_path / "kernels.csv"
    assert main(["int4-kernels", str(cache_dir / "kernels.json"), "--out", str(table)]) == 0
    written = list(csv.DictReader(open(table)))
    assert {r["kernel"] for r in written} >= {"tinygemm", "dense"}
    # the static engine's fused projections run up to FUSED_MAX_ROWS rows: measured up to there
    assert {r["rows"] for r in written if r["rows"]} == {str(r) for r in choice.ROW_POINTS if r <= FUSED_MAX_ROWS}
    assert {r["points"] for r in written} == {" ".join(str(r) for r in choice.ROW_POINTS if r <= FUSED_MAX_ROWS)}
    assert any(r["chosen"] == "true" for r in written)
    assert main(["int4-kernels", str(cache_dir / "kernels.json"), "--out", str(table)]) == 2  # exists
    (tmp_path / "bad.json").write_text("[]")
    assert main(["int4-kernels", str(tmp_path / "bad.json")]) == 2

    unrunnable = _unrunnable()
    if unrunnable:
        out = tmp_path / "forced"
        assert run_main([*RUN, "--int4-cache-dir", "", "--int4-kernels", unrunnable, "--output-dir", str(out)]) == 3
        (row,) = list(csv.DictReader(open(out / "runs.csv")))
        assert row["status"] == "skipped" and unrunnable in row["error"]
    capsys.readouterr()
    assert run_main([*RUN, "--int4-kernels", "nope", "--output-dir", str(tmp_path / "n")]) == 2
    assert "--int4-kernels must be one of" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_an_engine_that_runs_other_int4_kernels_than_asked_says_so(tmp_path, capsys):
    """The hf engine runs int4 weights on tinygemm and the dense prefill path whatever
    --int4-kernels asks: one warning line (once, though the fidelity probe's engine and the
    measured one are both made), and the row says what ran."""
    from bench.cli import run_main

    hf = [a if a != "static" else "hf" for a in RUN if a != "--no-fidelity"]  # its engine is made twice
    assert run_main([*hf, "--int4-cache-dir", "", "--int4-kernels", "dense", "--output-dir", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: the hf engine runs int4 weights on tinygemm (prefill: dense); --int4-kernels dense "
                     "applies to the static and graph engines") == 1
    rows = [r for r in csv.DictReader(open(tmp_path / "hf" / "runs.csv")) if r["kind"] == "measured"]
    assert {r["int4_kernels"] for r in rows} == {"1-8 tinygemm, >8 dense"}
    assert run_main([*RUN, "--int4-cache-dir", "", "--int4-kernels", "dense", "--output-dir", str(tmp_path / "s")]) == 0
    assert "warning" not in capsys.readouterr().err  # the static engine runs what was asked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_measured_kernels_hold_one_extra_format_per_layer():
    """On CUDA a measured plan holds, once per layer, the weight format of each state key its
    kernels name (gemlite's packed copy, marlin's layout, triton-f16x2's float16 scales where the
    layer's are bfloat16), however many of its kernels share one; no plan drops them all."""
    m = _layer(4096, 4096, 128, bias=False)
    plan = choice.measure(m, torch.float16, points=(1, 4, 16))
    m.set_row_plan(plan.plan, torch.float16)
    names = {m.kernel, m.prefill_kernel, "dense", *(n for _, n in plan.plan)}
    keys = {KERNELS[n].state_key for n in names} - {None}
    assert set(m.kernel_meta) == keys, (plan.plan, m.kernel_meta)
    one = {KERNELS[n].state_key: n for n in sorted(names) if KERNELS[n].state_key}  # a kernel per key
    formats = [KERNELS[n].prepare(m, torch.float16)[0] for n in one.values()]
    assert m.kernel_state_bytes() == sum(t.numel() * t.element_size() for f in formats for t in f.values())
    m.set_row_plan(None, torch.float16)
    assert m.kernel_state_bytes() == 0 and not m.kernel_meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", [n for n in KERNELS if n.startswith(("gemlite-", "triton-tiles", "triton-f16x2"))])
def test_cuda_triton_kernel_compiles_whole_and_matches_eager(name):
    """The graph engine compiles layers calling gemlite's kernels and ours: one opaque op in the
    graph, no break, once per row count, the eager results (split-K kernels sum in another order)."""
    import torch._dynamo.testing

    why = KERNELS[name].unavailable(DEVICE, torch.float16)
    if why:
        pytest.skip(why)
    m = Int4Linear.from_int4(quantize_int4(torch.randn(512, 1024) * 0.02, 128), DEVICE, torch.float16)
    m.set_row_plan(None, torch.float16, kernel=name)
    torch._dynamo.reset()  # each parameter's lambda is the same code object: its own recompile budget
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda t: m(t), backend=counter, fullgraph=True, dynamic=False)
    for rows in (1, 1, 4):
        x = torch.randn(1, rows, 1024, device=DEVICE, dtype=torch.float16)
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-2, atol=1e-2)
    assert counter.frame_count == 2


def test_a_prefill_kernel_runs_above_the_plan_and_is_refused_with_a_dense_copy(tmp_path, capsys):
    """--int4-prefill-kernel: a layer runs the kernel above its plan, prefetch is off, the rows
    say so; a kernel the device lacks is a skipped row; a bad value or one with
    --int4-prefill-copy is a usage error."""
    from bench.cli import run_main

    m = _layer()
    m.set_prefill_kernel("tinygemm", DTYPE)
    assert m.kernel_at(1) == "tinygemm" and m.kernel_at(500) == "tinygemm"
    assert choice.plans_column([m]) == "tinygemm"
    x = torch.randn(1, 100, m.in_features, device=DEVICE).to(DTYPE)
    y, want = m(x), _reference(m, x)
    assert ((y.float() - want).abs().max() / want.abs().max()).item() < (1e-4 if DTYPE == torch.float32 else ERR)
    m.set_prefill_kernel("dense", DTYPE)
    assert m.kernel_at(500) == "dense"

    out = tmp_path / "run"
    assert run_main([*RUN, "--int4-cache-dir", "", "--int4-prefill-kernel", "tinygemm", "--output-dir", str(out)]) == 0
    rows = [r for r in csv.DictReader(open(out / "runs.csv")) if r["kind"] == "measured"]
    assert rows and {(r["int4_prefill_kernel"], r["int4_kernels"]) for r in rows} == {("tinygemm", "tinygemm")}
    assert {r["int4_prefetch_mb"] for r in rows} == {""}  # nothing to dequantize ahead
    assert "dequantized a layer ahead" not in rows[0]["engine_detail"]

    unrunnable = _unrunnable()
    if unrunnable:
        out = tmp_path / "forced"
        assert run_main([*RUN, "--int4-cache-dir", "", "--int4-prefill-kernel", unrunnable,
                         "--output-dir", str(out)]) == 3
        (row,) = list(csv.DictReader(open(out / "runs.csv")))
        assert row["status"] == "skipped" and f"--int4-prefill-kernel {unrunnable}" in row["error"]
    for bad in (["--int4-prefill-kernel", "nope"], ["--int4-prefill-kernel", "tinygemm", "--int4-prefill-copy"]):
        capsys.readouterr()
        assert run_main([*RUN, *bad, "--output-dir", str(tmp_path / "bad")]) == 2
        assert "--int4-prefill-" in capsys.readouterr().err and not (tmp_path / "bad").exists()


class _Copy(W4A16Kernel):
    """Right, reading a weight format of its own (a dense copy), as gemlite's and FBGEMM's do."""

    name = "test-copy"
    state_key = "test_copy"

    def prepare(self, layer, dtype):
        return {"w": layer.to_int4().dequantize(torch.float32).to(layer.packed.device, dtype)}, None

    def run(self, layer, x):
        return x @ layer.kernel_test_copy_w.T


def _int4_rtn(ckpt, dtype=torch.float32, dense_rows=8):
    from bench.models.loader import load_checkpoint
    from bench.quant.awq import Int4Options, quantize_model

    adapter = load_checkpoint(ckpt, None, torch.device("cpu"), dtype)
    quantize_model(adapter, Int4Options(method="rtn", group_size=32, dense_rows=dense_rows))
    return adapter


def test_every_call_above_the_decode_rows_runs_the_prefill_kernel(tiny_llava_dir, monkeypatch):
    """Suffix buckets and batched steps of more rows than --int4-dense-rows run fused q/k/v and
    gate/up: they take the prefill kernel too, as o, down and the separate projections of a full
    prefill do, and the column says one plan; only linears that run such calls hold the kernel's
    weights, all counted in int4_kernel_mb; there is no prefetch; the hf engine resets them."""
    from bench.engines.cache_policy import CachePolicy
    from bench.engines.hf import HFEngine
    from bench.engines.spec import EngineSpec
    from bench.engines.static import StaticEngine
    from bench.quant.awq import int4_layers

    monkeypatch.setitem(KERNELS, "test-copy", _Copy())
    adapter = _int4_rtn(tiny_llava_dir)
    engine = StaticEngine(adapter, CachePolicy(), EngineSpec(int4_kernels="dense", int4_prefill_kernel="test-copy"))
    every = engine._int4_layers()
    for rows in (1, 8, 9, 16, 64, 65, 300):
        ran = {m.kernel_at(rows) for ms in engine.decoder.prefill_linears(rows) for m in ms}
        assert ran == {"dense" if rows <= 8 else "test-copy"}, rows
    cols = engine.memory_columns()
    assert cols["int4_kernels"] == "1-8 dense, >8 test-copy" and cols["int4_prefill_kernel"] == "test-copy"
    assert cols["int4_prefetch_mb"] is None and engine.prefetch is None  # asked for, nothing to fill
    held = sum(m.kernel_state_bytes() for m in every)
    assert cols["int4_kernel_mb"] == held / 2**20 and all(m.kernel_state_bytes() for m in every)

    # a measured plan up to 64 rows covers every call the fused projections run: no copy for them
    measured = StaticEngine(adapter, CachePolicy(), EngineSpec(int4_kernels="measured", int4_prefill_kernel="test-copy",
                                                               int4_kernel_candidates=("tinygemm",)))
    fused = [b.qkv.fused for b in measured.decoder.layers] + [b.gate_up.fused for b in measured.decoder.layers]
    assert {m.prefill_kernel for m in fused} == {"dense"} and not any(m.kernel_state_bytes() for m in fused)
    assert measured.memory_columns()["int4_kernels"] == "1-64 tinygemm, >64 test-copy"
    assert {m.kernel_at(4096) for ms in measured.decoder.prefill_linears(4096) for m in ms} == {"test-copy"}

    engine = StaticEngine(adapter, CachePolicy(), EngineSpec(int4_kernels="dense", int4_prefill_kernel="test-copy"))
    assert any(m.kernel_state_bytes() for m in engine._int4_layers() if m not in int4_layers(adapter))
    HFEngine(adapter, CachePolicy())
    assert {m.prefill_kernel for m in int4_layers(adapter)} == {"dense"}
    assert not any(m.kernel_state_bytes() for m in int4_layers(adapter))
    # the fused projections (outside the model, never run by hf) let their copies go too
    assert not any(m.kernel_state_bytes() for m in engine._int4_layers())


def test_with_no_dense_rows_every_call_runs_the_prefill_kernel(tiny_llava_dir):
    """--int4-dense-rows 0: no call runs a decode kernel; the column names the one that runs."""
    from bench.engines.cache_policy import CachePolicy
    from bench.engines.spec import EngineSpec
    from bench.engines.static import StaticEngine

    adapter = _int4_rtn(tiny_llava_dir, dense_rows=0)
    engine = StaticEngine(adapter, CachePolicy(), EngineSpec(int4_prefetch=False))
    assert engine.memory_columns()["int4_kernels"] == "dense"
    engine = StaticEngine(adapter, CachePolicy(), EngineSpec(int4_prefill_kernel="tinygemm"))
    assert {m.kernel_at(1) for ms in engine.decoder.prefill_linears(1) for m in ms} == {"tinygemm"}
    assert engine.memory_columns()["int4_kernels"] == "tinygemm"


def test_an_engine_without_prefetch_frees_the_slots_of_an_earlier_one(tiny_llava_dir, demo_image):
    """Prefetch slots an earlier engine gave the model's linears are neither read nor kept by an
    engine whose prefill runs another kernel (or the hf engine); the exact engines keep the
    dense prefill, and its prefetch, whatever --int4-prefill-kernel says."""
    from bench.engines.cache_policy import CachePolicy
    from bench.engines.hf import HFEngine
    from bench.engines.spec import EngineSpec
    from bench.engines.static import StaticEngine
    from bench.engines.static_exact import StaticExactEngine

    adapter = _int4_rtn(tiny_llava_dir)
    spec = EngineSpec(int4_prefill_kernel="tinygemm")
    exact = StaticExactEngine(adapter, CachePolicy(), spec)
    assert exact.prefetch is not None and exact.memory_columns()["int4_prefill_kernel"] == "dense"
    slotted = [m for ms in exact.prefetch.layers for m in ms]
    assert all(m.prefill_weight is not None for m in slotted)
    engine = StaticEngine(adapter, CachePolicy(), spec)
    assert engine.prefetch is None and all(m.prefill_weight is None for m in engine._int4_layers())
    want = engine.run(demo_image, "What is shown?", 4)
    StaticExactEngine(adapter, CachePolicy(), spec)
    HFEngine(adapter, CachePolicy())
    assert all(m.prefill_weight is None for m in slotted)
    assert StaticEngine(adapter, CachePolicy(), spec).run(demo_image, "What is shown?", 4).tokens == want.tokens
    wide = StaticEngine(adapter, CachePolicy(), EngineSpec(fused_max_rows=2**62))  # prefill runs fused, as graph's
    fused = {id(m): m for ms in wide.prefetch.layers for m in ms}
    kept = {id(m) for ms in StaticEngine(adapter, CachePolicy()).prefetch.layers for m in ms}
    assert fused.keys() - kept and all(m.prefill_weight is None for i, m in fused.items() if i not in kept)


def test_fidelity_kl_measures_the_weights_whatever_kernels_an_engine_chose(tiny_llava_dir, demo_image):
    """kl_mean's side runs transformers' forward on the default kernels: an engine's prefill
    kernel (tinygemm rounds otherwise in bfloat16) changes neither it nor, after, the engine's."""
    from bench.engines.cache_policy import CachePolicy
    from bench.engines.spec import EngineSpec
    from bench.engines.static import StaticEngine
    from bench.run.fidelity import teacher_forced_logits

    adapter = _int4_rtn(tiny_llava_dir, torch.bfloat16)
    want = teacher_forced_logits(adapter, demo_image, "What is shown?", [5, 6, 7, 8])
    engine = StaticEngine(adapter, CachePolicy(), EngineSpec(int4_prefill_kernel="tinygemm", int4_kernels="dense"))
    routes = [(m.kernel, m.prefill_kernel) for m in engine._int4_layers()]
    assert torch.equal(teacher_forced_logits(adapter, demo_image, "What is shown?", [5, 6, 7, 8]), want)
    assert [(m.kernel, m.prefill_kernel) for m in engine._int4_layers()] == routes


def test_measured_choice_takes_only_the_named_candidates(tmp_path, capsys):
    from bench.cli import run_main

    layers = [_layer()]
    chosen = choice.choose_kernels(layers, "measured", DTYPE, None, points=(1, 8), allowed=("tinygemm",))
    (plan,) = chosen.plans.values()
    assert {n for _, n in plan.plan} == {"tinygemm"} and set(plan.us) == {"tinygemm"}
    assert "--int4-kernel-candidates" in plan.left_out["dense"]
    unrunnable = _unrunnable()
    if unrunnable:
        out = tmp_path / "none"
        assert run_main([*RUN, "--int4-cache-dir", "", "--int4-kernels", "measured", "--int4-kernel-candidates",
                         unrunnable, "--output-dir", str(out)]) == 3
        (row,) = list(csv.DictReader(open(out / "runs.csv")))
        assert row["status"] == "skipped" and "none of them runs here" in row["error"]
        assert KERNELS[unrunnable].unavailable(DEVICE, DTYPE) in row["error"]  # and why not
    for bad in (["measured", "nope"], ["measured", "tinygemm,nope"], ["measured", ","], ["tinygemm", "tinygemm"],
                ["dense", "tinygemm,dense"]):  # without `measured` it would change nothing: refused
        capsys.readouterr()
        assert run_main([*RUN, "--int4-kernels", bad[0], "--int4-kernel-candidates", bad[1],
                         "--output-dir", str(tmp_path / "bad")]) == 2
        assert "--int4-kernel-candidates" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_more_row_counts_time_only_the_rows_not_timed_before(tmp_path, capsys):
    """A measurement at more row counts (the batched suffixes' rows above 64) takes each kernel's
    times at the row counts an earlier one timed and times the others only; the table marks
    which rows' times were taken."""
    path = tmp_path / "kernels.json"
    allowed = ("dense", "tinygemm")
    first = choice.choose_kernels([_layer()], "measured", DTYPE, path, points=(1, 2), allowed=allowed).plans[(256, 256, 64)]
    capsys.readouterr()
    more = choice.choose_kernels([_layer()], "measured", DTYPE, path, points=(1, 2, 4), allowed=allowed).plans[(256, 256, 64)]
    said = capsys.readouterr().err
    assert more.reused == {"dense": (1, 2), "tinygemm": (1, 2)}
    assert all(more.us[n][r] == first.us[n][r] for n in allowed for r in (1, 2)) and all(4 in more.us[n] for n in allowed)
    assert "dense timed at 4 rows only" in said and "tinygemm timed at 4 rows only" in said
    rows = choice.table_rows([more])
    assert {(r["kernel"], r["rows"]): r["reused"] for r in rows if r["rows"]} == {
        (n, r): r != 4 for n in allowed for r in (1, 2, 4)}
    again = measurements.ShapePlan.from_json(more.shape, json.loads(json.dumps(more.to_json())))
    assert again.reused == more.reused
    # another shape, fewer row counts: an entry that timed dense past them (found first) lends
    # nothing; a later one that did not, its times
    def plan(points, allowed):
        return choice.choose_kernels([_layer(128, 256)], "measured", DTYPE, path, points=points,
                                     allowed=allowed).plans[(128, 256, 64)]

    wide = plan((1, 2, 4), ("dense",))
    narrow = plan((1, 2), ("dense", "tinygemm"))
    assert not narrow.reused  # dense timed at 1-4 there: timed again at 1 and 2
    alone = plan((1, 2), ("dense",))
    assert alone.reused == {"dense": (1, 2)} and alone.us["dense"] == narrow.us["dense"] != {
        r: wide.us["dense"][r] for r in (1, 2)}


def test_kernel_measurements_of_other_candidates_are_kept_and_listed_apart(tmp_path, capsys, monkeypatch):
    """Plans measured from two candidate sets are two entries of kernels.json, and `int4-kernels`
    says which candidates each was chosen from (table and --out)."""
    from bench.cli import main

    path = tmp_path / "kernels.json"
    plans = {}
    for allowed in (("tinygemm",), ("dense",), ("dense", "tinygemm")):
        chosen = choice.choose_kernels([_layer()], "measured", DTYPE, path, points=(1, 2), allowed=allowed)
        plans[allowed] = chosen.plans[(256, 256, 64)]
        assert {n for _, n in plans[allowed].plan} <= set(allowed)
    keys = [json.loads(k) for k in json.loads(path.read_text())["entries"]]
    assert sorted(k["candidates"] for k in keys) == [["dense"], ["dense", "tinygemm"], ["tinygemm"]]
    # each kernel was timed once: the third set took both kernels' times as the first two measured them
    both = plans[("dense", "tinygemm")]
    assert set(both.reused) == {"dense", "tinygemm"}
    assert both.us == {"tinygemm": plans[("tinygemm",)].us["tinygemm"], "dense": plans[("dense",)].us["dense"]}
    assert not plans[("tinygemm",)].reused and not plans[("dense",)].reused
    capsys.readouterr()
    other = choice.choose_kernels([_layer()], "measured", DTYPE, path, points=(1, 4), allowed=("dense", "tinygemm"))
    assert not other.plans[(256, 256, 64)].reused  # other row counts: another measurement
    said = capsys.readouterr().err
    assert re.search(r"measuring (dense, tinygemm|tinygemm, dense) for", said) and "checked only" not in said
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "200")  # the table's width (not a terminal here)
    assert main(["int4-kernels", str(path)]) == 0
    out = capsys.readouterr().out
    assert "dense, tinygemm" in out and out.count("256x256, g64") == 4
    assert main(["int4-kernels", str(path), "--out", str(tmp_path / "t.csv")]) == 0
    table = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert {r["candidates"] for r in table} == {"tinygemm", "dense", "dense tinygemm"}
    assert {(r["candidates"], r["reused"]) for r in table if r["rows"] == "4"} == {("dense tinygemm", "false")}
    assert {r["reused"] for r in table if r["candidates"] == "dense tinygemm" and r["rows"] == "2"} == {"true"}


def test_a_cuda_measurement_is_keyed_by_the_cuda_runtime_and_driver():
    """On CUDA the key holds the runtime's version and the driver's (when NVML answers), so a
    driver update measures again; a CPU key holds neither."""

    cuda = measurements._versions(torch.device("cuda"))
    assert cuda["cuda"] == torch.version.cuda
    assert ("driver" in cuda) == (measurements._driver_version() is not None)
    assert not {"cuda", "driver"} & set(measurements._versions(torch.device("cpu")))


class _Tuning(W4A16Kernel):
    """A kernel that tunes itself per row count, as gemlite's do: it records the rows it was
    first called at."""
    name = "test-tuning"
    tunes_per_rows = True

    def __init__(self):
        self.rows = []

    def run(self, layer, x):
        self.rows.append(x.shape[0])
        return KERNELS["tinygemm"].run(layer, x)


def test_a_chosen_kernel_that_tunes_per_row_count_is_called_at_every_row_count_it_serves(monkeypatch):
    """Chosen by name, it serves 1..--int4-dense-rows: each of those row counts is called once
    when it is chosen (its tuning done before any warm-up or capture), once per weight shape,
    not once per layer."""
    tuning = _Tuning()
    monkeypatch.setitem(KERNELS, tuning.name, tuning)
    layers = [_layer(64, 256), _layer(64, 256, seed=1), _layer(128, 256)]
    choice.choose_kernels(layers, tuning.name, DTYPE)
    dense_rows = layers[0].dense_rows
    assert sorted(tuning.rows) == sorted(list(range(1, dense_rows + 1)) * 2)  # two shapes


def test_measured_calls_run_the_layers_forward_casts_included():
    """What is timed is what forward runs: the kernel's output cast back to the activations'
    dtype (tinygemm's CUDA kernel returns bfloat16 for a float16 model)."""
    m = _layer(bias=False)
    x = torch.randn(3, m.in_features, device=DEVICE, dtype=DTYPE)
    for name in ("tinygemm", "dense"):
        y = m.run_kernel(name, x)
        assert y.dtype == DTYPE and y.shape == (3, m.out_features)
        torch.testing.assert_close(y.float(), _reference(m, x).float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(m(x), m.run_kernel(m.kernel_at(3), x))


def test_a_fake_is_registered_for_an_fbgemm_op_that_has_none():
    """FBGEMM 1.6.0 defines bf16i4bf16_shuffled without a fake (meta) implementation, which
    torch.compile needs: one is registered, giving [rows, out_features] in bfloat16."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.quant.w4a16 import fbgemm

    if hasattr(torch.ops.fbgemm, "bf16i4bf16_shuffled"):
        pytest.skip("FBGEMM is loaded here: its own op is checked on the GPU")
    lib = torch.library.Library("fbgemm", "FRAGMENT")  # the schema FBGEMM defines, without its kernels
    lib.define("bf16i4bf16_shuffled(Tensor X, Tensor W, Tensor w_scale_group, Tensor w_zero_group) -> Tensor")
    fbgemm._register_fakes()
    fbgemm._register_fakes()  # a second call leaves the registered one alone
    with FakeTensorMode():
        x, w = torch.empty(5, 256, dtype=torch.bfloat16), torch.empty(64, 128, dtype=torch.int8)
        sz = torch.empty(2, 64, dtype=torch.bfloat16)
        y = torch.ops.fbgemm.bf16i4bf16_shuffled(x, w, sz, sz)
    assert y.shape == (5, 64) and y.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU's L2 cache)")
def test_timed_calls_cycle_over_layers_holding_twice_the_l2_cache():
    """A decode step reads each layer's weight from memory, not from L2: timed calls go through
    layers of the shape holding at least twice the L2 cache (all of them when they hold less)."""
    layers = [_layer(1024, 1024, seed=i) for i in range(40)]
    turn = choice.rotation(layers, DEVICE)
    l2 = torch.cuda.get_device_properties(DEVICE).L2_cache_size
    held = sum(m.weight_bytes() for m in turn)
    assert held >= 2 * l2 or turn == layers
    assert len(turn) == 1 or sum(m.weight_bytes() for m in turn[:-1]) < 2 * l2


# Triton 3.6's interpreter turns a scalar into an int with int(), which NumPy 2.4 refuses for the
# one-element arrays it holds scalars in: the test's interpreter reads the element instead.
_INTERPRETED_TILES = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
import triton.runtime.interpreter as interpreter

_patch = getattr(interpreter, "_patch_lang_tensor", None)  # (Triton versions without it need no help)

def _patched(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

if _patch is not None:
    interpreter._patch_lang_tensor = _patched
from bench.quant.int4 import TINYGEMM_MID, quantize_int4, tinygemm_tile_source
from bench.quant import triton_w4a16

def pack_published(q):
    # q [N, K] -> tinygemm's CUDA words: every 8 x 128 tile 128 int32 words, nibbles where
    # tinygemm_tile_source puts them (what the CUDA packer writes when KernelLayout.published)
    n, k = q.shape
    tiles = q.view(n // 8, 8, k // 128, 128).permute(0, 2, 1, 3).reshape(n // 8, k // 128, 1024)
    nib = tiles[..., tinygemm_tile_source()].long().view(n // 8, k // 128, 128, 8)
    return (nib << (4 * torch.arange(8))).sum(-1).to(torch.int32).contiguous()

torch.manual_seed(0)
worst = 0.0
for n, k, g in ((48, 384, 32), (64, 256, 128)):
    t = quantize_int4(torch.randn(n, k) * 0.05, g)
    zero_f = (TINYGEMM_MID - t.zero.float()) * t.scale
    sz = torch.stack((t.scale, zero_f), -1).transpose(0, 1).contiguous().half()  # [K/G, N, 2]
    w = t.dequantize(torch.float32)
    packed = pack_published(t.q)
    for rows in (1, 2, 3, 5, 17):
        x = torch.randn(rows, k).half()
        want = x.float() @ w.T
        for cfg in ({"TN": 1, "BKT": 2, "SPLIT_K": 1}, {"TN": 2, "BKT": 1, "SPLIT_K": 1},
                    {"TN": 4, "BKT": 2, "SPLIT_K": 2}):
            if rows > triton_w4a16.ELEMENTWISE_ROWS and cfg["TN"] < 2:
                continue  # tl.dot takes 16 weight rows or more (autotuning prunes these)
            y = triton_w4a16.tiles_mm(x, packed, sz, n, g, cfg["SPLIT_K"] > 1, cfg)
            assert y.shape == (rows, n) and y.dtype == torch.float16, (y.shape, y.dtype)
            worst = max(worst, ((y.float() - want).abs().max() / want.abs().max()).item())
print(worst)
"""


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    """The _INTERPRETED_ scripts run in one process of their own under Triton's interpreter (its
    import set up once): each one's worst relative error."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    from tests.conftest import ROOT

    head = _INTERPRETED_TILES.split("torch.manual_seed(0)")[0]  # the interpreter's set-up, once
    program = head + "".join(script[len(head):].replace("print(worst)", f"print({name!r}, worst)") + "\n"
                             for name, script in (("tiles", _INTERPRETED_TILES), ("f16x2", _INTERPRETED_F16X2),
                                                  ("f16x2-norm", _INTERPRETED_F16X2_NORM),
                                                  ("f16x2-gate", _INTERPRETED_F16X2_GATE)))
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: float(worst) for name, worst in (line.split() for line in done.stdout.splitlines())
            if name in ("tiles", "f16x2", "f16x2-norm", "f16x2-gate")}


def test_the_tiles_kernel_multiplies_by_the_published_tile_layout_in_tritons_interpreter(interpreted):
    """Our Triton kernel (bench.quant.triton_w4a16) on CPU tensors in Triton's interpreter: weights
    packed as tinygemm's CUDA packer writes them, every program shape it launches (one row
    block, several, split K, elementwise and tl.dot), against dequantize + matmul in fp32."""
    assert interpreted["tiles"] < 1e-3  # the fp16 output's rounding; a wrong nibble is far more


def test_the_tiles_kernel_compiles_for_sm90_without_a_gpu():
    """Our Triton kernel compiled for an H100 / H200 (sm_90) by Triton's compiler and ptxas, as the
    JIT specializes it for a call: an elementwise program (one row, fp16) and a tl.dot program
    with split K (16 rows, bf16, groups of 64) compile, fit the registers without spilling, and
    run on tensor cores and fp32 atomics. (The interpreter checks none of this; lab/triton_tiles_aot.py
    compiles every configuration the autotuner keeps.)"""
    triton_aot = triton_aot_or_skip()
    elementwise = triton_aot.compile_tiles(1, 4096, 4096, 128, torch.float16, False, {"TN": 1, "BKT": 2, "SPLIT_K": 1})
    dot = triton_aot.compile_tiles(16, 4096, 11008, 64, torch.bfloat16, True, {"TN": 2, "BKT": 2, "SPLIT_K": 4})
    for c in (elementwise, dot):
        assert c.spill_bytes == 0 and c.registers <= 255, (c.registers, c.spill_bytes)
    assert "mma.sync" not in elementwise.ptx and "st.global" in elementwise.ptx
    for c in (elementwise, dot):  # codes become floats by bit operations, not int -> float conversions
        assert not re.search(r"cvt\.rn\.f32\.[su]32", c.ptx)
        loop = triton_aot.loop_instructions(c.cubin)  # the K loop's machine code
        assert loop["LDG"] + loop["LDGSTS"] + loop["LDS"] > 0 and loop["I2F"] + loop["I2FP"] == 0, loop
    assert triton_aot.loop_instructions(dot.cubin)["HMMA"] > 0  # tensor cores in the loop
    assert triton_aot.loop_instructions(elementwise.cubin)["HMMA"] == 0
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in dot.ptx and "atom.global" in dot.ptx


_INTERPRETED_F16X2 = _INTERPRETED_TILES.split("torch.manual_seed(0)")[0] + r"""
from bench.quant import triton_f16x2

torch.manual_seed(0)
worst = 0.0
for n, k, g in ((40, 384, 128), (64, 512, 256)):  # rows past a program's block, k-tiles past a step's
    t = quantize_int4(torch.randn(n, k) * 0.05, g)
    zero_f = (TINYGEMM_MID - t.zero.float()) * t.scale
    sz = torch.stack((t.scale, zero_f), -1).transpose(0, 1).contiguous().half()  # [K/G, N, 2]
    w = ((t.q.float() - TINYGEMM_MID) * sz[..., 0].T.float().repeat_interleave(g, 1)
         + sz[..., 1].T.float().repeat_interleave(g, 1))  # the pairs as the kernel reads them, fp16
    packed = pack_published(t.q)
    x2 = torch.randn(2, k).half()
    for i, cfg in enumerate([{**c, "ROWS_FIRST": rows_first} for rows_first in (True, False)  # both layouts
                    for c in ({"TN": 2, "BKT": 2, "SPLIT_K": 1}, {"TN": 4, "BKT": 4, "SPLIT_K": 1},
                              {"TN": 2, "BKT": 1, "SPLIT_K": 3}, {"TN": 1, "BKT": 2, "SPLIT_K": 1},
                              # the first block loaded ahead of the K loop (bench.pdl.PRELOAD)
                              {"TN": 2, "BKT": 2, "SPLIT_K": 1, "PRELOAD": True},
                              {"TN": 2, "BKT": 1, "SPLIT_K": 3, "PRELOAD": True},
                              # the K loop pipelined, x read by whole k-tiles (bench.quant.triton_f16x2.K_LOOPS;
                              # the interpreter runs no pipeline: KS checks the loop's index math only)
                              {"TN": 1, "BKT": 1, "SPLIT_K": 1, "KS": 3},
                              {"TN": 2, "BKT": 1, "SPLIT_K": 2, "KS": 3, "PRELOAD": True},
                              {"TN": 2, "BKT": 2, "SPLIT_K": 1, "XW": True},
                              {"TN": 1, "BKT": 1, "SPLIT_K": 3, "KS": 3, "XW": True, "PRELOAD": True})]):
        # one row; and at the first configuration two, the second a call of its own (f16x2_mm's row loop)
        for x in ((x2[:1], x2) if i == 0 else (x2[:1],)):
            rows = x.shape[0]
            want = x.float() @ w.T
            y = triton_f16x2.f16x2_mm(x, packed, sz, n, g, cfg["SPLIT_K"] > 1, cfg, emulate=True)
            assert y.shape == (rows, n) and y.dtype == torch.float16, (y.shape, y.dtype)
            worst = max(worst, ((y.float() - want).abs().max() / want.abs().max()).item())
            # split K: every row block's count set back to zero by the program that summed its shares
            assert all(not c.any() for _, c in triton_f16x2._SCRATCH.get(x.device, [])), cfg
assert len(triton_f16x2._SCRATCH[torch.device("cpu")]) >= 1  # the split calls had scratch
print(worst)
"""


_INTERPRETED_F16X2_NORM = _INTERPRETED_TILES.split("torch.manual_seed(0)")[0] + r"""
from bench.quant import triton_f16x2

def eager_norm(h, weight, eps):  # transformers' RMSNorm op by op, as eager PyTorch rounds it
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).half()

triton_f16x2.NORM_BLOCKS = 4  # the scratch's first size: the shapes below outgrow it (5, then 9 row blocks)
torch.manual_seed(0)
worst = 0.0
for n, k, g in ((40, 384, 128), (72, 256, 128)):  # partial row blocks; row blocks past a power of two (9)
    t = quantize_int4(torch.randn(n, k) * 0.05, g)
    zero_f = (TINYGEMM_MID - t.zero.float()) * t.scale
    sz = torch.stack((t.scale, zero_f), -1).transpose(0, 1).contiguous().half()  # [K/G, N, 2]
    packed = pack_published(t.q)
    weight = (torch.rand(n) + 0.5).half()
    for cfg in ({"TN": 1, "BKT": 2, "SPLIT_K": 1}, {"TN": 2, "BKT": 1, "SPLIT_K": 3, "PRELOAD": True},
                {"TN": 4, "BKT": 2, "SPLIT_K": 1, "ROWS_FIRST": False, "XW": True}):
        args = (packed, sz, n, g, cfg["SPLIT_K"] > 1)
        # ordinary rows: the sum is the GEMV's output added as eager adds, the norm within an fp16 rounding
        x, residual = torch.randn(1, k).half(), (torch.randn(1, n) * 4).half()
        h, xn = triton_f16x2.f16x2_mm_add_norm(x, *args, residual, weight, 1e-5, cfg, emulate=True)
        assert h.shape == xn.shape == (1, n) and h.dtype == xn.dtype == torch.float16
        # the tail's first pass asked for after the sums, and passes of 16 elements (several, the last
        # partial), ahead or not: the same bits (at the first configuration of each shape)
        for ahead, chunk in ((False, 8192), (True, 16), (False, 16)) if cfg["TN"] == 1 else ():
            triton_f16x2.NORM_AHEAD, triton_f16x2.NORM_CHUNK = ahead, chunk
            again = triton_f16x2.f16x2_mm_add_norm(x, *args, residual, weight, 1e-5, cfg, emulate=True)
            assert torch.equal(again[0], h) and torch.equal(again[1], xn), (cfg, ahead, chunk)
        triton_f16x2.NORM_AHEAD, triton_f16x2.NORM_CHUNK = True, 8192
        assert torch.equal(h, residual + triton_f16x2.f16x2_mm(x, *args, cfg, emulate=True)), cfg
        want = eager_norm(h, weight, 1e-5).float()
        worst = max(worst, ((xn.float() - want).abs() / want.abs().clamp_min(1e-3)).max().item())
        # rows whose squares sum exactly in any order (halves up to 8, x zero): the norm is eager's bit for
        # bit, each rounding and an eps that counts included
        residual = (torch.randint(-16, 17, (1, n)) * 0.5).half()
        h, xn = triton_f16x2.f16x2_mm_add_norm(torch.zeros(1, k).half(), *args, residual, weight, 0.3, cfg,
                                               emulate=True)
        assert torch.equal(h, residual) and torch.equal(xn, eager_norm(h, weight, 0.3)), cfg
        # the count set back to zero by the block that normalized: the next call counts from zero
        assert all(c.item() == 0 for _, c in triton_f16x2._NORM_SCRATCH[torch.device("cpu")]), cfg
        assert all(not c.any() for _, c in triton_f16x2._SCRATCH.get(x.device, [])), cfg
held = triton_f16x2._NORM_SCRATCH[torch.device("cpu")]
assert [len(sums) for sums, _ in held] == [5, 9], held  # made larger when a shape needed more, the old kept
print(worst)
"""


def test_the_f16x2_kernel_adds_the_residual_and_normalizes_in_its_tail_in_tritons_interpreter(interpreted):
    """bench.quant.triton_f16x2.f16x2_mm_add_norm (o_proj or down_proj with the residual add and
    the next RMSNorm in its launch) in Triton's interpreter, with and without split K, both
    layouts and a number of row blocks that is not a power of two (checked in the script): the sum
    is the plain GEMV's output added to the residual exactly as eager PyTorch adds; the normalized
    row is eager's RMSNorm op by op bit for bit where the squares sum exactly in any order, and
    within one fp16 rounding of it where the kernel's order of summing them may round otherwise;
    the count the last block reads is back at zero after every call; the scratch they use grows
    when a shape needs more row blocks than it holds."""
    assert interpreted["f16x2-norm"] <= 2 ** -10  # an element one fp16 step off at most


_INTERPRETED_F16X2_GATE = _INTERPRETED_TILES.split("torch.manual_seed(0)")[0] + r"""
from bench.quant import triton_f16x2

torch.manual_seed(0)
worst = 0.0
for half, k, g in ((24, 384, 128), (40, 256, 128)):  # the gate's rows past a program's block (8 or 16 a half)
    n = 2 * half
    t = quantize_int4(torch.randn(n, k) * 0.05, g)
    zero_f = (TINYGEMM_MID - t.zero.float()) * t.scale
    sz = torch.stack((t.scale, zero_f), -1).transpose(0, 1).contiguous().half()  # [K/G, N, 2]
    packed = pack_published(t.q)
    x = (torch.randn(1, k) * 2).half()
    for cfg in [{**c, "ROWS_FIRST": rows_first} for rows_first in (True, False)
                for c in ({"TN": 2, "BKT": 2, "SPLIT_K": 1}, {"TN": 4, "BKT": 1, "SPLIT_K": 1},
                          {"TN": 2, "BKT": 1, "SPLIT_K": 3, "PRELOAD": True},
                          {"TN": 2, "BKT": 2, "SPLIT_K": 1, "XW": True, "KS": 3})]:
        # the plain GEMV's gate and up outputs (the same sums: each row summed in the same order), then
        # SiLU and the product as eager PyTorch computes them
        gate, up = triton_f16x2.f16x2_mm(x, packed, sz, n, g, cfg["SPLIT_K"] > 1, cfg, emulate=True).split(half, 1)
        want = (torch.nn.functional.silu(gate) * up).float()
        got = triton_f16x2.f16x2_mm_gated(x, packed, sz, n, g, cfg["SPLIT_K"] > 1, cfg, emulate=True)
        assert got.shape == (1, half) and got.dtype == torch.float16, (got.shape, got.dtype)
        worst = max(worst, ((got.float() - want).abs() / want.abs().clamp_min(1e-3)).max().item())
        assert all(not c.any() for _, c in triton_f16x2._SCRATCH.get(x.device, [])), cfg
for bad in (dict(config={"TN": 1, "BKT": 2, "SPLIT_K": 1}), dict(out_features=40)):
    try:
        triton_f16x2.f16x2_mm_gated(x, packed, sz, bad.get("out_features", n), g, False, bad.get("config"),
                                    emulate=True)
    except ValueError:
        pass
    else:
        raise AssertionError(bad)
print(worst)
"""


def test_the_f16x2_kernel_applies_silu_and_the_up_projection_in_its_tail_in_tritons_interpreter(interpreted):
    """bench.quant.triton_f16x2.f16x2_mm_gated (a fused gate/up projection whose programs each take
    gate rows and the same up rows, writing SiLU(gate) * up) in Triton's interpreter, both layouts,
    split K, the first block preloaded, x read by whole k-tiles, a gate whose rows end inside a
    program's block: the plain GEMV's gate and up outputs through eager PyTorch's SiLU and
    product, to within one fp16 rounding (the interpreter's exp is NumPy's); an odd TN and a
    weight whose halves are no multiple of 8 rows refused."""
    assert interpreted["f16x2-gate"] <= 2 ** -10  # an element one fp16 step off at most; a wrong row is far more


def test_the_f16x2_kernel_reads_the_published_tile_layout_in_tritons_interpreter(interpreted):
    """bench.quant.triton_f16x2's GEMV in Triton's interpreter with its PTX block's stand-in (the
    same arithmetic in fp32): the words, x's column pairs and the scale/zero pairs it reads for
    each nibble, over partial blocks of rows and k-tiles and split K, against dequantize + matmul."""
    assert interpreted["f16x2"] < 1e-3  # the fp16 output's rounding; a wrong pair is far more


def test_the_f16x2_kernel_compiles_for_sm90_and_issues_fewer_instructions_per_weight():
    """The f16x2 GEMV's PTX (inline f16x2 arithmetic) through Triton's compiler and ptxas for
    sm_90, configurations its tuning keeps in both layouts, without split and with: no spills, the
    dequantization and products in f16x2 instructions, no int -> float conversion, and its K loop
    under 4.5 machine instructions per weight (triton-tiles' best: about 6; 4.6 before the
    dequantization took nibbles 1 and 3 with their own mask, a shift and a sub fewer per pair);
    pipelined (KS 3), its loads asynchronous copies into shared memory, under 6.5; with x read by
    whole k-tiles (XW), fewer loads and about as many instructions or fewer."""
    triton_aot = triton_aot_or_skip()
    from bench.quant import triton_f16x2

    n, k, g = 4096, 4096, 128
    for split, cfg, warps in ((False, {"TN": 4, "BKT": 4, "SPLIT_K": 1, "ROWS_FIRST": False, "KS": 1}, 4),
                              (False, {"TN": 1, "BKT": 8, "SPLIT_K": 1, "ROWS_FIRST": True, "KS": 1}, 8),
                              (False, {"TN": 2, "BKT": 4, "SPLIT_K": 1, "ROWS_FIRST": True, "KS": 1}, 4),
                              (False, {"TN": 1, "BKT": 4, "SPLIT_K": 1, "ROWS_FIRST": True, "KS": 3}, 4),
                              (False, {"TN": 4, "BKT": 4, "SPLIT_K": 1, "ROWS_FIRST": False, "KS": 3}, 4),
                              (True, {"TN": 2, "BKT": 4, "SPLIT_K": 2, "ROWS_FIRST": False, "KS": 1}, 4)):
        cfg = {**cfg, "XW": False}
        assert any(c.kwargs == cfg and c.num_warps == warps for c in triton_f16x2._configs(split))
        args = f16x2_meta_args(n, k, g, cfg["SPLIT_K"])
        c = triton_aot.compile_call(triton_f16x2._f16x2_kernel, args,
                                    {"G": g, "EMULATE": False, **cfg, "num_warps": warps, "num_stages": 3})
        assert c.spill_bytes == 0 and c.registers <= 255, (c.registers, c.spill_bytes)
        assert "fma.rn.f16x2" in c.ptx and "lop3.b32" in c.ptx and ("atom.global" in c.ptx) == split
        if split:  # the shares summed by the last program: one count (acquire-release, GPU scope), no float atomics,
            # the shares' sums read past L1 (written by other SMs' programs)
            assert re.findall(r"atom\.global\.[\w.]+", c.ptx) == ["atom.global.gpu.acq_rel.add.u32"], c.ptx
            assert "red.global" not in c.ptx and re.search(r"ld\.global\.cg\.", c.ptx)
        loop = triton_aot.loop_instructions(c.cubin)
        assert loop["HFMA2"] > 0 and loop["I2F"] + loop["I2FP"] == 0, loop
        # pipelined: the next steps' words copied into shared memory asynchronously, read from there
        assert (loop["LDGSTS"] > 0 and loop["LDS"] > 0) == (cfg["KS"] > 1), loop
        per_weight = sum(loop.values()) / (cfg["TN"] * 8 * cfg["BKT"] * 128 / (warps * 32))
        # the pipelined loop's copies and shared-memory reads cost instructions (x's words one by one):
        # its loads in flight are bought with issue slots, which the tuning weighs by timing
        assert per_weight < (4.5 if cfg["KS"] == 1 else 6.5), (per_weight, loop)
        # x read by whole k-tiles (XW): a few wide loads put in order through shared memory instead
        # of a load per word; fewer loads, and at most 1% more instructions (rows last with split K:
        # 231 against 229), in both loops
        whole = triton_aot.compile_call(triton_f16x2._f16x2_kernel, args,
                                        {"G": g, "EMULATE": False, **cfg, "XW": True, "num_warps": warps,
                                         "num_stages": 3})
        assert whole.spill_bytes == 0, whole.spill_bytes
        fewer = triton_aot.loop_instructions(whole.cubin)
        assert fewer["LDG"] + fewer["LDGSTS"] < loop["LDG"] + loop["LDGSTS"], (fewer, loop)
        assert sum(fewer.values()) <= 1.01 * sum(loop.values()), (fewer, loop)


def test_the_f16x2_kernels_hold_a_float16_copy_of_bfloat16_scales_only(monkeypatch):
    """Layers whose scales and zeros are bfloat16 (tinygemm's on torch 2.11 CUDA builds) give the
    f16x2 kernels a float16 copy of them, exact, shared by both, counted in the kernel state and
    dropped with the plan; float16 ones are read in place (no copy)."""
    from bench.quant.w4a16.f16x2 import F16x2

    seen = []

    def op(x, packed, scale_and_zero, out_features, group_size, split_k):  # records what the kernel is given
        seen.append(scale_and_zero)
        return x.new_zeros(len(x), out_features)

    monkeypatch.setattr(F16x2, "op", staticmethod(op))
    w = quantize_int4(torch.randn(64, 256) * 0.05, 128)
    bf16 = Int4Linear.from_int4(w, torch.device("cpu"), torch.bfloat16)
    half = Int4Linear.from_int4(w, torch.device("cpu"), torch.float16)
    assert bf16.scale_and_zero.dtype == torch.bfloat16 and half.scale_and_zero.dtype == torch.float16
    for name in ("triton-f16x2", "triton-f16x2-splitk"):
        assert "scales" not in (KERNELS[name].shape_unsupported(bf16) or "")  # not refused for their dtype
        for m in (bf16, half):
            m.attach_kernel_state(name, torch.float16)
            m.run_kernel(name, torch.randn(1, 256).half())
    assert [t.dtype for t in seen] == [torch.float16] * 4
    assert seen[0] is seen[2] and torch.equal(seen[0], bf16.scale_and_zero.to(torch.float16))  # one copy
    assert torch.equal(seen[0].to(torch.bfloat16), bf16.scale_and_zero)  # exact
    assert seen[1] is half.scale_and_zero and half.kernel_state_bytes() == 0
    assert bf16.kernel_state_bytes() == bf16.scale_and_zero.numel() * 2 == 64 * 256 // 128 * 2 * 2
    bf16.set_row_plan(None, torch.float16)
    assert bf16.kernel_state_bytes() == 0
    bf16.run_kernel("triton-f16x2", torch.randn(1, 256).half())  # called before being given it: a copy for the call
    assert seen[-1].dtype == torch.float16 and bf16.kernel_state_bytes() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("split_k", [False, True])
def test_cuda_f16x2_kernel_matches_dequantize_and_matmul(split_k):
    """The PTX itself (tuned, as a layer runs it) against dequantize + matmul in fp32, on a
    shape whose rows and k-tiles leave partial blocks, at one row and at three (row by row), with
    ordinary activations and with outliers; every configuration its tuning may choose there too.
    The tuning happens once per shape and K loops, chooses one of the candidates kept for them,
    and refuses to start inside a CUDA graph capture."""
    m = Int4Linear.from_int4(quantize_int4(torch.randn(520, 1152) * 0.02, 128), DEVICE, torch.float16)
    name = "triton-f16x2-splitk" if split_k else "triton-f16x2"
    why = KERNELS[name].unavailable(DEVICE, torch.float16) or KERNELS[name].shape_unsupported(m)
    if why:
        pytest.skip(why)
    from bench.quant import triton_f16x2 as f

    tuned = f.tuning_count()
    for rows in (1, 3):
        x = torch.randn(rows, 1152, device=DEVICE, dtype=torch.float16)
        loud = x.clone()  # outliers of a few thousand, as down_proj's inputs have: the fp16 partial sums hold
        loud[:, ::150] = 2000.0
        for a in (x, loud):
            y, want = m.run_kernel(name, a).float(), _reference(m, a)
            assert torch.isfinite(y).all() and ((y - want).abs().max() / want.abs().max()).item() < 2e-3
    assert f.tuning_count() == tuned + 1  # one shape: tuned once
    kept = f._prune(f._configs(split_k), 1152, f.k_loops())
    chosen = [c for key, c in f._TUNED.items() if key[1:5] == (520, 1152, 128, split_k)]
    assert len(chosen) == 1 and chosen[0] in [f.launch_config(c) for c in kept], chosen
    x = torch.randn(1, 1152, device=DEVICE, dtype=torch.float16)
    want = _reference(m, x)
    for c in kept:
        config = f.launch_config(c)
        y = f.f16x2_mm(x, m.packed, KERNELS[name].scale_and_zero(m), 520, 128, split_k, config).float()
        assert ((y - want).abs().max() / want.abs().max()).item() < 2e-3, config
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capture"), torch.cuda.graph(graph):
        f.f16x2_mm(x, m.packed, KERNELS[name].scale_and_zero(m), 512, 128, split_k)  # a shape not tuned yet


def test_a_layer_offers_the_add_and_norm_only_where_its_kernel_at_those_rows_can_and_it_has_nothing_to_apply():
    """Int4Linear.add_norm_kernel (what FastDecoder.layer_at_folded asks o_proj and down_proj):
    the kernel its plan runs at the rows if that kernel adds and normalizes in its launch
    (triton-f16x2 or its split-K form, at one row only), none for other kernels or rows, none for a
    layer with a bias or an input scale to apply after the product, none on the prefill path."""
    w = quantize_int4(torch.randn(64, 256) * 0.05, 128)
    m = Int4Linear.from_int4(w, DEVICE, torch.float16)
    for name in ("triton-f16x2", "triton-f16x2-splitk"):
        m.set_row_plan(((1, name), (8, "tinygemm")), torch.float16)
        assert m.add_norm_kernel(1) is KERNELS[name] and m.add_norm_kernel(2) is None
    m.set_row_plan(((8, "tinygemm"),), torch.float16)
    assert m.add_norm_kernel(1) is None
    m.set_row_plan(None, torch.float16, kernel="triton-f16x2")
    assert m.add_norm_kernel(1) is KERNELS["triton-f16x2"] and m.add_norm_kernel(2) is None
    for extra in ({"bias": torch.randn(64)}, {"input_scale": torch.rand(256) + 0.5}):
        other = Int4Linear.from_int4(w, DEVICE, torch.float16, **extra)
        other.set_row_plan(((1, "triton-f16x2"),), torch.float16)
        assert other.kernel_at(1) == "triton-f16x2" and other.add_norm_kernel(1) is None
    m.set_row_plan(((1, "triton-f16x2"),), torch.float16)
    m.keep_dense_copy(torch.float16)  # a prefill's calls read the copy: the prefill path
    with Int4Linear.prefill_calls([m]):
        assert m.add_norm_kernel(1) is None
    assert m.add_norm_kernel(1) is KERNELS["triton-f16x2"]


def _f16x2_layer_or_skip(rows: int, split_k: bool):
    """(an int4 layer of `rows` x 1152 on the GPU running triton-f16x2, or its split-K form, the
    kernel's name, the kernel); the test skipped where the kernel cannot run it."""
    m = Int4Linear.from_int4(quantize_int4(torch.randn(rows, 1152) * 0.02, 128), DEVICE, torch.float16)
    name = "triton-f16x2-splitk" if split_k else "triton-f16x2"
    kernel = KERNELS[name]
    why = kernel.unavailable(DEVICE, torch.float16) or kernel.shape_unsupported(m)
    if why:
        pytest.skip(why)
    m.set_row_plan(None, torch.float16, kernel=name)
    return m, name, kernel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("split_k", [False, True])
def test_cuda_f16x2_add_norm_is_the_gemv_the_add_and_transformers_rmsnorm(split_k):
    """The PTX with the residual add and the next RMSNorm in its launch (run_add_norm, what
    FastDecoder.layer_at_folded calls for o_proj and down_proj at one row): the sum is the plain
    GEMV's output plus the residual, bit for bit, and the normalized row transformers' LlamaRMSNorm
    of it within one fp16 rounding, with the tuned configuration and every one its tuning may
    choose (65 row blocks of 8 rows; of 16 or 32, the last one partial); replayed from a CUDA graph, the same again and
    again (the last block's count set back to zero). A layer offers it at one row only."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    m, name, kernel = _f16x2_layer_or_skip(520, split_k)
    from bench.quant import triton_f16x2 as f

    assert m.add_norm_kernel(1) is kernel and m.add_norm_kernel(2) is None
    norm = LlamaRMSNorm(520, eps=1e-5).to(DEVICE, torch.float16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(520) + 0.5)
    x = torch.randn(1, 1152, device=DEVICE, dtype=torch.float16)
    residual = torch.randn(1, 520, device=DEVICE, dtype=torch.float16) * 4

    def check(h, xn, y):
        assert torch.equal(h, residual + y)
        want = norm(h).float()
        assert ((xn.float() - want).abs().max() / want.abs().max()).item() < 2e-3

    with torch.no_grad():
        h, xn = kernel.run_add_norm(m, x, residual, norm)
        check(h, xn, m.run_kernel(name, x))
        sz = kernel.scale_and_zero(m)
        for c in f._prune(f._configs(split_k), 1152, f.k_loops()):
            config = f.launch_config(c)
            check(*f.f16x2_mm_add_norm(x, m.packed, sz, 520, 128, split_k, residual, norm.weight, 1e-5, config),
                  f.f16x2_mm(x, m.packed, sz, 520, 128, split_k, config))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = kernel.run_add_norm(m, x, residual, norm)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out[0], h) and torch.equal(out[1], xn)


@pytest.mark.parametrize("split", [1, 4])
def test_the_f16x2_kernel_with_the_add_and_norm_compiles_for_sm90_with_no_longer_k_loop(split):
    """The add-and-norm epilogue (NORM, llava-1.5-7b's o_proj under PDL: 512 row blocks) compiled
    for sm_90: no spills, one GPU-scope acquire-release count more than the plain kernel (split K's
    per row block stays), the mean divided with IEEE rounding and the rsqrt inductor calls, and the
    K loop (the kernel's time) no more than two machine instructions longer than the plain kernel's."""
    triton_aot = triton_aot_or_skip()
    from bench.quant import triton_f16x2

    n, k, g = 4096, 4096, 128
    meta = dict(device="meta")
    args = f16x2_meta_args(n, k, g, split)
    plain = {"G": g, "EMULATE": False, "TN": 1, "BKT": 4, "SPLIT_K": split, "ROWS_FIRST": True, "num_warps": 4,
             "num_stages": 3, "PDL": True, "launch_pdl": True, "LATE": True}
    half = lambda size: torch.empty(size, dtype=torch.float16, **meta)  # noqa: E731
    norm = {**plain, "res_ptr": half(n), "g_ptr": half(n), "xn_ptr": half(n), "ss_ptr": torch.empty(2048, **meta),
            "grid_count_ptr": torch.empty(1, dtype=torch.int32, **meta), "eps": 1e-5, "NORM": True, "PB": 512,
            "NB": 4096}
    a, b = (triton_aot.compile_call(triton_f16x2._f16x2_kernel, args, kw) for kw in (plain, norm))
    assert a.spill_bytes == b.spill_bytes == 0
    counts = [c.ptx.count("atom.global.gpu.acq_rel.add") for c in (a, b)]
    assert counts == [split // 4, split // 4 + 1], counts
    assert "div.rn.f32" in b.ptx and "rsqrt.approx.ftz.f32" in b.ptx and "rsqrt" not in a.ptx
    loop_a, loop_b = (sum(triton_aot.loop_instructions(c.cubin).values()) for c in (a, b))
    assert loop_b <= loop_a + 2, (loop_a, loop_b)  # (ptxas schedules the two a little differently)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("split_k", [False, True])
def test_cuda_f16x2_gated_is_silu_of_the_gate_half_times_the_up_half(split_k):
    """The PTX with SiLU and the product in its launch (run_gated, what FastDecoder._gated calls for
    a fused gate/up projection at one row): the plain GEMV's halves through PyTorch's SiLU and
    product, bit for bit (libdevice's exp and an IEEE division, as ATen's kernel), with the tuned
    configuration (its own tuning's) and every one with an even TN its tuning may choose (a gate of 520 rows: the last
    program's rows partial); replayed from a CUDA graph, the same. A layer offers it at one row only."""
    half = 520
    m, name, kernel = _f16x2_layer_or_skip(2 * half, split_k)
    from bench.quant import triton_f16x2 as f

    assert m.gate_kernel(1) is kernel and m.gate_kernel(2) is None
    x = torch.randn(1, 1152, device=DEVICE, dtype=torch.float16) * 4

    def want(y):
        gate, up = y.split(half, 1)
        return torch.nn.functional.silu(gate) * up

    with torch.no_grad():
        got = kernel.run_gated(m, x)
        sz = kernel.scale_and_zero(m)
        # against the plain GEMV at the gated tuning's configuration (tuned apart: the plain tuning's
        # may sum in another order)
        tuned = [c for key, c in f._TUNED.items() if key[-1] == "gate" and key[1:5] == (2 * half, 1152, 128, split_k)]
        assert len(tuned) == 1, f._TUNED
        assert got.shape == (1, half) and torch.equal(got, want(f.f16x2_mm(x, m.packed, sz, 2 * half, 128, split_k,
                                                                           tuned[0])))
        for c in f._prune(f._configs(split_k), 1152, f.k_loops(), gate=True):
            config = f.launch_config(c)
            assert torch.equal(f.f16x2_mm_gated(x, m.packed, sz, 2 * half, 128, split_k, config),
                               want(f.f16x2_mm(x, m.packed, sz, 2 * half, 128, split_k, config))), config
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = kernel.run_gated(m, x)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, got)


@pytest.mark.parametrize("split", [1, 4])
def test_the_f16x2_kernel_with_silu_and_the_product_compiles_for_sm90_with_no_longer_k_loop(split):
    """The gated epilogue (GATE: llava-1.5-7b's fused gate/up, 22016 rows, under PDL) compiled for
    sm_90: no spills, an IEEE division (not Triton's approximate `/`), and the K loop no more than
    two machine instructions longer than the plain kernel's at the same TN."""
    triton_aot = triton_aot_or_skip()
    from bench.quant import triton_f16x2

    n, k, g = 22016, 4096, 128
    args = f16x2_meta_args(n, k, g, split)
    plain = {"G": g, "EMULATE": False, "TN": 2, "BKT": 4, "SPLIT_K": split, "ROWS_FIRST": True, "num_warps": 4,
             "num_stages": 3, "PDL": True, "launch_pdl": True, "LATE": True, "PREFETCH": 1}
    a, b = (triton_aot.compile_call(triton_f16x2._f16x2_kernel, args, kw) for kw in (plain, {**plain, "GATE": True}))
    assert a.spill_bytes == b.spill_bytes == 0
    assert "div.rn.f32" in b.ptx and "div.full" not in b.ptx and "div.rn.f32" not in a.ptx
    loop_a, loop_b = (sum(triton_aot.loop_instructions(c.cubin).values()) for c in (a, b))
    assert loop_b <= loop_a + 2, (loop_a, loop_b)


def test_the_tiles_kernel_compiles_for_a_capability_with_its_own_ptxas():
    """sm_100 (B200) PTX goes through the ptxas Triton ships for it (the sm_90 one refuses it),
    as lab/triton_tiles_aot.py --capability 100 asks."""
    triton_aot = triton_aot_or_skip(100)
    c = triton_aot.compile_tiles(1, 4096, 4096, 128, torch.float16, False, {"TN": 1, "BKT": 2, "SPLIT_K": 1},
                                 capability=100)
    assert c.registers > 0 and c.spill_bytes == 0 and ".target sm_100a" in c.ptx
    with pytest.raises(RuntimeError, match=r"ptxas for sm_100a refused .*syntax error"):  # its reason, one line
        triton_aot._ptxas_usage(c.ptx.replace(".entry", "not ptx .entry", 1), 100)
