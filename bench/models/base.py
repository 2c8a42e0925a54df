"""The model-adapter contract: one family's prompt layout, image features and LLM forward.

Every family turns (image, question) into the same shape of request: token ids before the
image, the image's embeddings, token ids after it (all three form the cacheable prefix),
then the suffix ids (question + assistant header). The engine only talks to this contract.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
from dataclasses import dataclass

import torch
from PIL import Image

from bench.models.plain_ids import PlainIds
from bench.models.templates import ConvTemplate
from bench.models.visual import as_visual


@dataclass
class PreparedPrompt:
    """CPU-side result of preprocessing one request.

    The cacheable prefix is text_segments[0], image 1, text_segments[1], image 2, ...,
    text_segments[-1]; then the suffix ids. One image: [ids before it, ids after it]."""

    text_segments: list[list[int]]  # prefix text around the images (len = images + 1)
    image_tokens: list[int]  # embeddings per image, in order
    suffix_ids: list[int]  # question + assistant header
    pixel_values: torch.Tensor | None = None  # processor output (None until processed)

    def __post_init__(self):
        if len(self.text_segments) != len(self.image_tokens) + 1:
            raise ValueError("text_segments must surround the images (one more segment than images)")

    @property
    def ids_before_image(self) -> list[int]:
        return self.text_segments[0]

    @property
    def ids_after_image(self) -> list[int]:
        return self.text_segments[-1]

    @property
    def total_image_tokens(self) -> int:
        return sum(self.image_tokens)

    @property
    def prefix_tokens(self) -> int:
        return sum(len(s) for s in self.text_segments) + self.total_image_tokens

    @property
    def prompt_tokens(self) -> int:
        return self.prefix_tokens + len(self.suffix_ids)

    def pixel_digest(self) -> str:
        """SHA-256 of the preprocessed pixel tensor (what the seed's VILA fork keyed on)."""
        t = self.pixel_values.detach().contiguous().cpu()
        return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()

    def prefix_key_ids(self) -> tuple[int, ...]:
        out: tuple[int, ...] = tuple(self.text_segments[0])
        for n, seg in zip(self.image_tokens, self.text_segments[1:]):
            out += (-n,) + tuple(seg)  # the image's token count is part of the layout
        return out


class QuestionError(ValueError):
    """A question the model cannot be asked as written (it holds the model's image placeholder)."""


def split_at_image_tokens(ids: list[int], image_token: int, images: int, prefix_len: int
                          ) -> tuple[list[list[int]], list[int]]:
    """(text segments around the `images` placeholder ids, suffix ids) of one tokenized prompt
    whose first `prefix_len` ids are the prefix (placeholders included)."""
    where = [i for i, t in enumerate(ids) if t == image_token]
    if len(where) != images:
        raise ValueError(f"the prompt has {len(where)} image placeholders, expected {images}")
    if prefix_len <= where[-1]:
        raise ValueError("prefix/suffix split fell before the last image placeholder")
    bounds = [-1] + where + [prefix_len]
    segments = [ids[a + 1:b] for a, b in zip(bounds, bounds[1:])]
    return segments, ids[prefix_len:]


def refuse_placeholder(adapter, question: str, placeholder: str) -> None:
    """QuestionError where the question holds the model's image placeholder: the model's own code
    would look for one image more than the request has (the harness places each image's tokens)."""
    if placeholder in question:
        raise QuestionError(f"the question holds {placeholder!r}, the image placeholder of {adapter.name}; remove it "
                            "(the harness places each image's tokens itself)")


def prepare_by_placeholders(adapter, question: str, image_block: str, placeholder: str, placeholder_id: int,
                            image_tokens: list[int]) -> PreparedPrompt:
    """Tokenize the whole prompt as the model's own processor does (in one call; per request
    only the text from the last `placeholder`, an added token: `_tokenize_prompt`), with one
    placeholder id per image, and split it into text segments, images and suffix."""
    refuse_placeholder(adapter, question, placeholder)
    prefix_text, suffix_text = adapter.template.split(question, image_block)
    full = adapter._tokenize_prompt(prefix_text + suffix_text, prefix_text.rindex(placeholder))
    prefix = adapter._tokenize_fixed(prefix_text, add_bos=True)
    # The split point is the longest shared run of the whole prompt's ids and the prefix
    # text's ids, so the prompt is tokenized exactly as the model expects.
    n = min(len(full), len(prefix))
    if full[:n] == prefix[:n]:  # the usual case, compared at C speed (a Python loop over ~50 ids
        split = n               # was ~30 us of a warm request's host path)
    else:
        split = next(i for i in range(n) if full[i] != prefix[i])
    segments, suffix = split_at_image_tokens(full, placeholder_id, len(image_tokens), split)
    return PreparedPrompt(segments, list(image_tokens), suffix)


_THREAD = threading.local()


@contextlib.contextmanager
def host_preprocessing():
    """Within it, this thread's image processing stays on the host whatever the adapter's
    `preprocess_device` (a background frame loader must not queue work on the stream the
    measured request is timed on)."""
    _THREAD.host_only = True
    try:
        yield
    finally:
        _THREAD.host_only = False


class VLMAdapter:
    """Base class; subclasses set the attributes below and implement the abstract methods."""

    family: str
    model: torch.nn.Module  # the whole VLM
    tokenizer: object
    image_processor: object
    template: ConvTemplate
    weights: str  # "random" | "checkpoint"
    name: str  # preset name or checkpoint directory name
    identity: str  # what makes two loaded models the same model (preset+seed, or resolved path)

    # Where the image processor runs: None on the host (its default); a device for processors
    # that can run there (transformers' torchvision-backed ones take `device=`): set by
    # bench.run.preprocess after a check that the processor really returns pixels there.
    preprocess_device: torch.device | None = None

    # A request shows a multiple of this many images or frames (InternVideo2.5 merges the tokens
    # of every 4 frames): what builders of requests the user did not write (AWQ calibration) give.
    visual_group: int = 1

    def __init__(self, template: ConvTemplate):
        self.template = template

    def run_processor(self, image, **kwargs) -> torch.Tensor:
        """The image processor's pixel_values for `image`, on `preprocess_device` when one is set.
        A device's processor queues GPU work: it is waited for here, so the host-clock
        `preprocess` phase holds all of it and nothing spills into the next phase's time."""
        device = self.preprocess_device
        if device is None or getattr(_THREAD, "host_only", False):
            return self.image_processor(images=image, return_tensors="pt", **kwargs)["pixel_values"]
        pixels = self.image_processor(images=image, return_tensors="pt", device=device, **kwargs)["pixel_values"]
        if pixels.device.type == "cuda":
            torch.cuda.current_stream(pixels.device).synchronize()
        return pixels

    # --- CPU side -------------------------------------------------------------------
    def prepare_text(self, question: str, visual=None) -> PreparedPrompt:
        """Tokenize the prompt around the images (`visual`: a VisualInput, an image or a list;
        None = one image of a size that does not matter); pixels are left for `preprocess`."""
        raise NotImplementedError

    def fit_image(self, image: Image.Image) -> Image.Image:
        """What the family does to an image before its processor (VILA pads or resizes); as is."""
        return image

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """Pixels of one image: [crops, 3, H, W] (one crop except for tiling families)."""
        return self.run_processor(self.fit_image(image))

    def preprocess(self, visual) -> torch.Tensor:
        """Pixels of every image of the request, in prompt order, from one call of the processor
        (a device processor takes them as one batch, with one wait for the device)."""
        images = as_visual(visual).images
        if len(images) == 1:
            return self.preprocess_image(images[0])
        return self.run_processor([self.fit_image(im) for im in images])

    def pixels_for(self, visual) -> torch.Tensor:
        """The request's pixels: what a frame loader already made, else the processor's output."""
        visual = as_visual(visual)
        return visual.pixel_values if visual.pixel_values is not None else self.preprocess(visual)

    def prepare(self, visual, question: str) -> PreparedPrompt:
        visual = as_visual(visual)
        prepared = self.prepare_text(question, visual)
        prepared.pixel_values = self.preprocess(visual)
        return prepared

    @staticmethod
    def image_count(visual) -> int:
        return 1 if visual is None else len(as_visual(visual))

    def _encode(self, text: str) -> list[int]:
        """`tokenizer(text, add_special_tokens=False).input_ids` (bench.models.plain_ids)."""
        found = self.__dict__.get("_plain_ids")
        if found is None or found.tokenizer is not self.tokenizer:
            found = self._plain_ids = PlainIds(self.tokenizer)
        return found(text)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone, without special tokens (what --prompt-lengths counts)."""
        return len(self._encode(text))

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        ids = self._encode(text)
        bos = self.tokenizer.bos_token_id
        if add_bos and not self.template.bos_in_text and bos is not None:
            ids = [bos] + ids
        return ids

    _FIXED_TEXTS = 64  # memo bound: distinct system-prompt/image-block texts a run may show

    def _tokenize_fixed(self, text: str, add_bos: bool) -> list[int]:
        """`_tokenize` for text that recurs on every request (the template around the images):
        memoized, so a warm request tokenizes only its question (one tokenizer call is ~0.2 ms
        of host time on the H200 machine, a visible share of a 6 ms warm TTFT)."""
        memo = self.__dict__.setdefault("_fixed_ids", {})
        ids = memo.get((text, add_bos))
        if ids is None:
            if len(memo) >= self._FIXED_TEXTS:
                memo.clear()
            ids = memo[(text, add_bos)] = tuple(self._tokenize(text, add_bos))
        return list(ids)

    def _tokenize_prompt(self, text: str, cut: int) -> list[int]:
        """`_tokenize(text, add_bos=True)` where `text[cut:]` starts with an added token (an image
        placeholder), tokenizing only `text[cut:]` per request: tokenizers split a text at its
        added tokens and tokenize the pieces apart, so the ids before `cut` are memoized. Checked
        once per head text against the whole text's ids (an added token may strip the whitespace
        before it); where they differ, the whole text is tokenized every time."""
        head = text[:cut]
        memo = self.__dict__.setdefault("_head_ids", {})
        head_ids = memo.get(head, False)
        if head_ids is False:
            whole = self._tokenize(text, add_bos=True)
            ids = self._tokenize_fixed(head, add_bos=True)
            if len(memo) >= self._FIXED_TEXTS:
                memo.clear()
            memo[head] = tuple(ids) if ids + self._encode(text[cut:]) == whole else None
            return whole
        if head_ids is None:
            return self._tokenize(text, add_bos=True)
        return [*head_ids, *self._encode(text[cut:])]

    # --- device side ------------------------------------------------------------------
    # device and dtype are read on every request (a warm one's host path is ~0.5 ms on the H200
    # machine): the embedding module they come from is found once. Nothing here replaces it
    # after loading (weight variants swap Linear layers only).
    @property
    def device(self) -> torch.device:
        return self.input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings().weight.dtype

    def language_model(self) -> torch.nn.Module:
        """The causal-LM part (the one weight variants quantize)."""
        raise NotImplementedError

    def vision_modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def text_config(self):
        """The language model's config (what KV buffers are sized from)."""
        raise NotImplementedError

    def quantization_targets(self, include_vision: bool) -> list[torch.nn.Module]:
        """Modules whose nn.Linear layers a weight variant quantizes."""
        raise NotImplementedError

    def input_embeddings(self) -> torch.nn.Embedding:
        """The LLM's token embedding module, found once (transformers' generic accessor walks the
        model: ~17 us a call on the CPU machine, on every warm request's path)."""
        found = self.__dict__.get("_input_embeddings")
        if found is None:
            found = self._input_embeddings = self.find_input_embeddings()
        return found

    def find_input_embeddings(self) -> torch.nn.Embedding:
        raise NotImplementedError

    def decoder_parts(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(the decoder stack with embed_tokens/layers/norm/rotary_emb, lm_head): what the static
        engines' own forward (bench.engines.decoder) drives."""
        raise NotImplementedError

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector over every crop of every image: [1, total image tokens, hidden]
        in the LLM's dtype (images in prompt order)."""
        raise NotImplementedError

    def lm_forward(self, inputs_embeds: torch.Tensor, cache, logits_to_keep: int = 1, attention_mask=None,
                   position_ids=None) -> torch.Tensor:
        """Causal LM over embeddings, appending to `cache` (a transformers Cache); returns logits
        [B, keep, vocab]. A padded batch passes the 2-D attention mask and the positions."""
        raise NotImplementedError

    # --- shared helpers -----------------------------------------------------------------
    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.input_embeddings()(t)

    def prefix_embeds(self, prepared: PreparedPrompt, image_embeds: torch.Tensor) -> torch.Tensor:
        parts, at = [], 0
        for segment, n in zip(prepared.text_segments, prepared.image_tokens + [0]):
            if segment:
                parts.append(self.embed_ids(segment))
            if n:
                parts.append(image_embeds[:, at:at + n])
                at += n
        if at != image_embeds.shape[1]:
            raise ValueError(f"{image_embeds.shape[1]} image embeddings for {at} image tokens")
        return torch.cat(parts, dim=1)

    def prompt_embeds(self, prepared: PreparedPrompt, image_embeds: torch.Tensor,
                      continuation: list[int] = ()) -> torch.Tensor:
        """The whole prompt (prefix + suffix ids + optional continuation ids) as embeddings."""
        return torch.cat([self.prefix_embeds(prepared, image_embeds),
                          self.embed_ids(prepared.suffix_ids + list(continuation))], dim=1)

    def pixels_to_device(self, prepared: PreparedPrompt) -> torch.Tensor:
        return prepared.pixel_values.to(self.device, dtype=self.dtype, non_blocking=True)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def image_content_digest(visual) -> str:
    """XXH3-128 of the request's images (bench.models.visual.VisualInput.content_digest)."""
    return as_visual(visual).content_digest()
