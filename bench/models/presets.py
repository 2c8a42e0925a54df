"""Architecture presets: exact real dimensions (MODELS.md) with random weights, plus tiny ones for tests.

A preset only describes shapes; `bench.models.loader.build_preset` turns it into a model on the target
device without first materialising it on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bench.errors import UsageError


@dataclass(frozen=True)
class LLMDims:
    hidden: int
    mlp: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_pos: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False


@dataclass(frozen=True)
class VisionDims:
    hidden: int
    mlp: int
    layers: int
    heads: int
    image_size: int
    patch: int = 14


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "llava" | "vila" | "internvl" | "internvideo" | "vita"
    llm: LLMDims
    vision: VisionDims
    conv_mode: str
    tokenizer_base_vocab: int  # pieces before the special tokens (LLaVA: <image> lands at this id)
    special_tokens: tuple[str, ...] = field(default=())
    qwen_tokenizer: bool = False  # no BOS; the special tokens are the model's whole special set
    projector: str = ""  # internvl family: "" (InternVL: LayerNorm + MLP) or "mlp2x_gelu" (VITA-1.5)
    note: str = ""  # how the preset relates to the real model (printed with --list-presets)
    template_tokens: bool = True  # add the chat templates' markers to the tokenizer (False: `special_tokens` has them)
    frame_tokens: int = 0  # internvideo family: visual tokens per frame after token merging (0: the model's 16)


CLIP_L_336 = VisionDims(hidden=1024, mlp=4096, layers=24, heads=16, image_size=336)
SIGLIP_SO400M_384 = VisionDims(hidden=1152, mlp=4304, layers=27, heads=16, image_size=384)
INTERNVIT_300M_448 = VisionDims(hidden=1024, mlp=4096, layers=24, heads=16, image_size=448)

# Qwen2.5's special tokens (151643..151664), then InternVL's (151665..151673): <IMG_CONTEXT> = 151667.
QWEN2_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
INTERNVL_SPECIAL = QWEN2_SPECIAL + ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                                    "<box>", "</box>")
QWEN2_BASE_VOCAB = 151643

# InternLM2's special tokens (92538..92543), then InternVL's (92544..92552): <IMG_CONTEXT> = 92546.
INTERNLM2_SPECIAL = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
                     "<|im_start|>") + INTERNVL_SPECIAL[len(QWEN2_SPECIAL):]
INTERNLM2_BASE_VOCAB = 92538


def _qwen(hidden, mlp, layers, heads, kv, vocab=151674, tie=False) -> LLMDims:
    return LLMDims(hidden, mlp, layers, heads, kv, vocab, max_pos=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                   tie_embeddings=tie)

_LLAVA_SPECIAL = ("<image>", "<pad>")

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("llava-1.5-7b", "llava", LLMDims(4096, 11008, 32, 32, 32, 32064), CLIP_L_336, "vicuna_v1",
               32000, _LLAVA_SPECIAL),
        Preset("llava-1.5-13b", "llava", LLMDims(5120, 13824, 40, 40, 40, 32064), CLIP_L_336, "vicuna_v1",
               32000, _LLAVA_SPECIAL),
        Preset("vila1.5-3b", "vila", LLMDims(2560, 6912, 32, 20, 20, 32000), SIGLIP_SO400M_384, "vicuna_v1",
               31990, ("<pad>",)),
        Preset("vila1.5-8b", "vila",
               LLMDims(4096, 14336, 32, 32, 8, 128256, max_pos=8192, rope_theta=500000.0),
               SIGLIP_SO400M_384, "llama_3", 128000, ("<pad>",)),
        Preset("vila1.5-13b", "vila", LLMDims(5120, 13824, 40, 40, 40, 32000), SIGLIP_SO400M_384, "vicuna_v1",
               31990, ("<pad>",)),
        # InternVL3-8B: MODELS.md. InternVL3-2B: InternViT-300M + Qwen2.5-1.5B (1536/8960/28/12/2,
        # tied embeddings, per Qwen2.5-1.5B's published config; MODELS.md lists only the 8B).
        Preset("internvl3-2b", "internvl", _qwen(1536, 8960, 28, 12, 2, tie=True), INTERNVIT_300M_448,
               "internvl2_5", QWEN2_BASE_VOCAB, INTERNVL_SPECIAL, qwen_tokenizer=True),
        Preset("internvl3-8b", "internvl", _qwen(3584, 18944, 28, 28, 4), INTERNVIT_300M_448,
               "internvl2_5", QWEN2_BASE_VOCAB, INTERNVL_SPECIAL, qwen_tokenizer=True),
        Preset("vita1.5", "vita", _qwen(3584, 18944, 28, 28, 4, vocab=152064), INTERNVIT_300M_448,
               "qwen2p5_instruct", QWEN2_BASE_VOCAB, INTERNVL_SPECIAL, qwen_tokenizer=True, projector="mlp2x_gelu",
               note="architecture preset: VITA-1.5's Qwen2.5-7B + InternViT-300M + mlp2x_gelu (no audio encoder), "
                    "one <image> per tile or frame as its demo; make-checkpoint writes VITA's layout"),
        # InternVideo2.5-Chat-8B: InternLM2.5-7B (4096/14336/32/8 kv, vocab 92553, rope 1e6 with dynamic
        # scaling x2) + InternViT-300M; 16 merged tokens per frame (clip mode, frames in groups of 4).
        Preset("internvideo2.5-8b", "internvideo",
               LLMDims(4096, 14336, 32, 32, 8, 92553, max_pos=32768, rope_theta=1e6, rms_norm_eps=1e-5),
               INTERNVIT_300M_448, "internvl2_5", INTERNLM2_BASE_VOCAB, INTERNLM2_SPECIAL, template_tokens=False,
               note="InternVideo2.5-Chat-8B geometry: 16 visual tokens per frame (token merging over groups of "
                    "4 frames), clips of 4..80 frames"),
        # Tiny presets for tests: same code paths, seconds on a laptop CPU.
        # tiny-llava: 56 px / patch 14 -> 16 patches (+CLS dropped) = 16 image tokens.
        Preset("tiny-llava", "llava", LLMDims(64, 128, 2, 4, 2, 640), VisionDims(32, 64, 2, 2, 56),
               "vicuna_v1", 600, _LLAVA_SPECIAL),
        # tiny-vila: 70 px / patch 14 -> 5x5 patches, padded to 6x6 -> 9 image tokens (odd side path).
        Preset("tiny-vila", "vila", LLMDims(64, 128, 2, 4, 2, 640), VisionDims(32, 64, 3, 2, 70),
               "vicuna_v1", 600, ("<pad>",)),
        # tiny-internvl: 56 px tiles / patch 14 -> 4x4 patches, pixel-shuffled to 2x2 = 4 tokens per tile.
        Preset("tiny-internvl", "internvl", LLMDims(64, 128, 2, 4, 2, 640, rope_theta=1e6, rms_norm_eps=1e-6),
               VisionDims(32, 64, 2, 2, 56), "internvl2_5", 600, INTERNVL_SPECIAL, qwen_tokenizer=True),
        # tiny-internvideo: 56 px frames -> 4 tokens each, merged to 1 per frame (16 -> 8 -> 4 per group of 4).
        Preset("tiny-internvideo", "internvideo", LLMDims(64, 128, 2, 4, 2, 640, rope_theta=1e6),
               VisionDims(32, 64, 2, 2, 56), "internvl2_5", 600, INTERNLM2_SPECIAL, template_tokens=False,
               frame_tokens=1),
        # tiny-vita: 56 px tiles -> 4 tokens each; InternViT head width 64 as VITA's (1 head of 64).
        Preset("tiny-vita", "vita", LLMDims(64, 128, 2, 4, 2, 640, rope_theta=1e6, rms_norm_eps=1e-6),
               VisionDims(64, 128, 2, 1, 56), "qwen2p5_instruct", 600, QWEN2_SPECIAL, qwen_tokenizer=True),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(f"unknown --preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
