"""InternVL3 (-hf layout): tiling as the real processor does, prompt layouts for one image,
several images and video frames, exact preset dimensions, and the VITA-1.5 architecture preset."""
import json

import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from bench.engines.hf import HFEngine
from bench.engines.cache_policy import CachePolicy
from bench.models.loader import build_preset, load_checkpoint
from bench.models.visual import VisualInput

from test_engine import native_ids

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny-internvl", None, CPU, torch.float32)


@pytest.mark.parametrize("size,max_tiles,tiles", [
    ((640, 480), 12, 13),  # 4x3 grid + thumbnail
    ((56, 56), 12, 1),  # one tile-sized image: 1x1 grid, no thumbnail
    ((1000, 200), 12, 6),  # 5x1 grid + thumbnail
    ((640, 480), 6, 7),  # 3x2 grid + thumbnail
    ((640, 480), 1, 1),  # tiling off
])
def test_tile_count_equals_the_processor_output(tiny, size, max_tiles, tiles):
    tiny.max_tiles = max_tiles
    try:
        image = Image.new("RGB", size, (120, 30, 200))
        p = tiny.prepare(image, "How many tiles?")
        assert p.pixel_values.shape[0] == tiles  # what GotOcr2ImageProcessor cut
        assert p.image_tokens == [tiles * tiny.tokens_per_tile]  # what the prompt says before any pixels
        assert tiny.prepare_text("How many tiles?", image).image_tokens == p.image_tokens
    finally:
        tiny.max_tiles = 12


def test_prompt_layout_matches_the_hf_processor(tiny, demo_image):
    p = tiny.prepare(demo_image, "What is shown?")
    text = tiny.tokenizer.decode(native_ids(tiny, p)).replace(" ", "")
    n = p.image_tokens[0]
    assert text.startswith("<|im_start|>system")
    assert ("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * n + "</img>\nWhatisshown?<|im_end|>\n"
            "<|im_start|>assistant\n").replace(" ", "") in text
    assert tiny.tokenizer.bos_token_id is None and p.text_segments[0][0] == tiny.tokenizer.convert_tokens_to_ids(
        "<|im_start|>")


def test_video_frames_and_several_images(tiny, demo_image):
    frames = [demo_image.rotate(a) for a in (0, 90, 180)]
    video = tiny.prepare(VisualInput(tuple(frames), video=True), "What happens?")
    assert video.image_tokens == [tiny.tokens_per_tile] * 3  # frames are never tiled
    assert video.pixel_values.shape[0] == 3
    text = tiny.tokenizer.decode(native_ids(tiny, video)).replace(" ", "")
    assert "Frame1:<img>" in text and "</img>\nFrame2:<img>" in text and "Frame3:" in text
    images = tiny.prepare(frames[:2], "Compare them.")
    assert images.image_tokens == [13 * tiny.tokens_per_tile] * 2  # still images are tiled
    text = tiny.tokenizer.decode(native_ids(tiny, images)).replace(" ", "")
    assert "Image-1:<img>" in text and "Image-2:<img>" in text


def test_a_requests_images_go_through_the_processor_in_one_call_in_order(tiny, demo_image, monkeypatch):
    """Frames (and several tiled images of different sizes) are processed in one call, giving
    each image's tiles in prompt order, exactly as processing them one by one does."""
    small = demo_image.resize((200, 100))
    for visual in (VisualInput(tuple(demo_image.rotate(a) for a in (0, 90, 180, 270)), video=True),
                   VisualInput((demo_image, small, demo_image.rotate(180)))):
        one_by_one = torch.cat([tiny.preprocess_image(im, visual.video) for im in visual.images])
        calls = []
        processor = tiny.image_processor
        monkeypatch.setattr(tiny, "image_processor", lambda **kw: calls.append(kw) or processor(**kw))
        together = tiny.preprocess(visual)
        monkeypatch.undo()
        assert len(calls) == 1 and torch.equal(together, one_by_one)


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_several_images_match_the_native_forward(family, checkpoint_dirs, demo_image):
    """Image embeddings land at their own placeholders: the native class on ids + pixels of two
    images gives our embedding path's logits."""
    a = load_checkpoint(checkpoint_dirs[family], None, CPU, torch.float32)
    images = [demo_image, demo_image.transpose(Image.FLIP_LEFT_RIGHT)]
    p = a.prepare(images, "Which differs?")
    with torch.no_grad():
        native = a.model(input_ids=torch.tensor([native_ids(a, p)]), pixel_values=p.pixel_values).logits[0]
        ours = a.lm_forward(a.prompt_embeds(p, a.encode_image(p.pixel_values)), DynamicCache(), logits_to_keep=0)[0]
    torch.testing.assert_close(ours, native, rtol=1e-5, atol=1e-5)
    # swapping the images changes the answer's logits (each image went to its own slots)
    q = a.prepare(images[::-1], "Which differs?")
    with torch.no_grad():
        swapped = a.lm_forward(a.prompt_embeds(q, a.encode_image(q.pixel_values)), DynamicCache())[0, -1]
    assert not torch.allclose(swapped, ours[-1])


