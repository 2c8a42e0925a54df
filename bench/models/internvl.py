"""InternVL3 in the "-hf" layout, on transformers' InternVLForConditionalGeneration.

Per image the prompt holds `<img>` + 256 `<IMG_CONTEXT>` embeddings per 448-px tile + `</img>`.
Still images are tiled as the real processor does (GotOcr2ImageProcessor, crop_to_patches):
the aspect ratio picks a grid of up to --max-tiles tiles, plus a thumbnail tile when the grid
has more than one; so the prompt length depends on the image's size (not its pixels), and
`prepare_text` needs the images. Video frames are one tile each, labelled "Frame{i}: " as the
-hf processor writes them; several still images are labelled "Image-{i}: " as InternVL's chat
does.

VITA-1.5 (Qwen2.5-7B + InternViT-300M + mlp2x_gelu, bench.models.vita) runs on the same
classes with the projector's LayerNorm removed; see `vita_projector`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import InternVLConfig, InternVLForConditionalGeneration

from bench.models.base import PreparedPrompt, prepare_by_placeholders
from bench.models.family import DEFAULT_MAX_TILES, RANDOM_WEIGHTS_MARK, Family
from bench.models.native import NativeVLMAdapter, load_native, native_checker, native_text_config, save_native
from bench.models.templates import ConvTemplate
from bench.models.visual import as_visual

START_IMAGE, END_IMAGE, IMAGE_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class InternVLAdapter(NativeVLMAdapter):
    family = "internvl"

    def __init__(self, model: InternVLForConditionalGeneration, tokenizer, image_processor, template: ConvTemplate,
                 weights: str, name: str, max_tiles: int = DEFAULT_MAX_TILES):
        super().__init__(template)
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.weights, self.name, self.max_tiles = weights, name, max_tiles
        cfg = model.config
        self.image_token_id = cfg.image_token_id
        self.feature_layer = cfg.vision_feature_layer
        self.select_strategy = cfg.vision_feature_select_strategy
        self.downsample = cfg.downsample_ratio
        v = cfg.vision_config
        size, patch = _pair(v.image_size), _pair(v.patch_size)
        self.tile_size = size
        self.tokens_per_tile = int((size[0] // patch[0]) * (size[1] // patch[1]) * self.downsample ** 2)

    # CPU ---------------------------------------------------------------------------------
    def tiles(self, image: Image.Image | None, video: bool = False) -> int:
        """Tiles the processor cuts this image into (a grid, plus a thumbnail when the grid has
        more than one tile); a video frame is one tile."""
        if image is None or video or self.max_tiles <= 1:
            return 1
        w, h = image.size
        return self.image_processor.get_number_of_image_patches(
            h, w, {"crop_to_patches": True, "max_patches": self.max_tiles, "min_patches": 1})

    @staticmethod
    def images_of(visual) -> tuple[list, bool]:
        """The request's images (one of no particular size for None: the prompt layout alone) and
        whether they are a video's frames."""
        if visual is None:
            return [None], False
        v = as_visual(visual)
        return list(v.images), v.video

    def prepare_text(self, question: str, visual=None) -> PreparedPrompt:
        images, video = self.images_of(visual)
        one = START_IMAGE + IMAGE_CONTEXT + END_IMAGE
        if video:
            block = "\n".join(f"Frame{i + 1}: {one}" for i in range(len(images))) + "\n"
        elif len(images) > 1:
            block = "".join(f"Image-{i + 1}: {one}\n" for i in range(len(images)))
        else:
            block = one + "\n"
        counts = [self.tiles(im, video) * self.tokens_per_tile for im in images]
        return prepare_by_placeholders(self, question, block, IMAGE_CONTEXT, self.image_token_id, counts)

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self._encode(text)  # Qwen2: no BOS

    def _tiled(self, images, video: bool) -> torch.Tensor:
        """The processor's tiles of `images` (one image or a list): still images tiled, frames not."""
        tiled = not video and self.max_tiles > 1
        return self.run_processor(images, crop_to_patches=tiled, max_patches=self.max_tiles, min_patches=1)

    def preprocess_image(self, image: Image.Image, video: bool = False) -> torch.Tensor:
        return self._tiled(image, video)

    def preprocess(self, visual) -> torch.Tensor:
        """Every image's tiles (a frame: one tile), in order, from one call of the processor: a
        fast (device) processor resizes and normalizes images of one size as one batch, one
        wait for the device instead of one per frame (an 80-frame clip: 80 calls)."""
        v = as_visual(visual)
        return self._tiled(list(v.images), v.video)

    # device ------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # InternVLModel.get_image_features, written against the module attributes because that
        # method's return type changed across transformers 5.x.
        m = self.model.model
        want_hidden = self.feature_layer != -1
        out = m.vision_tower(pixel_values=pixel_values, output_hidden_states=want_hidden, return_dict=True)
        feats = out.last_hidden_state if not want_hidden else out.hidden_states[self.feature_layer]
        if self.select_strategy == "default":
            feats = feats[:, 1:]  # CLS
        tiles, n, c = feats.shape
        side = int(n ** 0.5)
        feats = m.pixel_shuffle(feats.reshape(tiles, side, side, c), scale_factor=self.downsample)
        feats = m.multi_modal_projector(feats.reshape(tiles, -1, feats.shape[-1])).to(self.dtype)
        return feats.reshape(1, -1, feats.shape[-1])  # tiles of every image, in order


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def is_internvl_dir(path: Path, config: dict) -> bool:
    return config.get("model_type") == "internvl"


