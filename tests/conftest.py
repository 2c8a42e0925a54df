import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.quiet import quiet_libraries  # noqa: E402

quiet_libraries()
torch.set_num_threads(2)

DEMO = ROOT / "bench" / "assets" / "demo.png"


@pytest.fixture(scope="session")
def frames(tmp_path_factory):
    """A folder of 12 small video frames (frame_000.png ...), for --frames-dir."""
    from PIL import Image

    d = tmp_path_factory.mktemp("frames")
    for i in range(12):
        Image.new("RGB", (64, 48), (20 * i, 90, 200 - 10 * i)).save(d / f"frame_{i:03d}.png")
    return d


@pytest.fixture(scope="session")
def demo_image():
    from PIL import Image

    return Image.open(DEMO).convert("RGB")


def _write(preset: str, tmp_path_factory) -> Path:
    from bench.models.loader import build_preset, save_checkpoint

    out = tmp_path_factory.mktemp(preset) / preset
    adapter = build_preset(preset, None, torch.device("cpu"), torch.float32, seed=0)
    save_checkpoint(adapter, out)
    return out


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    return _write("tiny-llava", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_vila_dir(tmp_path_factory):
    return _write("tiny-vila", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_internvl_dir(tmp_path_factory):
    return _write("tiny-internvl", tmp_path_factory)


@pytest.fixture(scope="session")
def checkpoint_dirs(tiny_llava_dir, tiny_vila_dir, tiny_internvl_dir):
    return {"llava": tiny_llava_dir, "vila": tiny_vila_dir, "internvl": tiny_internvl_dir}
