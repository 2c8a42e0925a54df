"""Where a run's image processing happens (`--preprocess device|cpu`).

On the H200 host the CPU image processor made most of a cold request's time-to-first-token
noise (preprocess_ms 2.6-51 ms between identical requests); transformers' torchvision-backed
processors take `device=` and run on the GPU in 2-4 ms. `device` (the default) puts the
processor on the request's device when it really returns pixels there (checked once per loaded
model on the run's own image); any other processor stays on the host and the reason is
recorded. What was chosen, and how far the device's pixels are from the host's, go to env.json
(`preprocess`) and every row (`preprocess_device`).
"""
from __future__ import annotations

import torch

from bench.log import status


def place_preprocessing(adapter, choice: str, device: torch.device, visual) -> dict:
    """Set `adapter.preprocess_device` for `choice` (device | cpu) and return what was decided."""
    adapter.preprocess_device = None
    processor = type(adapter.image_processor).__name__
    if choice == "cpu":
        return {"device": "cpu", "processor": processor, "why": "--preprocess cpu"}
    if device.type == "cpu":
        return {"device": "cpu", "processor": processor, "why": "the model runs on the CPU"}
    host = adapter.preprocess(visual)
    adapter.preprocess_device = device
    try:
        pixels = adapter.preprocess(visual)
    except Exception as e:  # noqa: BLE001 - any processor that cannot take device= stays on the host
        adapter.preprocess_device = None
        why = f"{processor} cannot run on {device} ({e.__class__.__name__}: {str(e)[:160]})"
        status(f"image processing stays on the host: {why}")
        return {"device": "cpu", "processor": processor, "why": why}
    if pixels.device.type != device.type:
        adapter.preprocess_device = None
        why = f"{processor} is not torchvision-backed: it returns pixels on the host"
        status(f"image processing stays on the host: {why}")
        return {"device": "cpu", "processor": processor, "why": why}
    diff = (pixels.float().cpu() - host.float()).abs().max().item() if pixels.shape == host.shape else None
    return {"device": device.type, "processor": processor, "why": "--preprocess device",
            "max_abs_diff_vs_host": diff}
