"""The workload axes one command sweeps (their cross product), and where each run's requests
come from: the image (or several of them), a video clip, or a video's frames one by one."""
from __future__ import annotations

import bisect
import itertools
from dataclasses import asdict, dataclass

from PIL import Image, ImageOps

from bench.errors import UsageError
from bench.measure.schema import WORKLOAD_KEYS, point_label
from bench.models.visual import VisualInput, png_bytes

VIDEO_MODES = ("clip", "frames")
LOADERS = ("serial", "prefetch")
DEFAULT_LOADER = "prefetch"


@dataclass(frozen=True)
class WorkloadPoint:
    """One point of the sweep axes; its fields are the workload columns of a result's identity
    (bench.measure.schema: WORKLOAD_KEYS, their defaults for older results, point_label)."""

    batch_size: int = 1  # requests run together as one batch
    question_tokens: int | None = None  # questions stretched/cut to this many tokens (None: as given)
    new_tokens: int = 128
    num_images: int = 1  # images in each request's prompt (image input)
    loader: str = ""  # video frames: serial | prefetch ("" for other inputs)

    def columns(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        return point_label(self.columns())


assert tuple(asdict(WorkloadPoint())) == WORKLOAD_KEYS, "WorkloadPoint's fields: bench.measure.schema.WORKLOAD_KEYS"


def int_list(text: str | None, flag: str, minimum: int = 1) -> list[int]:
    """'1,4,16' -> [1, 4, 16] (None, a flag not given: []); a clear usage error otherwise (a
    given flag with no number in it too)."""
    if text is None:
        return []
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = None
    if not values:
        raise UsageError(f"{flag} takes comma-separated whole numbers, got {text!r}")
    if any(v < minimum for v in values):
        raise UsageError(f"{flag}: every value must be at least {minimum}, got {text!r}")
    return list(dict.fromkeys(values))


def name_list(text: str, flag: str, choices: tuple[str, ...]) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise UsageError(f"{flag}: choose from {', '.join(choices)}, got {text!r}")
    return list(dict.fromkeys(values))


def workload_points(batch_sizes: list[int], question_tokens: list[int], new_tokens: list[int],
                    num_images: list[int], loaders: list[str]) -> list[WorkloadPoint]:
    """The cross product, in the order given (empty axis: its default)."""
    axes = itertools.product(batch_sizes or [1], question_tokens or [None], new_tokens or [128],
                             num_images or [1], loaders or [""])
    return [WorkloadPoint(*p) for p in axes]


def question_of_length(count_tokens, question: str, n: int) -> str:
    """`question`'s words repeated (or cut) to a question of exactly `n` tokens where the
    tokenizer allows (else the nearest below, then one filler token at a time).

    The most words that fit are found by bisection (each word adds at least one token), so a
    question of n tokens takes about log2(n) tokenizations, not n (one word at a time, a question
    of 4,080 tokens took 2 minutes on a CPU)."""
    words = question.split() or ["what"]

    def repeated(k: int) -> str:
        return " ".join(words[i % len(words)] for i in range(k))

    fit = bisect.bisect_right(range(n + 1), n, key=lambda k: count_tokens(repeated(k))) - 1
    text = repeated(max(fit, 0))
    if count_tokens(text) == n:
        return text
    for filler in ("a", "x", "."):
        while count_tokens(text + " " + filler) <= n and count_tokens(text) < n:
            text = text + " " + filler
        if count_tokens(text) == n:
            break
    return text


def questions_of_length(count_tokens, questions: list[str], n: int) -> list[str]:
    """Each question made `n` tokens long (question_of_length), duplicates dropped, order kept."""
    return list(dict.fromkeys(question_of_length(count_tokens, q, n) for q in questions))


_DERIVE = (lambda im: im, ImageOps.mirror, ImageOps.flip, lambda im: im.rotate(180), ImageOps.invert,
           ImageOps.grayscale, lambda im: ImageOps.solarize(im, 128), lambda im: ImageOps.posterize(im, 3))


def derived_image(image: Image.Image, i: int) -> Image.Image:
    """The i-th derived image: the image, then deterministic flips, rotations and tone changes of
    it (same size, different content); past the transforms, their cycle with shifted hues."""
    im = _DERIVE[i % len(_DERIVE)](image).convert("RGB")
    if i >= len(_DERIVE):
        im = Image.eval(im, lambda v, s=i: (v + 37 * (s // len(_DERIVE))) % 256)
    return im


def derived_images(image: Image.Image, k: int) -> list[Image.Image]:
    """`k` distinct images for a multi-image prompt (derived_image 0 .. k-1)."""
    return [derived_image(image, i) for i in range(k)]


class RequestSource:
    """Each run's requests for one workload point.

    - image input: every request shows the same image(s) (`num_images` of them), so questions
      after the first on an image can reuse its prefix; the request carries the files a client
      would send (`image_file`'s bytes, then the derived images as PNG), which the prefix cache
      keys on, as a server would on a request's uploads (hashing pixels instead took a quarter of
      a warm TTFT for InternVideo2.5's 4 images on an H100:
      results/reference/h100/internvideo2.5-8b-fp16-prefix-awq4-graph-image, lookup_ms);
    - video clip (`--video-mode clip`): every request shows all sampled frames as one video;
    - video frames (`--video-mode frames`): each request shows the next frame as a still image
      (tiled like one, as frame-by-frame analysis does; a batch: the next `batch_size` frames),
      read serially or by the prefetching loader.
    """

    def __init__(self, point: WorkloadPoint, image: Image.Image | None, frames=None, video_mode: str = "",
                 preprocess=None, image_file: bytes | None = None):
        self.point, self.loader = point, None
        if frames is None:
            images = tuple(derived_images(image, point.num_images))
            # the files a request would carry: the image's own, then the derived images as PNG
            # (as endpoint mode sends them), made here, before any run
            encoded = None if image_file is None else (image_file, *map(png_bytes, images[1:]))
            self.visual = VisualInput(images, encoded=encoded)
        elif video_mode == "clip":
            self.visual = frames.clip()
        else:
            from bench.run.media import FrameLoader

            self.visual = None
            self.loader = FrameLoader(frames, point.batch_size, point.loader == "prefetch",
                                      preprocess if point.loader == "prefetch" else None)

    def next(self, questions: list[str], start: int) -> tuple[list[tuple[VisualInput, str]], float]:
        """(the run's batch of (visual, question), seconds spent waiting for frames)."""
        qs = [questions[(start + i) % len(questions)] for i in range(self.point.batch_size)]
        if self.loader is None:
            return [(self.visual, q) for q in qs], 0.0
        frames, waited = self.loader.next()
        return list(zip(frames, qs)), waited

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
