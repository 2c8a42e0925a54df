"""int4 weights: the AutoAWQ GEMM format, the int4 layer's two paths, AWQ vs RTN, save/load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.quant.awq_format import AWQ_ORDER, from_awq_gemm, pack_columns, to_awq_gemm, unpack_columns
from bench.quant.int4 import Int4Linear, quantize_int4

pytest.importorskip("torchao")

CPU = torch.device("cpu")


# ------------------------------------------------------------------------ AutoAWQ GEMM format
def test_awq_packing_fixed_vectors():
    # AutoAWQ's WQLinear_GEMM.from_linear: qweight[:, j] |= intweight[:, 8j + order_map[i]] << 4i,
    # order_map = [0, 2, 4, 6, 1, 3, 5, 7]. So columns 0..7 holding 0..7 pack to nibbles
    # (low to high) 0,2,4,6,1,3,5,7 = 0x75316420.
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    cols = torch.arange(8, dtype=torch.int32).view(1, 8)
    assert pack_columns(cols).tolist() == [[0x75316420]]
    one_hot = torch.zeros(8, 8, dtype=torch.int32)
    one_hot[torch.arange(8), torch.arange(8)] = 15
    # column c lands in nibble ORDER.index(c): c=1 -> nibble 4 -> 0x000F0000
    expect = [0xF << (4 * AWQ_ORDER.index(c)) for c in range(8)]
    expect = [e - 2**32 if e >= 2**31 else e for e in expect]
    assert pack_columns(one_hot).view(-1).tolist() == expect
    assert pack_columns(torch.full((1, 8), 15, dtype=torch.int32)).tolist() == [[-1]]
    # AutoAWQ's unpacker reads nibbles in bit order and reorders them with AWQ_REVERSE_ORDER.
    packed = torch.tensor([[0x75316420, 0x0F0F0F0F]], dtype=torch.int32)
    bit_order = [(0x75316420 >> (4 * i)) & 15 for i in range(8)]
    assert [bit_order[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)] == list(range(8))
    # 0x0F0F0F0F: nibbles 0,2,4,6 (columns 0,4,1,5) are 15, nibbles 1,3,5,7 (columns 2,6,3,7) are 0
    assert unpack_columns(packed).tolist() == [list(range(8)) + [15, 15, 0, 0, 15, 15, 0, 0]]


def test_awq_dequantization_matches_the_published_formula():
    # One input row (K=1... group of 2 rows), 8 outputs: W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n].
    q = torch.tensor([[3, 0, 15, 8, 1, 2, 9, 4], [7, 7, 7, 7, 0, 15, 1, 14]], dtype=torch.int32)  # [K=2, N=8]
    z = torch.tensor([[8, 1, 0, 8, 2, 2, 9, 3]], dtype=torch.int32)  # [K/G=1, N]
    s = torch.tensor([[0.5, 1.0, 0.25, 2.0, 1.5, 0.125, 1.0, 4.0]], dtype=torch.float16)
    t = from_awq_gemm(pack_columns(q), pack_columns(z), s)
    expect = ((q - z).float() * s.float()).t()  # [N, K]
    assert t.group_size == 2
    assert torch.equal(t.dequantize(), expect)
    assert t.dequantize()[0].tolist() == [(3 - 8) * 0.5, (7 - 8) * 0.5]
    back = to_awq_gemm(t)
    assert torch.equal(back["qweight"], pack_columns(q)) and torch.equal(back["qzeros"], pack_columns(z))


# ------------------------------------------------------------------------ the int4 layer
@pytest.mark.parametrize("n,k,group", [(64, 64, 32), (128, 256, 64), (48, 128, 128)])
def test_dense_path_and_int4_kernel_agree(n, k, group):
    torch.manual_seed(0)
    w = torch.randn(n, k)
    t = quantize_int4(w, group)
    ref = t.dequantize()
    assert (ref - w).abs().max() <= 0.6 * (w.abs().max() / 7)  # within half a step of the widest group
    layer = Int4Linear.from_int4(t, CPU, torch.float32, dense_rows=4)
    x = torch.randn(2, 3, k)
    small = layer(x)  # 6 rows > 4: dense
    layer.dense_rows = 64
    kernel = layer(x)  # int4 kernel
    exact = x @ ref.t()
    assert torch.allclose(small, exact, atol=1e-4, rtol=1e-4)
    assert torch.allclose(kernel, exact, atol=1e-4, rtol=1e-4)
    # back to (q, scale, zero) exactly, as a checkpoint stores them
    back = layer.to_int4()
    assert torch.equal(back.q, t.q) and torch.equal(back.zero, t.zero) and torch.equal(back.scale, t.scale)


def test_half_precision_paths_agree_within_int4_tolerance():
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    t = quantize_int4(w, 32)
    layer = Int4Linear.from_int4(t, CPU, torch.bfloat16, dense_rows=8)
    x = torch.randn(16, 128).to(torch.bfloat16)
    dense = layer(x).float()
    layer.dense_rows = 16
    kern = layer(x).float()
    exact = x.float() @ t.dequantize().t()
    scale = exact.abs().max()
    assert (dense - exact).abs().max() / scale < 0.02
    assert (kern - exact).abs().max() / scale < 0.02


# ------------------------------------------------------------------------ AWQ vs RTN
def _plant_outliers(adapter, factor: float = 25.0, channels=(3, 17, 40)):
    """Scale a few input channels of every norm by `factor`, the weights reading them by 1/factor:
    the same function, with the activation outliers AWQ exists for."""
    from bench.quant.awq import decoder_layers

    c = list(channels)
    with torch.no_grad():
        for layer in decoder_layers(adapter.quantization_targets(False)[0]):
            a, m = layer.self_attn, layer.mlp
            for norm, lins in ((layer.input_layernorm, (a.q_proj, a.k_proj, a.v_proj)),
                               (layer.post_attention_layernorm, (m.gate_proj, m.up_proj))):
                norm.weight[c] *= factor
                for lin in lins:
                    lin.weight[:, c] /= factor


def _layer_errors(fp, quant, image) -> float:
    """Mean relative error of every decoder layer's output on one unseen request."""
    from transformers import DynamicCache

    from bench.quant.awq import decoder_layers

    outs = {}

    def grab(tag):
        def hook(mod, args, out):
            outs.setdefault(tag, []).append((out[0] if isinstance(out, tuple) else out).detach().float())
        return hook

    errs = []
    for tag, adapter in (("fp", fp), ("q", quant)):
        hooks = [layer.register_forward_hook(grab(tag))
                 for layer in decoder_layers(adapter.quantization_targets(False)[0])]
        prepared = adapter.prepare(image, "An unseen probe: what is in the middle of the picture?")
        with torch.inference_mode():
            emb = adapter.prompt_embeds(prepared, adapter.encode_image(adapter.pixels_to_device(prepared)))
            adapter.lm_forward(emb, DynamicCache())
        for h in hooks:
            h.remove()
    for a, b in zip(outs["fp"], outs["q"]):
        errs.append(float((a - b).pow(2).mean() / a.pow(2).mean()))
    return sum(errs) / len(errs)


