"""Checkpoint layouts round-trip, prompt layouts, VILA's projector and image features."""
import json

import pytest
import torch
from transformers import DynamicCache

from bench.models.loader import build_preset, load_checkpoint
from bench.models.vila import DownSampleBlock, downsampled_tokens
from bench.models.templates import TEMPLATES

CPU = torch.device("cpu")


def full_logits(adapter, image, question):
    p = adapter.prepare(image, question)
    with torch.no_grad():
        img = adapter.encode_image(adapter.pixels_to_device(p))
        emb = adapter.prompt_embeds(p, img)
        return adapter.lm_forward(emb, DynamicCache(), logits_to_keep=0)


@pytest.mark.parametrize("family,preset", [("llava", "tiny-llava"), ("vila", "tiny-vila"),
                                           ("internvl", "tiny-internvl")])
def test_checkpoint_round_trip_logits_equal(family, preset, checkpoint_dirs, demo_image):
    saved = build_preset(preset, None, CPU, torch.float32, seed=0)
    loaded = load_checkpoint(checkpoint_dirs[family], None, CPU, torch.float32)
    assert loaded.family == family
    assert loaded.weights == "random"  # written from a preset: still labelled random
    a = full_logits(saved, demo_image, "What is shown?")
    b = full_logits(loaded, demo_image, "What is shown?")
    assert a.shape == b.shape and a.shape[1] > 10
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_vila_layout_on_disk(tiny_vila_dir):
    cfg = json.loads((tiny_vila_dir / "config.json").read_text())
    assert cfg["model_type"] == "llava_llama" and cfg["architectures"] == ["LlavaLlamaModel"]
    assert {"llm_cfg", "vision_tower_cfg", "mm_projector_cfg"} <= set(cfg)
    assert (tiny_vila_dir / "llm" / "model.safetensors").is_file()
    assert (tiny_vila_dir / "llm" / "tokenizer.json").is_file()
    assert (tiny_vila_dir / "vision_tower" / "preprocessor_config.json").is_file()
    proj = json.loads((tiny_vila_dir / "mm_projector" / "config.json").read_text())
    assert proj == {"mm_projector_type": "mlp_downsample", "model_type": "v2l_projector"}
    from safetensors import safe_open

    with safe_open(str(tiny_vila_dir / "mm_projector" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["layers.1.bias", "layers.1.weight", "layers.2.bias", "layers.2.weight",
                                    "layers.4.bias", "layers.4.weight"]


def test_llava_layout_on_disk(tiny_llava_dir):
    cfg = json.loads((tiny_llava_dir / "config.json").read_text())
    assert cfg["model_type"] == "llava"
    assert list(tiny_llava_dir.glob("*.safetensors"))
    assert (tiny_llava_dir / "preprocessor_config.json").is_file()


def test_llava_embedding_path_matches_native_forward(tiny_llava_dir, demo_image):
    a = load_checkpoint(tiny_llava_dir, None, CPU, torch.float32)
    p = a.prepare(demo_image, "What is shown?")
    ids = p.ids_before_image + [a.image_token_id] * p.total_image_tokens + p.ids_after_image + p.suffix_ids
    with torch.no_grad():
        native = a.model(input_ids=torch.tensor([ids]), pixel_values=p.pixel_values).logits
    torch.testing.assert_close(full_logits(a, demo_image, "What is shown?"), native, rtol=0, atol=1e-6)


def _vila_flat_square(x):
    # VILA's DownSampleBlock.flat_square, verbatim in behaviour (reference for the test).
    n, w, h, c = x.size()
    if w % 2 == 1:
        x = torch.concat([x, torch.zeros((n, 1, h, c), dtype=x.dtype)], dim=1).contiguous()
        n, w, h, c = x.size()
    if h % 2 == 1:
        x = torch.concat([x, torch.zeros((n, w, 1, c), dtype=x.dtype)], dim=2).contiguous()
        n, w, h, c = x.size()
    x = x.view(n, w, int(h / 2), int(c * 2))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h / 2), int(w / 2), int(c * 4))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x


@pytest.mark.parametrize("side", [27, 6, 5])
def test_downsample_matches_vila(side):
    x = torch.randn(2, side * side, 8)
    ref = _vila_flat_square(x.reshape(2, side, side, 8)).reshape(2, -1, 32)
    torch.testing.assert_close(DownSampleBlock()(x), ref)
    assert ref.shape[1] == downsampled_tokens(side)


