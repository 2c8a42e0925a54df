"""Where the model comes from: a checkpoint directory or a preset. Loads it on demand."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bench.models.base import VLMAdapter
from bench.models.family import DEFAULT_MAX_TILES
from bench.models.loader import (
    RANDOM_WEIGHTS_MARK, awq_quantization, build_preset, load_checkpoint, read_checkpoint_config,
)
from bench.models.presets import get_preset


@dataclass
class ModelSource:
    model_path: str | None
    preset: str | None
    conv_mode: str | None
    seed: int = 0
    max_tiles: int = DEFAULT_MAX_TILES  # tiles per still image (grid + thumbnail) where the family tiles

    def __post_init__(self):
        # Validate eagerly so a bad path/preset is a usage error before any work starts.
        if self.model_path:
            self.family, config = read_checkpoint_config(Path(self.model_path))
            self.config: dict | None = config
            self.weights = "random" if config.get(RANDOM_WEIGHTS_MARK) else "checkpoint"
            self.name = Path(self.model_path).resolve().name
            self.prequantized = awq_quantization(Path(self.model_path), self.family, config)
        else:
            p = get_preset(self.preset)
            self.family, self.weights, self.name = p.family, "random", p.name
            self.config = None
            self.prequantized = None

    def max_tiles_warning(self) -> str | None:
        """A one-line warning where --max-tiles is set (to other than its default) for a family that
        does not cut still images into tiles, so the flag changes nothing; else None."""
        from bench.models.registry import families

        family = families().get(self.family)
        if self.max_tiles == DEFAULT_MAX_TILES or family is None or family.tiles_images(self.config):
            return None
        return (f"warning: --max-tiles {self.max_tiles} changes nothing for the model {self.name}: it takes each "
                "image whole")

    def load(self, device: torch.device, dtype: torch.dtype, quantization: tuple | None = None) -> VLMAdapter:
        """`quantization` = (transformers quantization config, include vision): applied while a
        checkpoint loads. Presets ignore it (weight variants quantize them after building)."""
        if self.model_path:
            return load_checkpoint(Path(self.model_path), self.conv_mode, device, dtype, quantization,
                                   max_tiles=self.max_tiles)
        return build_preset(self.preset, self.conv_mode, device, dtype, seed=self.seed, max_tiles=self.max_tiles)