def test_awq_beats_rtn_on_planted_outliers(demo_image):
    from bench.run import fidelity
    from bench.engines.hf import HFEngine
    from bench.engines.cache_policy import CachePolicy
    from bench.models.loader import build_preset
    from bench.quant.awq import Int4Options, calibration_images, quantize_model

    def model():
        a = build_preset("tiny-llava", None, CPU, torch.float32, seed=3)
        _plant_outliers(a)
        return a

    fp = model()
    ref = fidelity.make_reference(HFEngine(fp, CachePolicy()), demo_image, 24)
    results = {}
    for method in ("rtn", "awq"):
        q = model()
        report = quantize_model(q, Int4Options(method=method, group_size=32, calib_samples=4),
                                calibration_images(demo_image, 4))
        kl = fidelity.compare(ref, HFEngine(q, CachePolicy()), demo_image)["kl_mean"]
        results[method] = (_layer_errors(fp, q, demo_image), kl, report)
    (rtn_err, rtn_kl, _), (awq_err, awq_kl, report) = results["rtn"], results["awq"]
    assert report.err_ratio < 0.7  # on the calibration rows
    assert awq_err <= 0.7 * rtn_err, (awq_err, rtn_err)  # on an unseen request, every layer
    assert awq_kl <= 0.7 * rtn_kl, (awq_kl, rtn_kl)
    assert report.runtime_scaled == 2  # o_proj under GQA (2 layers) keeps a runtime 1/s


