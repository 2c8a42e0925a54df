"""Frames from a video file (PyAV) or a folder of extracted frames, sampled uniformly, and a
loader that reads (and preprocesses) the next frames while the GPU works on the current ones.

The seed's InternVL3 frame-by-frame analysis left the GPU at 10-20% utilisation: each frame
was decoded and preprocessed, then sent to the model, one after another. `FrameLoader` runs the
same work in a background thread, `depth` batches ahead (what torch's DataLoader does with
workers and prefetch_factor; a thread suffices here because decoding and PIL/numpy release the
GIL, and the adapter's processor must run in this process).
"""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from bench.errors import UsageError, path_problem
from bench.models.base import host_preprocessing
from bench.models.visual import VisualInput, check_frame_size, check_image_file, load_image

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# A clip from a video file up to this size carries the file as its prefix key (hashed at each
# lookup: 64 MiB in about 3 ms); a larger one is keyed by its frames' pixels
CONTAINER_KEY_BYTES = 64 << 20


def sample_indices(total: int, num: int) -> list[int]:
    """`num` frame indices spread uniformly over `total` frames: the middle of `num` equal
    segments, as InternVL's and InternVideo2.5's video loaders pick them (all frames if fewer)."""
    if total <= 0:
        return []
    if num <= 0 or num >= total:
        return list(range(total))
    seg = (total - 1) / num
    return [min(total - 1, int(seg / 2 + round(seg * i))) for i in range(num)]


class FrameSource:
    """The sampled frames of a video (`--video-path`, decoded with PyAV) or of a folder of
    images (`--frames-dir`, sorted by name). Iterating decodes them in order, lazily.

    Before any frame is decoded, every sampled frame's size is known (`sizes`) and held to the
    limit image files are (a video's frame size from its stream's header)."""

    def __init__(self, video_path: str | None = None, frames_dir: str | None = None, num_frames: int = 8):
        if bool(video_path) == bool(frames_dir):
            raise UsageError("give one of --video-path or --frames-dir")
        self.video_path, self.num_frames = video_path, num_frames
        self._clip: VisualInput | None = None
        if frames_dir:
            d = Path(frames_dir)
            problem = path_problem(d, "directory")
            if problem:
                raise UsageError(f"--frames-dir {frames_dir}: {problem}")
            # hidden files are no frames (macOS's ._NAME.png copies of resource forks among them)
            self.files = sorted(p for p in d.iterdir() if p.suffix.lower() in FRAME_SUFFIXES
                                and not p.name.startswith("."))
            if not self.files:
                raise UsageError(f"--frames-dir {frames_dir}: no image files ({', '.join(FRAME_SUFFIXES)})")
            self.total = len(self.files)
        else:
            problem = path_problem(video_path)
            if problem:
                raise UsageError(f"--video-path {video_path}: {problem}")
            self.files = None
            self.total, size = self._count_video_frames()
        self.indices = sample_indices(self.total, num_frames)
        if self.files is not None:  # every sampled frame opens and verifies before any model loads
            self.sizes = [check_image_file(self.files[i], "--frames-dir") for i in self.indices]
        else:
            self.sizes = [size] * len(self.indices)

    def _open(self):
        try:
            import av
        except ImportError:
            raise UsageError("--video-path needs PyAV (pip install av)") from None
        try:
            return av.open(self.video_path)
        except Exception as e:  # av raises its own error types per container problem
            raise UsageError(f"--video-path {self.video_path}: not a readable video ({e.__class__.__name__})") from None

    def _count_video_frames(self) -> tuple[int, tuple[int, int]]:
        """(frames in the video, their (width, height)), from the stream's header where it says;
        refused before a frame is decoded when the frames are past the image size limit."""
        import av

        with self._open() as container:
            if not container.streams.video:
                raise UsageError(f"--video-path {self.video_path}: no video stream in the file")
            stream = container.streams.video[0]
            size = (stream.codec_context.width, stream.codec_context.height)
            check_frame_size(*size, "--video-path", self.video_path)
            total = stream.frames
            if not total:  # containers without a frame count: decode them all (each checked)
                try:
                    for frame in container.decode(stream):
                        self._check_frame(frame)
                        total += 1
                except av.error.FFmpegError as e:
                    raise UsageError(f"--video-path {self.video_path}: not a readable video "
                                     f"({e.__class__.__name__})") from None
            if not total:
                raise UsageError(f"--video-path {self.video_path}: the video has no frames")
            return total, size

    def _check_frame(self, frame) -> None:
        """A decoded frame's size is held to the limit too (a stream may change size midway)."""
        check_frame_size(frame.width, frame.height, "--video-path", self.video_path)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Image.Image]:
        for frame, _ in self.frames_with_files():
            yield frame

    def frames_with_files(self) -> Iterator[tuple[Image.Image, bytes | None]]:
        """Each sampled frame with its file's bytes (--frames-dir), or None (decoded from a video)."""
        if self.files is not None:
            for i in self.indices:
                yield load_image(self.files[i], "--frames-dir"), self.files[i].read_bytes()
            return
        for frame in self._decoded():
            yield frame, None

    def _decoded(self) -> Iterator[Image.Image]:
        """The sampled frames of the video, decoded in order."""
        wanted = set(self.indices)
        with self._open() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    self._check_frame(frame)
                    yield frame.to_image().convert("RGB")
                if i >= self.indices[-1]:
                    break

    def requests(self) -> Iterator[VisualInput]:
        """Each sampled frame as a request of its own (`--video-mode frames`), carrying its file
        where it has one (--frames-dir), which keys a prefix cache's lookup as a clip's do."""
        for frame, data in self.frames_with_files():
            yield VisualInput((frame,), encoded=None if data is None else (data,))

    def clip(self) -> VisualInput:
        """All sampled frames as one video request (decoded once, then kept), carrying the files
        they came from (the frame files, or the video file), which key a prefix cache's lookup
        without hashing the frames' pixels (bench.models.visual.VisualInput.content_digest)."""
        if self._clip is None:
            pairs = list(self.frames_with_files())
            frames = tuple(frame for frame, _ in pairs)
            if self.files is not None:
                self._clip = VisualInput(frames, video=True, encoded=tuple(data for _, data in pairs))
            else:
                # a video file keys its clip when it is small enough to hold and hash at each lookup,
                # and every sampled frame decoded (the frame count then says which were sampled)
                path = Path(self.video_path)
                keyed = path.stat().st_size <= CONTAINER_KEY_BYTES and len(frames) == len(self.indices)
                self._clip = VisualInput(frames, video=True, container=path.read_bytes() if keyed else None)
        return self._clip


