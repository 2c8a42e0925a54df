"""Does handing the image processor a uint8 tensor already on the GPU (instead of a PIL image it
converts and copies itself) shorten `--preprocess device`? Median / p90 over 100 calls per way,
waited for as the harness waits (VLMAdapter.run_processor).

    python3 lab/gpu_preprocess_input.py --preset llava-1.5-7b
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from bench.models.presets import get_preset
from bench.models.visual import load_image
from bench.run.config import DEMO_IMAGE


def timed(fn, n=100) -> str:
    for _ in range(10):
        fn()
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        xs.append((time.perf_counter() - t0) * 1e3)
    return f"median {statistics.median(xs):.3f} ms  p90 {statistics.quantiles(xs, n=10)[-1]:.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llava-1.5-7b")
    args = ap.parse_args()
    torch.set_num_threads(1)
    preset = get_preset(args.preset)
    if preset.family == "llava":
        from bench.models.llava import llava_image_processor as make
    else:
        from bench.models.vila import siglip_image_processor as make
    p = make(preset)
    im = load_image(str(DEMO_IMAGE))
    dev = torch.device("cuda")
    print(args.preset, type(p).__name__)
    print("PIL in, device=cuda         ", timed(lambda: p(images=im, return_tensors="pt", device=dev)))
    print("uint8 cuda tensor in        ", timed(lambda: p(images=torch.from_numpy(np.asarray(im)).permute(2, 0, 1)
                                                          .to(dev), return_tensors="pt", device=dev)))
    print("host->device uint8 only     ", timed(lambda: torch.from_numpy(np.asarray(im)).permute(2, 0, 1).to(dev)))
    a = p(images=im, return_tensors="pt", device=dev)["pixel_values"]
    b = p(images=torch.from_numpy(np.asarray(im)).permute(2, 0, 1).to(dev), return_tensors="pt",
          device=dev)["pixel_values"]
    print("max abs diff", (a - b).abs().max().item())


if __name__ == "__main__":
    main()
