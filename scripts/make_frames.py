"""Write N synthetic video frames (a slow pan and zoom over the demo image, 640x480 JPEG) to a
folder, for --frames-dir runs on machines without PyAV or a video file.

usage: python scripts/make_frames.py OUT_DIR [N]
"""
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out, n = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 64
    out.mkdir(parents=True, exist_ok=True)
    src = Image.open(ROOT / "bench" / "assets" / "demo.png").convert("RGB").resize((960, 720))
    for i in range(n):
        t = i / max(1, n - 1)
        w, h = int(640 + 160 * t), int(480 + 120 * t)  # zoom out while panning right
        x, y = int((960 - w) * t), int((720 - h) * (1 - t))
        src.crop((x, y, x + w, y + h)).resize((640, 480)).save(out / f"frame_{i:04d}.jpg", quality=90)
    print(f"wrote {n} frames to {out}")


if __name__ == "__main__":
    main()
