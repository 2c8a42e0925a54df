"""The OpenAI chat-completions request a server accepts, checked into what an engine runs.

Content parts: `text`, `image_url` (a `data:` URL or a local path, `file://` or plain) and
`video_url` (the same; its frames sampled uniformly as the run's --num-frames). The question is the
text of the last user message; the model's template supplies the system prompt (which, with the
images, is the cacheable prefix), so `system` messages and earlier turns are not sent to the model.
Decoding is greedy and fixed-length as in every measured run: `temperature` above 0 and `n` above 1
are refused, and a request generates exactly `max_tokens` tokens (finish_reason `length`). A request
the model cannot take (images its family cannot show together, or a prompt plus `max_tokens` longer
than its positions) is refused with a 400 before it runs (bench.serve.worker, Worker._fits).
"""
from __future__ import annotations

import base64
import binascii
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bench.errors import UsageError, path_problem
from bench.models.visual import BOMB, VisualInput, bomb_pixels, upright_rgb
from bench.serve.image_cache import DecodedImages


class ApiError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


class WouldBlock(Exception):
    """parse_chat(blocking=False) met work that would hold up the server's event loop: an image
    not decoded before, a local file to read, a video to decode."""


@dataclass
class ChatRequest:
    visual: VisualInput
    question: str
    max_tokens: int
    stream: bool
    include_usage: bool = False


