"""The model-adapter contract: one family's prompt layout, image features and LLM forward.

Every family turns (image, question) into the same shape of request: token ids before the
image, the image's embeddings, token ids after it (all three form the cacheable prefix),
then the suffix ids (question + assistant header). The engine only talks to this contract.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import xxhash
from PIL import Image

from bench.templates import ConvTemplate


@dataclass
class PreparedPrompt:
    """CPU-side result of preprocessing one request."""

    ids_before_image: list[int]  # prefix text before the image (BOS, system prompt, user role)
    ids_after_image: list[int]  # prefix text after the image (e.g. "\n")
    suffix_ids: list[int]  # question + assistant header
    image_tokens: int
    pixel_values: torch.Tensor | None = None  # processor output, on the CPU (None until processed)

    @property
    def prefix_tokens(self) -> int:
        return len(self.ids_before_image) + self.image_tokens + len(self.ids_after_image)

    @property
    def prompt_tokens(self) -> int:
        return self.prefix_tokens + len(self.suffix_ids)

    def pixel_digest(self) -> str:
        """SHA-256 of the preprocessed pixel tensor (what the seed's VILA fork keyed on)."""
        t = self.pixel_values.detach().contiguous().cpu()
        return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()

    def prefix_key_ids(self) -> tuple[int, ...]:
        return tuple(self.ids_before_image) + (-1,) + tuple(self.ids_after_image)


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
    weights_key: tuple = ("fp16",)  # set by the weights variant that loaded it

    def __init__(self, template: ConvTemplate):
        self.template = template

    # --- CPU side -------------------------------------------------------------------
    def prepare_text(self, question: str) -> PreparedPrompt:
        """Tokenize the prompt around the image; pixels are left for `preprocess_image`."""
        raise NotImplementedError

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, image: Image.Image, question: str) -> PreparedPrompt:
        prepared = self.prepare_text(question)
        prepared.pixel_values = self.preprocess_image(image)
        return prepared

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        bos = self.tokenizer.bos_token_id
        if add_bos and not self.template.bos_in_text and bos is not None:
            ids = [bos] + ids
        return ids

    # --- device side ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
        raise NotImplementedError

    def decoder_parts(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(the decoder stack with embed_tokens/layers/norm/rotary_emb, lm_head): what the static
        engines' own forward (bench.fast_decoder) drives."""
        raise NotImplementedError

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector: [1, image_tokens, hidden] in the LLM's dtype."""
        raise NotImplementedError

    def lm_forward(self, inputs_embeds: torch.Tensor, cache, logits_to_keep: int = 1) -> torch.Tensor:
        """Causal LM over embeddings, appending to `cache`; returns logits [1, keep, vocab]."""
        raise NotImplementedError

    # --- shared helpers -----------------------------------------------------------------
    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.input_embeddings()(t)

    def prefix_embeds(self, prepared: PreparedPrompt, image_embeds: torch.Tensor) -> torch.Tensor:
        parts = [self.embed_ids(prepared.ids_before_image), image_embeds]
        if prepared.ids_after_image:
            parts.append(self.embed_ids(prepared.ids_after_image))
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


def image_content_digest(image: Image.Image) -> str:
    """128-bit XXH3 of the decoded image (mode, size, pixels): its content, not its path.

    It is on the prefix-hit path (every warm request hashes its image), so it uses a
    non-cryptographic hash: SHA-256 of a 640x480 image took 0.7-2 ms on the CPU machine (and
    1.3 ms of a 26 ms warm TTFT on the H200 host), XXH3 runs at memory speed."""
    h = xxhash.xxh3_128(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()