def test_awq_without_outliers_is_no_worse_than_rtn_on_calibration(demo_image):
    from bench.models.loader import build_preset
    from bench.quant.awq import Int4Options, calibration_images, quantize_model

    a = build_preset("tiny-vila", None, CPU, torch.float32, seed=0)
    report = quantize_model(a, Int4Options(method="awq", group_size=32, calib_samples=2),
                            calibration_images(demo_image, 2))
    assert all(aw <= r + 1e-12 for aw, r in zip(report.awq_err, report.rtn_err))
    assert report.calib_tokens > 2 * 9  # image tokens went through: 9 per request on tiny-vila


# ------------------------------------------------------------------------ save / load
def _logits(adapter, image):
    from transformers import DynamicCache

    prepared = adapter.prepare(image, "Describe this image in detail.")
    with torch.inference_mode():
        emb = adapter.prompt_embeds(prepared, adapter.encode_image(adapter.pixels_to_device(prepared)), [5, 6, 7])
        return adapter.lm_forward(emb, DynamicCache(), logits_to_keep=4)


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-vila"])
def test_saved_awq_model_reloads_with_identical_logits(preset, demo_image, tmp_path):
    from bench.models.loader import build_preset
    from bench.quant.awq import Int4Options, calibration_images, quantize_model
    from bench.quant.store import load_int4_file, read_meta, save_int4

    a = build_preset(preset, None, CPU, torch.float32, seed=0)
    quantize_model(a, Int4Options(method="awq", group_size=32, calib_samples=2), calibration_images(demo_image, 2))
    path = tmp_path / "q.safetensors"
    save_int4(a, path, {"group_size": 32, "method": "awq"})
    assert read_meta(path)["method"] == "awq"
    with pytest.raises(OSError):  # safetensors' own error for a failed write, as an OSError
        save_int4(a, Path("/proc/self/q.safetensors"), {"group_size": 32, "method": "awq"})
    taken = tmp_path / "taken" / "q.safetensors"  # a folder where the file goes: no .tmp file left beside it
    taken.mkdir(parents=True)
    (taken / "x").write_text("")
    with pytest.raises(OSError):
        save_int4(a, taken, {"group_size": 32, "method": "awq"})
    assert sorted(p.name for p in taken.parent.iterdir()) == ["q.safetensors"]
    b = build_preset(preset, None, CPU, torch.float32, seed=0)
    assert load_int4_file(b, path, dense_rows=32) == 14
    assert torch.equal(_logits(a, demo_image), _logits(b, demo_image))
    # the saved file really is int4: packed weights, not a float copy
    saved = load_file(str(path))
    assert saved["layers.0.mlp.up_proj.qweight"].dtype == torch.int32
    assert "layers.0.mlp.up_proj.weight" not in saved


