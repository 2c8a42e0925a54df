"""What one request shows the model: one image, several images, or the sampled frames of a video.

Adapters turn it into image placeholders in the prompt (one per image; InternVL labels frames
"Frame1: ", "Frame2: " and tiles still images, never frames) and into pixels.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from PIL import Image, ImageOps, UnidentifiedImageError

from bench.errors import UsageError, path_problem


@dataclass(eq=False)
class VisualInput:
    images: tuple[Image.Image, ...]
    video: bool = False  # the images are frames of one clip (no tiling, "Frame{i}: " labels)
    # The adapter's processor output when a loader already made it (bench.run.media.FrameLoader runs
    # the processor ahead, off the GPU's path); None: the engine runs the processor.
    pixel_values: torch.Tensor | None = None
    # The images' files as the request carried them (e.g. --image-path's bytes, --frames-dir's
    # frame files), when known.
    encoded: tuple[bytes, ...] | None = None
    # The video file the frames were sampled from (uniformly, len(images) of them), as the request
    # carried it (--video-path's bytes, a served video_url's upload), when known.
    container: bytes | None = None

    def __post_init__(self):
        if not self.images:
            raise ValueError("a request needs at least one image")
        if self.encoded is not None and len(self.encoded) != len(self.images):
            raise ValueError(f"{len(self.encoded)} encoded files for {len(self.images)} images")
        if self.container is not None and (not self.video or self.encoded is not None):
            raise ValueError("a video file is the source of a clip's frames, not of images or frame files")

    def __len__(self) -> int:
        return len(self.images)

    def content_digest(self) -> str:
        """128-bit XXH3 of the request's images: the video file its frames were sampled from (and
        how many), or their encoded files, where the request carried them; else every image's
        mode, size and pixels (content, never a path).

        On the prefix-hit path (every warm request hashes its images), so a non-cryptographic
        hash: SHA-256 of a 640x480 image took 0.7-2 ms on the CPU machine (and 1.3 ms of a 26 ms
        warm TTFT on the H200 host); XXH3 runs at memory speed. Hashing the file a request
        carries, as a server can before decoding it, also skips copying the decoded pixels out
        of PIL (`tobytes`: 0.2 ms for 640x480 here, most of a warm lookup's 0.7 ms on the H200
        host; an 80-frame clip's pixels took most of a warm TTFT on an H100:
        results/reference/h100/internvideo2.5-8b-fp16-prefix-awq4-graph-clip80, lookup_ms). The
        same pixels in two different files are two keys (a miss, never a wrong hit)."""
        if self.container is not None:
            h = xxhash.xxh3_128(b"video-container")
            h.update(len(self.images).to_bytes(8, "little"))  # the frames sampled: their count decides which
            h.update(self.container)
            return h.hexdigest()
        if self.encoded is not None:
            h = xxhash.xxh3_128(b"video-files" if self.video else b"image-files")
            for data in self.encoded:
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
            return h.hexdigest()
        h = xxhash.xxh3_128(b"video" if self.video else b"images")
        for image in self.images:
            h.update(f"{image.mode}:{image.size}".encode())
            h.update(image.tobytes())
        return h.hexdigest()


def png_bytes(image: Image.Image) -> bytes:
    """`image` as a PNG file: how a request carries an image made rather than read from a file
    (endpoint mode's data: URLs; the derived images of a multi-image prompt)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def as_visual(visual) -> VisualInput:
    """Accept a VisualInput, one PIL image, or a list of them (several images in one prompt)."""
    if isinstance(visual, VisualInput):
        return visual
    if isinstance(visual, Image.Image):
        return VisualInput((visual,))
    return VisualInput(tuple(visual))


def group_refusal(model: str, group: int, shown: int) -> str:
    """Why `shown` images or frames per request cannot go to a model that merges the visual tokens
    of every `group` of them (InternVideo2.5), and what to give instead."""
    return (f"{model} merges the visual tokens of every {group} frames: give a multiple of {group} frames or "
            f"images per request, not {shown} (image input: --num-images {group}; video: --video-mode clip with "
            f"--num-frames a multiple of {group}, since --video-mode frames shows one frame per request)")


BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)  # PIL: past its pixel limit (twice it: an error)


def bomb_pixels(e: BaseException) -> str:
    """The pixel count a decompression-bomb error or warning of PIL's states, as " (N pixels)" ('' if
    it states none): the one limit a message names is Image.MAX_IMAGE_PIXELS, not PIL's own wording
    of its warning and error thresholds."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    return f" ({int(found[1]):,} pixels)" if found else ""


def _image_error(e: BaseException) -> str:
    """What is wrong with an image file, in words (a decompression bomb: its pixel count)."""
    if isinstance(e, BOMB):
        return (f"too large to decode safely{bomb_pixels(e)}; give a smaller image (at most "
                f"{Image.MAX_IMAGE_PIXELS:,} pixels)")
    return f"not a readable image ({e.__class__.__name__})"


def check_frame_size(width: int, height: int, flag: str, path: str | Path) -> None:
    """A usage error when frames of width x height pixels (a video's, known before any is
    decoded) are past the limit image files are held to (PIL's decompression-bomb limit,
    Image.MAX_IMAGE_PIXELS; its warning range counts, as for images)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise UsageError(f"{flag} {path}: frames of {width}x{height} = {width * height:,} pixels are too large to "
                         f"decode safely; give a video of at most {limit:,} pixels per frame")


def _bad_image_errors() -> tuple[type[BaseException], ...]:
    return (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning)


def _opened(path: str | Path, flag: str, use):
    """use(the opened image) for an image file; a usage error naming `flag` and the file when it is
    missing, unreadable, or past PIL's decompression-bomb limit (its warning counts as one)."""
    p = Path(path)
    problem = path_problem(p)
    if problem:
        raise UsageError(f"{flag} {path}: {problem}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                return use(im)
    except _bad_image_errors() as e:
        raise UsageError(f"{flag} {path}: {_image_error(e)}") from None


def check_image_file(path: str | Path, flag: str) -> tuple[int, int]:
    """Open and verify an image file without decoding all its pixels (header, size against
    PIL's decompression-bomb limit, and the format's own integrity check); its (width, height)."""
    def verified(im):
        im.verify()
        return im.size

    return _opened(path, flag, verified)


def upright_rgb(im: Image.Image) -> Image.Image:
    """An opened image as RGB pixels the way it is shown: turned by its EXIF orientation (a phone
    photo stored sideways), as transformers' load_image does."""
    return ImageOps.exif_transpose(im).convert("RGB")


def load_image(path: str | Path, flag: str = "--image-path") -> Image.Image:
    """An image file as upright RGB (a usage error naming `flag` when it cannot be, as _opened)."""
    return _opened(path, flag, upright_rgb)
