"""Time transformers' own `generate` on a preset, to compare with the hf engine's loop.

The hf engine runs the same forward passes as greedy `generate` but without its per-step
logits processors, stopping criteria and host syncs. This measures `generate` itself
(prefill = generate with 1 new token; decode/token = (t(N) - t(1)) / (N - 1)), CUDA-synchronised
wall clock, median of --runs, and appends rows to --out (CSV).

    python lab/hf_generate_calibration.py --preset llava-1.5-7b --out hf_generate_calibration.csv
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quiet import quiet_libraries  # noqa: E402
from bench.run.config import DEMO_IMAGE  # noqa: E402
from bench.models.loader import build_preset  # noqa: E402
from bench.measure.results import CsvWriter, utc_now  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    quiet_libraries()
    from PIL import Image

    device = torch.device("cuda")
    adapter = build_preset(args.preset, None, device, torch.float16)
    if adapter.family != "llava":
        raise SystemExit("generate calibration uses LlavaForConditionalGeneration: pick a llava preset")
    p = adapter.prepare(Image.open(DEMO_IMAGE).convert("RGB"), "What is shown in this image?")
    ids = p.ids_before_image + [adapter.image_token_id] * p.image_tokens + p.ids_after_image + p.suffix_ids
    inputs = dict(input_ids=torch.tensor([ids], device=device),
                  pixel_values=p.pixel_values.to(device, torch.float16))

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            adapter.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    for _ in range(3):
        timed(args.new_tokens)
    one = statistics.median(timed(1) for _ in range(args.runs))
    full = statistics.median(timed(args.new_tokens) for _ in range(args.runs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["timestamp", "model", "weights", "engine", "prompt_tokens", "new_tokens", "runs",
            "generate_1_token_ms", "generate_n_tokens_ms", "decode_ms_per_token", "torch", "transformers"]
    import transformers

    w = CsvWriter(out, cols)
    w.write({"timestamp": utc_now(), "model": args.preset, "weights": "random", "engine": "transformers.generate",
             "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "runs": args.runs,
             "generate_1_token_ms": one, "generate_n_tokens_ms": full,
             "decode_ms_per_token": (full - one) / (args.new_tokens - 1),
             "torch": torch.__version__, "transformers": transformers.__version__})
    w.close()
    print(f"{args.preset}: generate(1) {one:.1f} ms, generate({args.new_tokens}) {full:.1f} ms, "
          f"decode {(full - one) / (args.new_tokens - 1):.2f} ms/token (prompt {len(ids)} tokens)")


if __name__ == "__main__":
    main()