def load_internvl(path: Path, template: ConvTemplate, device: torch.device, dtype: torch.dtype, weights: str,
                  quantization: tuple | None = None, strip_quant: bool = False,
                  max_tiles: int = DEFAULT_MAX_TILES) -> InternVLAdapter:
    model, config, tokenizer, image_processor = load_native(
        InternVLForConditionalGeneration, InternVLConfig, path, device, dtype, quantization, strip_quant)
    if config.__dict__.get(VITA_MARK):
        vita_projector(model)
    adapter = InternVLAdapter(model, tokenizer, image_processor, template, weights, path.name, max_tiles)
    adapter.identity = str(path.resolve())
    return adapter


# ------------------------------------------------------------------------------------------ presets
VITA_MARK = "bench_vita_projector"  # written into config.json of VITA-shaped checkpoints made here


def internvl_config(preset, tokenizer) -> InternVLConfig:
    llm, vis = preset.llm, preset.vision
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=vis.hidden, intermediate_size=vis.mlp, num_hidden_layers=vis.layers,
            num_attention_heads=vis.heads, image_size=[vis.image_size] * 2, patch_size=[vis.patch] * 2,
            attention_bias=True, use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6,
            hidden_act="gelu", layer_scale_init_value=0.1, use_mean_pooling=True,
            use_absolute_position_embeddings=True,
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=llm.hidden, intermediate_size=llm.mlp,
            num_hidden_layers=llm.layers, num_attention_heads=llm.heads, num_key_value_heads=llm.kv_heads,
            vocab_size=llm.vocab, max_position_embeddings=llm.max_pos, rms_norm_eps=llm.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
            tie_word_embeddings=llm.tie_embeddings, use_sliding_window=False,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT),
        image_seq_length=int((vis.image_size // vis.patch) ** 2 * 0.25),
        downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=llm.tie_embeddings,
    )
    if preset.projector == "mlp2x_gelu":
        config.__dict__[VITA_MARK] = True
    return config


def vita_projector(model: InternVLForConditionalGeneration) -> None:
    """VITA-1.5's mlp2x_gelu: Linear(4096 -> H), GELU, Linear(H -> H) on the pixel-shuffled
    InternViT features; InternVL's projector is the same plus a LayerNorm in front."""
    model.model.multi_modal_projector.layer_norm = nn.Identity()


def internvl_image_processor(size: int, max_tiles: int = DEFAULT_MAX_TILES):
    """InternVL's processor for `size` x `size` tiles (a preset's vision.image_size, or a
    checkpoint's vision config)."""
    from transformers import GotOcr2ImageProcessor

    return GotOcr2ImageProcessor(
        size={"height": size, "width": size}, crop_to_patches=True, min_patches=1, max_patches=max_tiles,
        resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True,
    )


def build_internvl_model(preset, tokenizer, device, dtype) -> InternVLForConditionalGeneration:
    config = internvl_config(preset, tokenizer)
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    if config.__dict__.get(VITA_MARK):
        vita_projector(model)
    return model


def build_internvl(preset, tokenizer, template: ConvTemplate, device, dtype, max_tiles: int) -> InternVLAdapter:
    model = build_internvl_model(preset, tokenizer, device, dtype)
    model.config.__dict__[RANDOM_WEIGHTS_MARK] = True
    processor = internvl_image_processor(preset.vision.image_size, max_tiles)
    return InternVLAdapter(model, tokenizer, processor, template, "random", preset.name, max_tiles)


FAMILY = Family(
    name="internvl", layout="InternVL -hf layout", default_conv_mode="internvl2_5", detect=is_internvl_dir,
    load=lambda path, config, template, device, dtype, weights, quantization, strip_quant, max_tiles: load_internvl(
        path, template, device, dtype, weights, quantization, strip_quant, max_tiles),
    build=build_internvl, save=save_native, llm_key="language_model.", 
    check=native_checker(InternVLForConditionalGeneration, InternVLConfig, IMAGE_CONTEXT,
                         adjust=lambda model, config: config.__dict__.get(VITA_MARK) and vita_projector(model)),
    text_config=native_text_config(InternVLConfig), architectures=("InternVLForConditionalGeneration",),
    tiles_images=lambda config: True,
)