class FrameLoader:
    """Endless batches of `batch` single-frame requests from `source` (restarting at the end).

    `prefetch=False`: each batch is read (and preprocessed) when asked for, as the seed did.
    `prefetch=True`: a background thread keeps up to `depth` batches ready. `next()` returns
    (frames, seconds the caller waited): the wait is what the GPU idles for."""

    def __init__(self, source: FrameSource, batch: int, prefetch: bool,
                 preprocess: Callable[[VisualInput], object] | None = None, depth: int = 2):
        self.source, self.batch, self.prefetch, self.preprocess = source, batch, prefetch, preprocess
        self._frames = self._cycle()
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        if prefetch:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._fill, daemon=True, name="frame-prefetch")
            self._thread.start()

    def _cycle(self) -> Iterator[VisualInput]:
        while True:
            yield from self.source.requests()

    def _read_batch(self) -> list[VisualInput]:
        out = []
        for _ in range(self.batch):
            v = next(self._frames)
            if self.preprocess is not None:
                v.pixel_values = self.preprocess(v)  # the processor runs here, off the GPU's path
            out.append(v)
        return out

    def _fill(self) -> None:
        with host_preprocessing():  # never on the stream the measured requests are timed on
            self._fill_queue()

    def _fill_queue(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._read_batch()
            except Exception as e:  # noqa: BLE001 - handed to the consumer, raised there
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return

    def next(self) -> tuple[list[VisualInput], float]:
        t0 = time.perf_counter()
        if self._queue is None:
            item = self._read_batch()
        else:
            item = self._queue.get()
            if isinstance(item, Exception):
                raise item
        return item, time.perf_counter() - t0

    def close(self) -> None:
        self._stop.set()
        if self._queue is not None:
            self._thread.join(timeout=5)