def _bytes_of(url: str, param: str) -> bytes:
    """A `data:` URL's payload or a local file's bytes (remote URLs are not fetched)."""
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise ApiError("data: URLs must be base64-encoded", param=param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError("the data: URL is not valid base64", param=param) from None
    if url.startswith(("http://", "https://")):
        raise ApiError("remote URLs are not fetched: send a data: URL or a path on the server", param=param)
    path = Path(url.removeprefix("file://"))
    try:
        if path.is_file():
            return path.read_bytes()
    except (OSError, ValueError) as e:  # a name too long, a file that cannot be read
        raise ApiError(f"the file cannot be read on the server ({e.__class__.__name__})", param=param) from None
    try:
        problem = path_problem(path)  # a folder, a FIFO, a broken link, or nothing there
    except ValueError:  # a NUL in the name
        problem = None
    raise ApiError(f"{problem or 'no such file'} on the server: {path}", param=param)


# A request's images together, in pixels: twice what one image file may have (PIL warns past
# MAX_IMAGE_PIXELS and refuses past twice that), so a body within --max-request-mb of small,
# highly compressible images cannot make the server decode tens of GB (each image alone is
# checked against MAX_IMAGE_PIXELS as well).
REQUEST_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


class _PixelBudget:
    """What is left of a request's REQUEST_PIXELS as its images are read."""

    def __init__(self):
        self.left = REQUEST_PIXELS

    def take(self, width: int, height: int, param: str) -> None:
        if width * height > self.left:
            raise ApiError(f"the request's images have more than {REQUEST_PIXELS:,} pixels together; send "
                           "fewer or smaller images", param=param)
        self.left -= width * height


def _decode(data: bytes, param: str, budget: _PixelBudget) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:  # the size is known from the header, before decoding
            limit = Image.MAX_IMAGE_PIXELS  # as image files are held to (PIL warns past it, refuses past twice)
            if limit and im.width * im.height > limit:
                raise ApiError(f"the image ({im.width}x{im.height} = {im.width * im.height:,} pixels) is too large to "
                               f"decode safely; send at most {limit:,} pixels", param=param)
            budget.take(im.width, im.height, param)
            return upright_rgb(im)
    except ApiError:
        raise
    except BOMB as e:  # past twice the limit PIL refuses it at open: its size as PIL's error states it
        raise ApiError(f"the image{bomb_pixels(e)} is too large to decode safely; send at most "
                       f"{Image.MAX_IMAGE_PIXELS:,} pixels", param=param) from None
    except Exception as e:  # noqa: BLE001 - a malformed file raises what its plugin meets (UnidentifiedImageError,
        # OSError, ValueError, SyntaxError, EOFError, struct.error, ...): the request's image, a 400
        raise ApiError(f"the image cannot be decoded ({e.__class__.__name__})", param=param) from None


def _image(url: str, param: str, decoded: DecodedImages | None, blocking: bool,
           budget: _PixelBudget) -> tuple[Image.Image, bytes]:
    if not blocking and (decoded is None or not url.startswith("data:")):
        raise WouldBlock  # no cache to find it in, or a file to read
    data = _bytes_of(url, param)
    if not blocking:
        image = decoded.cached(data)
        if image is None:
            raise WouldBlock
        budget.take(image.width, image.height, param)
        return image, data
    if decoded is None:
        return _decode(data, param, budget), data
    made = []  # a decode counts its pixels before it decodes; an image found decoded is counted here

    def decode(d: bytes) -> Image.Image:
        made.append(d)
        return _decode(d, param, budget)

    image = decoded.get_or_decode(data, decode)
    if not made:
        budget.take(image.width, image.height, param)
    return image, data


def _video(url: str, param: str, num_frames: int) -> VisualInput:
    from bench.run.media import FrameSource

    data = _bytes_of(url, param)
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        try:
            return FrameSource(f.name, None, num_frames).clip()
        except (UsageError, OSError, ValueError) as e:  # said in run's terms: "--video-path FILE: why"
            why = str(e).removeprefix(f"--video-path {f.name}: ").removeprefix("--video-path ")
            raise ApiError(f"the video cannot be decoded ({why})", param=param) from None


def _url(part: dict, key: str, param: str) -> str:
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise ApiError(f"{key} needs a url", param=param)
    return url


def parse_chat(body, default_max_tokens: int, max_tokens_limit: int, num_frames: int = 8,
               decoded: DecodedImages | None = None, blocking: bool = True) -> ChatRequest:
    """A request body (parsed JSON) as a ChatRequest; ApiError (400) naming what is wrong. Images
    an earlier request sent in the same bytes come from `decoded` (none: each image is decoded).
    blocking=False: WouldBlock rather than decode an image or a video or read a file (the server
    then parses the request on a thread of its own)."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError("messages must be a non-empty list of message objects", param="messages")
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
                                    or temperature != 0):
        raise ApiError("only greedy decoding is served: temperature must be 0 or absent", param="temperature")
    if body.get("n") not in (None, 1):
        raise ApiError("n must be 1", param="n")
    max_tokens = body.get("max_completion_tokens")  # OpenAI's name since max_tokens; null is absent
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_tokens_limit:
        raise ApiError(f"max_tokens must be a whole number from 1 to {max_tokens_limit}", param="max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("stream_options must be an object", param="stream_options")
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ApiError("no user message", param="messages")
    i = users[-1]
    content = messages[i].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise ApiError("content must be a string or a list of content parts", param=f"messages[{i}].content")
    texts, images, encoded, video, budget = [], [], [], None, _PixelBudget()
    for j, part in enumerate(parts):
        param = f"messages[{i}].content[{j}]"
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError("a text part's text must be a string", param=param)
            try:
                part["text"].encode("utf-8")
            except UnicodeEncodeError:  # JSON's \ud800 escapes decode to lone surrogates, no tokenizer's text
                raise ApiError("a text part's text holds a lone UTF-16 surrogate (not a character)",
                               param=param) from None
            texts.append(part["text"])
        elif kind == "image_url":
            image, data = _image(_url(part, "image_url", param), param, decoded, blocking, budget)
            images.append(image)
            encoded.append(data)
        elif kind == "video_url":
            if video is not None:
                raise ApiError("one video per request", param=param)
            if not blocking:
                raise WouldBlock
            video = _video(_url(part, "video_url", param), param, num_frames)
        else:
            raise ApiError(f"unsupported content part {kind!r}: text, image_url or video_url", param=param)
    if video is not None and images:
        raise ApiError("a request shows images or a video, not both", param=f"messages[{i}].content")
    if video is None and not images:
        raise ApiError("a request needs an image_url or a video_url", param=f"messages[{i}].content")
    if not blocking and images:
        decoded.hits(len(images))  # every image was there (else WouldBlock, and a parse that counts)
    visual = video or VisualInput(tuple(images), encoded=tuple(encoded))
    return ChatRequest(visual, " ".join(texts), max_tokens, stream, bool(options.get("include_usage")))
