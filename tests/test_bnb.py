"""bitsandbytes variants on the CPU (bitsandbytes 0.50 runs int8 and NF4 there): the real code path."""
import csv

import pytest
import torch

pytest.importorskip("bitsandbytes")
from bitsandbytes.nn import Linear4bit, Linear8bitLt  # noqa: E402

from bench.cli import run_main  # noqa: E402
from bench.models.source import ModelSource  # noqa: E402
from variants import parse_variant  # noqa: E402

CPU = torch.device("cpu")


def load(spec, source, **options):
    opts = {"bnb_int8_threshold": 6.0, "bnb4_double_quant": False, "bnb4_compute_dtype": "auto",
            "quantize_vision": False, **options}
    part = parse_variant(spec).weights
    loaded = part.load(source, CPU, torch.float32, part.options(opts))
    return loaded.adapter, loaded.columns()


def linear_types(module):
    return {type(m) for m in module.modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("spec,cls", [("bnb8", Linear8bitLt), ("bnb4", Linear4bit), ("bnb4-fp4", Linear4bit)])
@pytest.mark.parametrize("family", ["llava", "vila", "internvl"])
def test_llm_linears_become_bnb_modules(spec, cls, family, checkpoint_dirs):
    for source in (ModelSource(None, f"tiny-{family}", None), ModelSource(str(checkpoint_dirs[family]), None, None)):
        adapter, info = load(spec, source)
        decoder = adapter.quantization_targets(False)[0]
        assert linear_types(decoder) == {cls}
        for v in adapter.vision_modules():  # vision tower + projector stay unquantized by default
            assert not linear_types(v) & {Linear4bit, Linear8bitLt}
        lm_head = adapter.decoder_parts()[1]
        assert type(lm_head) is torch.nn.Linear
        assert info["quantized"] == "llm" and info["quantized_layers"] == 14  # 2 layers x 7 linears


@pytest.mark.parametrize("family", ["llava", "vila", "internvl"])
def test_quantize_vision_option(family, checkpoint_dirs):
    for source in (ModelSource(None, f"tiny-{family}", None), ModelSource(str(checkpoint_dirs[family]), None, None)):
        adapter, info = load("bnb4", source, quantize_vision=True)
        assert info["quantized"] == "llm+vision"
        for v in adapter.vision_modules():
            assert Linear4bit in linear_types(v) and torch.nn.Linear not in linear_types(v)  # (MHA pooling head aside)


def test_nf4_bytes(checkpoint_dirs):
    _, info = load("bnb4", ModelSource(None, "tiny-vila", None))
    assert info["quantized_layers_mb"] <= 0.35 * info["quantized_layers_fp16_mb"]
    _, info8 = load("bnb8", ModelSource(None, "tiny-vila", None))
    assert 0.5 <= info8["quantized_layers_mb"] / info8["quantized_layers_fp16_mb"] <= 0.6


@pytest.mark.parametrize("spec", ["bnb8", "bnb4"])
def test_preset_swap_equals_transformers_quantized_load(spec, checkpoint_dirs, demo_image):
    """Presets (module swap) and checkpoints (BitsAndBytesConfig at load) quantize identically."""
    from tests.test_models import full_logits

    a, _ = load(spec, ModelSource(None, "tiny-llava", None))
    b, _ = load(spec, ModelSource(str(checkpoint_dirs["llava"]), None, None))
    torch.testing.assert_close(full_logits(a, demo_image, "q"), full_logits(b, demo_image, "q"), rtol=0, atol=1e-5)


def test_fidelity_columns(tmp_path):
    out = tmp_path / "o"
    assert run_main(["--preset", "tiny-vila", "--variants", "fp16,bnb8,bnb4,prefix", "--num-runs", "2",
                     "--device", "cpu", "--max-new-tokens", "32", "--min-seconds", "0", "--warmup", "0",
                     "--output-dir", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "runs.csv")))
    fid = {}
    for r in rows:
        assert r["status"] == "ok" and r["fidelity_probe"] and r["fidelity_probe"] != r["question"]
        fid.setdefault(r["variant"], (float(r["token_agree"]), float(r["kl_mean"]), r["first_divergence"],
                                      r["quantized"]))
    assert fid["fp16"] == (1.0, 0.0, "", "none")
    assert fid["prefix"][:2] == (1.0, 0.0)  # reuse is exact
    assert fid["bnb8"][3] == fid["bnb4"][3] == "llm"
    assert 0 < fid["bnb8"][1] < fid["bnb4"][1]
    assert fid["bnb4"][0] < 1.0 and fid["bnb4"][2] != ""
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["fp16"]["divergence_margin"] == by_variant["fp16"]["divergence_margin_steps"] == ""
    # fp32 logits: bnb4's divergence is a real change of the answer, many rounding steps wide
    assert float(by_variant["bnb4"]["divergence_margin"]) > 0
    assert float(by_variant["bnb4"]["divergence_margin_steps"]) > 100
    shares = {r["ref_near_tie_share"] for r in rows}
    assert len(shares) == 1 and 0 <= float(shares.pop()) < 0.5  # a property of the baseline


def test_missing_package_is_a_skipped_row(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    out = tmp_path / "o"
    assert run_main(["--preset", "tiny-vila", "--variants", "bnb4,fp16", "--num-runs", "1", "--max-new-tokens", "2",
                     "--min-seconds", "0", "--warmup", "0", "--output-dir", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert rows[0]["status"] == "skipped" and "bitsandbytes" in rows[0]["error"]
    assert rows[1]["variant"] == "fp16" and rows[1]["status"] == "ok"