def test_variant_reuses_the_saved_model(tmp_path, demo_image):
    from bench.models.source import ModelSource
    from variants import parse_variant

    opts = {"int4_group_size": 32, "awq_calib": 2, "int4_dense_rows": 32, "seed": 0,
            "int4_cache_dir": str(tmp_path), "image_path": str(__import__("tests.conftest").conftest.DEMO)}
    v = parse_variant("awq4")
    first = v.weights.load(ModelSource(None, "tiny-vila", None), CPU, torch.float32, v.weights.options(opts))
    assert first.facts["quant_source"].startswith("calibrated")
    files = list(tmp_path.glob("tiny-vila-awq4-g32-*.safetensors"))
    assert len(files) == 1
    second = v.weights.load(ModelSource(None, "tiny-vila", None), CPU, torch.float32, v.weights.options(opts))
    assert second.facts["quant_source"] == str(files[0])
    assert second.facts["quant_err_ratio"] == pytest.approx(first.facts["quant_err_ratio"])
    assert second.columns()["quant_source"] == str(files[0])
    assert torch.equal(_logits(first.adapter, demo_image), _logits(second.adapter, demo_image))
    # a different group size is another model: not reused
    other = v.weights.load(ModelSource(None, "tiny-vila", None), CPU, torch.float32,
                           v.weights.options({**opts, "int4_group_size": 64}))
    assert other.facts["quant_source"].startswith("calibrated")
    assert other.weights_key != first.weights_key == second.weights_key


# ------------------------------------------------------------------------ AutoAWQ checkpoints
def write_autoawq_checkpoint(src, dst, family: str, group: int = 32):
    """Turn an fp checkpoint into AutoAWQ GEMM layout: every decoder linear's weight becomes
    qweight/qzeros/scales (RTN), config.json gains quantization_config."""
    from bench.quant.awq_format import awq_quantization_config

    shutil.copytree(src, dst)
    weights_dir = dst / "llm" if family == "vila" else dst
    cfg_file = weights_dir / "config.json"
    for file in weights_dir.glob("*.safetensors"):
        state = load_file(str(file))
        out = {}
        for k, v in state.items():
            is_decoder_linear = (".layers." in k and k.endswith("_proj.weight")
                                 and (family == "vila" or "language_model" in k))
            if is_decoder_linear:
                for sfx, t in to_awq_gemm(quantize_int4(v, group)).items():
                    out[k[: -len("weight")] + sfx] = t
            else:
                out[k] = v
        save_file(out, str(file), metadata={"format": "pt"})
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"] = awq_quantization_config(group, ["vision_tower", "multi_modal_projector"])
    cfg_file.write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("family", ["llava", "vila", "internvl"])
def test_autoawq_checkpoint_loads_and_equals_rtn(family, checkpoint_dirs, tmp_path, demo_image):
    from bench.quant.awq import Int4Options, int4_layers, quantize_model
    from bench.models.source import ModelSource

    src = checkpoint_dirs[family]
    awq_dir = write_autoawq_checkpoint(src, tmp_path / "awq", family)
    source = ModelSource(str(awq_dir), None, None)
    assert source.prequantized["quant_method"] == "awq"
    loaded = source.load(CPU, torch.float32)
    assert len(int4_layers(loaded)) == 14
    reference = ModelSource(str(src), None, None).load(CPU, torch.float32)
    quantize_model(reference, Int4Options(method="rtn", group_size=32))
    assert torch.equal(_logits(loaded, demo_image), _logits(reference, demo_image))


def test_cli_on_autoawq_checkpoint_skips_fp16_and_runs_awq4(checkpoint_dirs, tmp_path):
    import csv

    from bench.cli import run_main

    awq_dir = write_autoawq_checkpoint(checkpoint_dirs["llava"], tmp_path / "awq", "llava")
    out = tmp_path / "out"
    code = run_main(["--model-path", str(awq_dir), "--variants", "fp16,awq4,rtn4", "--num-runs", "2",
                     "--device", "cpu", "--min-seconds", "0", "--max-new-tokens", "4", "--warmup", "0",
                     "--output-dir", str(out), "--int4-cache-dir", ""])
    assert code == 0
    rows = list(csv.DictReader(open(out / "runs.csv")))
    by = {r["variant"]: r for r in rows}
    assert by["fp16"]["status"] == "skipped" and "already AWQ int4" in by["fp16"]["error"]
    assert by["rtn4"]["status"] == "skipped"
    assert by["awq4"]["status"] == "ok" and by["awq4"]["quant_method"] == "checkpoint"