def test_siglip_384_gives_196_tokens():
    assert downsampled_tokens(384 // 14) == 196


def test_vila_uses_layer_minus_2_all_tokens(tiny_vila_dir, demo_image):
    a = load_checkpoint(tiny_vila_dir, None, CPU, torch.float32)
    p = a.prepare(demo_image, "q")
    px = a.pixels_to_device(p)
    with torch.no_grad():
        hs = a.model.vision_tower(px, output_hidden_states=True).hidden_states[-2]
        expected = a.model.mm_projector(hs)
        assert hs.shape[1] == 25  # 70 px / 14 = 5x5, no CLS dropped
        torch.testing.assert_close(a.encode_image(px), expected)
    assert p.image_tokens == [9]
    assert p.ids_after_image == a.tokenizer("\n", add_special_tokens=False).input_ids


@pytest.mark.parametrize("conv", sorted(TEMPLATES))
@pytest.mark.parametrize("family", ["llava", "vila"])
def test_prompt_split_for_every_template(family, conv, checkpoint_dirs, demo_image):
    a = load_checkpoint(checkpoint_dirs[family], conv, CPU, torch.float32)
    p1 = a.prepare(demo_image, "What is shown here?")
    p2 = a.prepare(demo_image, "Describe the colors.")
    # the prefix (system prompt + image) is shared, the suffix differs
    assert p1.prefix_key_ids() == p2.prefix_key_ids()
    assert p1.suffix_ids != p2.suffix_ids
    text = a.tokenizer.decode(p1.ids_before_image + p1.ids_after_image + p1.suffix_ids)
    assert "What is shown here?" in text
    if conv != "plain" and conv != "llama_3":
        assert p1.ids_before_image[0] == a.tokenizer.bos_token_id
    if conv == "llama_3":
        assert p1.ids_before_image[0] == a.tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
        assert a.tokenizer.bos_token_id not in p1.ids_before_image


def test_llava_tokenization_equals_whole_prompt(tiny_llava_dir, demo_image):
    a = load_checkpoint(tiny_llava_dir, None, CPU, torch.float32)
    p = a.prepare(demo_image, "What is shown here?")
    whole = a.tokenizer(a.template.render("<image>\nWhat is shown here?")).input_ids
    assert p.ids_before_image + [a.image_token_id] + p.ids_after_image + p.suffix_ids == whole


def test_big_presets_have_exact_dims():
    from bench.models.llava import llava_config
    from bench.models.presets import PRESETS
    from bench.models.tokenizer import build_tokenizer
    from bench.models.vila import vila_configs
    from bench.models.templates import TEMPLATE_SPECIAL_TOKENS

    p = PRESETS["llava-1.5-7b"]
    tok = build_tokenizer(p.tokenizer_base_vocab, list(p.special_tokens) + TEMPLATE_SPECIAL_TOKENS)
    cfg = llava_config(p, tok)
    t = cfg.text_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size) == (
        4096, 11008, 32, 32, 32064)
    assert cfg.image_token_index == 32000 and tok.convert_tokens_to_ids("<pad>") == 32001
    assert t.max_position_embeddings == 4096 and t.rms_norm_eps == 1e-5
    v = cfg.vision_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.image_size, v.patch_size) == (
        1024, 4096, 24, 336, 14)
    p = PRESETS["vila1.5-3b"]
    tok = build_tokenizer(p.tokenizer_base_vocab, list(p.special_tokens) + TEMPLATE_SPECIAL_TOKENS)
    llm, vis = vila_configs(p, tok)
    assert (llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers, llm.num_attention_heads,
            llm.num_key_value_heads, llm.vocab_size) == (2560, 6912, 32, 20, 20, 32000)
    assert len(tok) <= 32000
    assert (vis.hidden_size, vis.intermediate_size, vis.num_hidden_layers, vis.image_size) == (1152, 4304, 27, 384)
    llm8, _ = vila_configs(PRESETS["vila1.5-8b"], tok)
    assert (llm8.num_key_value_heads, llm8.vocab_size, llm8.rope_parameters["rope_theta"]) == (8, 128256, 500000.0)


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-vila"])
def test_several_images_go_through_the_processor_in_one_call_in_order(preset, demo_image, monkeypatch):
    """A multi-image request's images (each fitted as the family does: VILA pads) are processed in
    one call, giving the pixels processing them one by one gives, in prompt order."""
    from bench.models.visual import VisualInput

    a = build_preset(preset, None, torch.device("cpu"), torch.float32)
    images = (demo_image, demo_image.resize((200, 100)), demo_image.rotate(90, expand=True))
    one_by_one = torch.cat([a.preprocess_image(im) for im in images])
    calls = []
    processor = a.image_processor
    monkeypatch.setattr(a, "image_processor", lambda **kw: calls.append(kw) or processor(**kw))
    together = a.preprocess(VisualInput(images))
    assert len(calls) == 1 and torch.equal(together, one_by_one)
