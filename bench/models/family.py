"""What a model family tells the loader: how to recognise its checkpoint layout, load it, build a
preset of it with random weights, and write one to disk. One `Family` per family module; the
families the harness knows are listed in bench.models.registry."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Written into checkpoints made from presets, so loading one still says weights=random.
RANDOM_WEIGHTS_MARK = "bench_random_weights"
# Tiles per still image where a family cuts images into tiles (`--max-tiles`; InternVL's processors' max_num)
DEFAULT_MAX_TILES = 12


@dataclass(frozen=True)
class Family:
    name: str
    layout: str  # the on-disk layout, as error messages name it
    default_conv_mode: str
    # (checkpoint dir, its config.json) -> whether it is this family's layout
    detect: Callable[[Path, dict], bool]
    # (dir, config, template, device, dtype, weights, quantization, strip_quant, max_tiles) -> adapter
    load: Callable[..., object]
    # (preset, tokenizer, template, device, dtype, max_tiles) -> adapter with random weights
    build: Callable[..., object]
    # (adapter, out dir) -> the checkpoint in this family's layout
    save: Callable[[object, Path, str | None], None]  # (adapter, out, max_shard_size)
    # Where the language model's own files are: "" = the top level (the -hf layouts), or a
    # sub-folder (VILA's llm/) holding its config.json and safetensors.
    llm_dir: str = ""
    # Which keys of the top-level safetensors are the language model's (AWQ checkpoints); None: all.
    llm_key: str | None = None
    # (checkpoint dir, its config.json) -> None, or a UsageError naming the file that is missing,
    # broken or does not match the config. Runs before anything loads.
    check: Callable[[Path, dict], None] | None = None
    # (checkpoint dir) -> the language model's transformers config as loading reads it (the config
    # class's defaults where config.json is silent): positions and KV-cache sizes before any load.
    text_config: Callable[[Path], object] | None = None
    # (checkpoint's config.json, None for a preset) -> the images or frames a request must show a
    # multiple of (InternVideo2.5 merges every 4 frames' tokens; 1: any number).
    visual_group: Callable[[dict | None], int] = lambda config: 1
    # The model classes config.json's "architectures" may name for this layout (empty: any).
    architectures: tuple[str, ...] = ()
    # (checkpoint's config.json, None for a preset) -> whether still images are cut into tiles (an
    # aspect-ratio grid + a thumbnail) up to `--max-tiles`; where not, a run given --max-tiles warns
    # that it changes nothing for the model (a family that tiles must say so here)
    tiles_images: Callable[[dict | None], bool] = lambda config: False

    def llm_files(self, path: Path) -> tuple[list[Path], Callable[[str], bool]]:
        """(safetensors files holding the language model, which of their keys are its)."""
        files = sorted((path / self.llm_dir).glob("*.safetensors"))
        return files, (lambda k: True) if self.llm_key is None else (lambda k: self.llm_key in k)