def test_autoawq_checkpoint_missing_a_layer_is_a_usage_error(checkpoint_dirs, tmp_path, capsys):
    from bench.cli import run_main

    awq_dir = write_autoawq_checkpoint(checkpoint_dirs["llava"], tmp_path / "awq", "llava")
    for file in awq_dir.glob("*.safetensors"):
        state = {k: v for k, v in load_file(str(file)).items() if ".layers.1.mlp.down_proj." not in k}
        save_file(state, str(file), metadata={"format": "pt"})
    assert run_main(["--model-path", str(awq_dir), "--variants", "awq4", "--num-runs", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "neither int4 nor full weights" in err and "layers.1.mlp.down_proj" in err


def test_int4_usage_errors(tmp_path, capsys):
    from bench.cli import run_main

    assert run_main(["--variants", "awq4", "--int4-group-size", "100"]) == 2
    assert run_main(["--variants", "awq4", "--awq-calib-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)


# ------------------------------------------------------------------------ CUDA only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("n,k,group", [(4096, 4096, 128), (2560, 6912, 128), (11008, 4096, 128), (48, 256, 32)])
def test_cuda_int4_kernel_and_dense_path_match_the_weights(n, k, group):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t = quantize_int4(torch.randn(n, k, device=dev), group)
    ref = t.dequantize().to(dev)
    layer = Int4Linear.from_int4(t, dev, torch.float16, dense_rows=8)
    back = layer.to_int4()  # the learnt tile layout unpacks exactly
    assert torch.equal(back.q, t.q.cpu()) and torch.equal(back.zero, t.zero.cpu())
    dense = layer.dense_weight(torch.float16).float()  # Triton dequantizer
    tol = 2e-2 if layer.scale_and_zero.dtype == torch.bfloat16 else 2e-3
    assert (dense - ref).abs().max() <= tol * ref.abs().max()
    for rows in (1, 3, 8, 40):  # <= 8: tinygemm; 40: dequantize + GEMM
        x = torch.randn(rows, k, device=dev, dtype=torch.float16)
        exact = x.float() @ ref.t()
        assert (layer(x).float() - exact).abs().max() / exact.abs().max() < 2 * tol, rows


@cuda
@pytest.mark.parametrize("n,k,group", [(4096, 4096, 128), (48, 256, 32), (24, 512, 64), (16, 512, 256)])
def test_cuda_published_layout_dequantizer_equals_the_learnt_layout_one(n, k, group):
    """This build's packer writes the layout its source defines, and the dequantizer built on it
    writes exactly what the one reading the learnt tile permutation writes."""
    from bench.quant import triton_int4

    dev = torch.device("cuda")
    torch.manual_seed(0)
    layer = Int4Linear.from_int4(quantize_int4(torch.randn(n, k, device=dev), group), dev, torch.float16)
    assert layer.published_layout
    args = (layer.packed, layer.scale_and_zero, layer.tile_inverse)
    fast = triton_int4.dequantize_tinygemm(*args, torch.empty(n, k, device=dev, dtype=torch.float16), group, True)
    learnt = triton_int4.dequantize_tinygemm(*args, torch.empty(n, k, device=dev, dtype=torch.float16), group, False)
    assert torch.equal(fast, learnt)
    traced = torch.compile(lambda: triton_int4.dequantize_traceable(*args, n, k, group, torch.float16, True),
                           fullgraph=True)()
    assert torch.equal(traced, learnt)


@cuda
def test_cuda_compiled_dense_path_is_traced_and_matches_eager():
    """Compiled, the dense path is the Triton dequantizer traced into the graph (no opaque op
    left) and computes what the eager path (custom op + captured dequantize) does."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    layer = Int4Linear.from_int4(quantize_int4(torch.randn(2560, 2560, device=dev), 128), dev, torch.float16,
                                 dense_rows=8)
    x = torch.randn(1, 40, 2560, device=dev, dtype=torch.float16)
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    torch._dynamo.reset()
    torch.compile(lambda t: layer(t), backend=backend, dynamic=True, fullgraph=True)(x)
    assert not any("int4_dense_linear" in t for t in seen) and any("triton_kernel_wrapper" in t for t in seen)
    compiled = torch.compile(lambda t: layer(t) * 2, dynamic=True, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x) * 2, rtol=2e-3, atol=2e-3)


def test_dense_path_compiles_as_one_graph():
    """The graph engine compiles whole decoder layers: the int4 prefill path is one opaque op
    (no graph break), and compiled it computes what eager does."""
    torch.manual_seed(0)
    layer = Int4Linear.from_int4(quantize_int4(torch.randn(64, 256), 64), torch.device("cpu"), torch.float32,
                                 dense_rows=4)
    x = torch.randn(1, 20, 256)
    compiled = torch.compile(lambda t: layer(t) * 2, dynamic=True, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x) * 2)


@pytest.mark.parametrize("family", ["llava", "vila", "internvl"])
def test_int4_model_on_the_static_engine_fuses_and_matches_hf(family, checkpoint_dirs, demo_image):
    """awq4/rtn4 weights under the static engines: q/k/v and gate/up become fused int4 GEMMs
    (codes concatenated exactly) and the greedy tokens equal the hf engine's, prefix or not."""
    from bench.engines.cache_policy import CachePolicy
    from bench.engines.hf import HFEngine
    from bench.models.loader import load_checkpoint
    from bench.quant.awq import Int4Options, quantize_model
    from bench.engines.static import StaticEngine
    from variants.prefix import PrefixKVPolicy

    adapter = load_checkpoint(checkpoint_dirs[family], None, CPU, torch.float32)
    quantize_model(adapter, Int4Options(method="rtn", group_size=32))
    q = "What is shown?"
    want = HFEngine(adapter, CachePolicy()).run(demo_image, q, 16).tokens
    engine = StaticEngine(adapter, CachePolicy())
    assert engine.decoder.fusion == "qkv:int4,gate_up:int4"
    assert engine.run(demo_image, q, 16).tokens == want
    cached = StaticEngine(adapter, PrefixKVPolicy(64))
    cached.run(demo_image, "warm-up", 2)
    r = cached.run(demo_image, q, 16)
    assert r.cache_hit and r.tokens == want


def test_prefetched_prefill_weights_give_the_in_line_logits(checkpoint_dirs, demo_image):
    """Full prefill over int4 weights reads dense copies made a layer ahead, two slots shared by
    alternate layers: the logits equal those of dequantizing in line (so every layer read its
    own weights), and the slots are not counted as weights."""
    from bench.engines.cache_policy import CachePolicy
    from bench.models.loader import load_checkpoint
    from bench.quant.awq import Int4Options, quantize_model
    from bench.run.runner import weight_mb
    from bench.engines.static import StaticEngine

    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    quantize_model(adapter, Int4Options(method="rtn", group_size=32))
    before = weight_mb(adapter.model)
    engine = StaticEngine(adapter, CachePolicy())
    assert engine.prefetch is not None and "dequantized a layer ahead" in engine.describe()
    assert weight_mb(adapter.model) == before
    slots = engine.prefetch.slots
    layers = engine.decoder.prefill_linears(4096)
    assert [m.prefill_weight is slots[i % 2][j] for i, ms in enumerate(layers) for j, m in enumerate(ms)] \
        == [True] * sum(len(ms) for ms in layers)
    p = adapter.prepare(demo_image, "What is shown in this picture?")
    with torch.no_grad():
        embeds = adapter.prompt_embeds(p, adapter.encode_image(adapter.pixels_to_device(p)))
        cache = engine.new_cache(embeds.shape[1], 4)
        in_line = engine.decoder.prefill(embeds, cache, 0)
        cache.reset()
        prefetched = engine.full_prefill(embeds, cache, 0)
    torch.testing.assert_close(prefetched, in_line, rtol=1e-5, atol=1e-5)
    # the slots are what the layers read: slots left empty give other logits
    engine.prefetch._dequantize = lambda i: [t.zero_() for t in engine.prefetch.slots[i % 2]]
    with torch.no_grad():
        cache.reset()
        assert not torch.allclose(engine.full_prefill(embeds, cache, 0), in_line)


@cuda
def test_cuda_prefetched_prefill_matches_in_line():
    """On CUDA the slots are filled on a side stream (captured per layer after the first
    prefill): the prefill's logits equal dequantizing in line, on the first and later calls."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.engines.decoder import FastDecoder
    from bench.quant.prefetch import DensePrefetch

    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=5, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=512)
    model = LlamaForCausalLM(cfg).to(dev, torch.float16).eval()
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                w = getattr(parent, name).weight.detach().float()
                setattr(parent, name, Int4Linear.from_int4(quantize_int4(w, 128), dev, torch.float16, dense_rows=8))
    dec = FastDecoder(model.model, model.lm_head, cfg)
    dec.set_fused_max_rows(2**62)
    prefetch = DensePrefetch(dec.prefill_linears(4096), torch.float16)
    x = torch.randn(1, 300, 256, device=dev, dtype=torch.float16)
    kv = dec.new_buffers(512)
    with torch.inference_mode():
        want = dec.prefill(x, kv, 0)
        for _ in range(3):
            kv.reset()
            with prefetch.reading():
                got = dec.prefill(x, kv, 0, prefetch=prefetch)
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert len(prefetch.graphs) == 5


@pytest.mark.parametrize("flag,prefetched,folded", [("--int4-prefetch", True, True),
                                                   ("--no-int4-prefetch", False, True),
                                                   ("--int4-fold-norms", True, True),
                                                   ("--no-int4-fold-norms", True, False)])
def test_int4_prefetch_flag_reaches_the_engine(flag, prefetched, folded, tmp_path):
    """--no-int4-prefetch keeps in-line dequantization (no dense slots); every row says which ran.
    --int4-fold-norms (the default) and --no-int4-fold-norms reach the engines' spec (the graph
    engine's folded step layer: test_fast_decoder)."""
    import csv

    from bench.cli import run_main

    out = tmp_path / "o"
    assert run_main(["--preset", "tiny-llava", "--variants", "rtn4", "--engine", "static", "--num-runs", "1",
                     "--min-seconds", "0", "--max-new-tokens", "2", "--warmup", "0", "--no-fidelity",
                     "--int4-cache-dir", "", "--int4-group-size", "32", flag, "--output-dir", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert rows and all(r["status"] == "ok" for r in rows)
    assert all(("dequantized a layer ahead" in r["engine_detail"]) == prefetched for r in rows)
    env = json.loads((out / "env.json").read_text())  # the spec the engine ran with
    assert env["engines"]["rtn4+static"]["int4_prefetch"] is prefetched
    assert env["engines"]["rtn4+static"]["fold_norms"] is folded


def test_prefill_copy_gives_the_same_tokens_and_is_counted_as_weights(tmp_path):
    """--int4-prefill-copy: prefill reads a dense copy of each int4 weight instead of dequantizing
    (same tokens, no prefetch slots); the copies are a column of their own and part of weight_mb."""
    import csv

    from bench.cli import run_main

    rows = {}
    for flag in ("--no-int4-prefill-copy", "--int4-prefill-copy"):
        out = tmp_path / flag
        assert run_main(["--preset", "tiny-llava", "--variants", "rtn4", "--engine", "static", "--num-runs", "2",
                         "--min-seconds", "0", "--max-new-tokens", "6", "--warmup", "0", "--no-fidelity",
                         "--int4-cache-dir", "", "--int4-group-size", "32", flag, "--device", "cpu",
                         "--output-dir", str(out)]) == 0
        rows[flag] = [r for r in csv.DictReader(open(out / "runs.csv")) if r["kind"] == "measured"]
    plain, copy = rows["--no-int4-prefill-copy"], rows["--int4-prefill-copy"]
    assert [r["output_text"] for r in copy] == [r["output_text"] for r in plain]
    assert float(plain[0]["int4_prefill_copy_mb"]) == 0
    extra = float(copy[0]["int4_prefill_copy_mb"])
    assert extra == pytest.approx(float(copy[0]["quantized_layers_fp16_mb"]) * 2)  # float32 on the CPU
    assert float(copy[0]["weight_mb"]) == pytest.approx(float(plain[0]["weight_mb"]) + extra)
    assert "dequantized a layer ahead" in plain[0]["engine_detail"] and float(plain[0]["int4_prefetch_mb"]) > 0
    assert "dequantized a layer ahead" not in copy[0]["engine_detail"] and copy[0]["int4_prefetch_mb"] == ""


def test_prefill_copy_reaches_fused_projections_as_views(checkpoint_dirs, demo_image):
    """Fused q/k/v and gate/up layers hold one dense copy; the originals' copies are views of it,
    and rows above dense_rows through either give the dequantizing path's outputs."""
    from bench.engines.fused_linear import FusedProjections
    from bench.models.loader import load_checkpoint
    from bench.quant.awq import Int4Options, quantize_model

    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    quantize_model(adapter, Int4Options(method="rtn", group_size=32))
    attn = next(m for m in adapter.model.modules() if isinstance(getattr(m, "q_proj", None), Int4Linear))
    linears = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(1, 20, linears[0].in_features)
    want = [m(x) for m in linears]
    for m in linears:
        m.keep_dense_copy(torch.float32)
    fused = FusedProjections(linears)
    for got, w in zip(fused(x), want):
        torch.testing.assert_close(got, w)
    whole = fused.fused.dense_copy
    assert all(m.dense_copy.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr() for m in linears)
    for m, w in zip(linears, want):
        torch.testing.assert_close(m(x), w)
    whole.zero_()  # the copies are what those rows read: zeroed, only the biases are left
    for m in linears:
        bias = torch.zeros(m.out_features) if m.bias is None else m.bias
        torch.testing.assert_close(m(x), bias.expand(1, 20, -1))
    assert all(torch.count_nonzero(m(x[:, :1])) for m in linears)  # one row: the int4 kernel


def _cuda_layers(n, k, count, group=128):
    return [Int4Linear.from_int4(quantize_int4(torch.randn(n, k) * 0.02, group), torch.device("cuda"),
                                 torch.float16) for _ in range(count)]


@cuda
def test_cuda_prefill_copies_are_each_layers_own():
    """On CUDA dense_weight returns a scratch buffer shared by a shape's layers: each copy is a
    tensor of its own holding its own layer's weight."""
    layers = _cuda_layers(256, 256, 3)
    for m in layers:
        m.keep_dense_copy(torch.float16)
    assert len({m.dense_copy.data_ptr() for m in layers}) == 3
    weights = [m.to_int4().dequantize(torch.float32).cuda() for m in layers]
    # each its own layer's weight, far from the others': within the rounding of the zero offset the
    # layer keeps in its scales' dtype (bfloat16 for tinygemm on some CUDA builds) against the
    # integer zero the reference rebuilds
    for i, m in enumerate(layers):
        off = [(m.dense_copy.float() - w).abs().max().item() for w in weights]
        assert off[i] < 1e-3 and all(d > 1e-2 for j, d in enumerate(off) if j != i), off


def test_layers_the_cuda_kernel_cannot_take_stay_dense():
    """The tiny presets' 64-wide layers fit the CPU kernel (group 64) but not CUDA's 8 x 128 tiles:
    on a CUDA device they stay dense instead of failing the variant."""
    from bench.quant.int4 import layer_group_size

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert layer_group_size(64, 128, 64, cpu) == 64
    assert layer_group_size(64, 128, 64, cuda) is None
    assert layer_group_size(4096, 128, 11008, cuda) == 128
    assert layer_group_size(4096, 128, 11004, cuda) is None  # out_features not a multiple of 8
    assert layer_group_size(96, 128) == 32