def test_checkpoint_layout_on_disk(tiny_internvl_dir):
    cfg = json.loads((tiny_internvl_dir / "config.json").read_text())
    assert cfg["model_type"] == "internvl" and cfg["text_config"]["model_type"] == "qwen2"
    assert cfg["vision_config"]["model_type"] == "internvl_vision"
    assert list(tiny_internvl_dir.glob("*.safetensors"))
    pre = json.loads((tiny_internvl_dir / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"].startswith("GotOcr2ImageProcessor")
    a = load_checkpoint(tiny_internvl_dir, None, CPU, torch.float32)
    assert a.family == "internvl" and a.template.name == "internvl2_5"


def test_static_engine_with_prefix_on_video(checkpoint_dirs, demo_image):
    from bench.engines.static import StaticEngine
    from variants.prefix import PrefixKVPolicy

    a = load_checkpoint(checkpoint_dirs["internvl"], None, CPU, torch.float32)
    clip = VisualInput(tuple(demo_image.rotate(a) for a in (0, 30, 60, 90)), video=True)
    want = HFEngine(a, CachePolicy()).run(clip, "What moves?", 12).tokens
    engine = StaticEngine(a, PrefixKVPolicy(64))
    engine.run(clip, "A warm-up question.", 2)
    r = engine.run(clip, "What moves?", 12)
    assert r.cache_hit and r.cached_tokens == r.prefix_tokens and r.tokens == want
    other = VisualInput(clip.images[::-1], video=True)  # same frames, other order: another prefix
    assert not engine.run(other, "What moves?", 2).cache_hit


def test_big_presets_have_exact_dims():
    from bench.models.internvl import internvl_config
    from bench.models.presets import PRESETS
    from bench.models.tokenizer import build_tokenizer

    p = PRESETS["internvl3-8b"]
    tok = build_tokenizer(p.tokenizer_base_vocab, list(p.special_tokens), qwen=True)
    assert len(tok) == p.llm.vocab == 151674
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == 151667
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    cfg = internvl_config(p, tok)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.vocab_size) == (3584, 18944, 28, 28, 4, 151674)
    assert t.rope_parameters["rope_theta"] == 1e6 and not t.tie_word_embeddings
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1024, 4096, 24, 16)
    assert cfg.image_token_id == 151667 and cfg.downsample_ratio == 0.5 and cfg.image_seq_length == 256
    with torch.device("meta"):
        from transformers import InternVLForConditionalGeneration

        m = InternVLForConditionalGeneration._from_config(cfg)
    proj = m.model.multi_modal_projector
    assert (proj.layer_norm.normalized_shape, proj.linear_1.in_features, proj.linear_1.out_features) == (
        (4096,), 4096, 3584)
    assert PRESETS["internvl3-2b"].llm.tie_embeddings and PRESETS["internvl3-2b"].llm.hidden == 1536


def test_vita_preset_is_internvl_shaped_without_the_projector_norm():
    a = build_preset("vita1.5", None, torch.device("meta"), torch.float16)
    proj = a.model.model.multi_modal_projector
    assert isinstance(proj.layer_norm, torch.nn.Identity)
    assert (proj.linear_1.in_features, proj.linear_1.out_features, proj.linear_2.out_features) == (4096, 3584, 3584)
    assert a.text_config().vocab_size == 152064 and a.template.name == "qwen2p5_instruct"
    assert a.weights == "random"
