"""Token ids of a text with no special tokens added, as `tokenizer(text, add_special_tokens=False)
.input_ids` gives them, with less host time on a warm request's path.

The transformers call of a fast tokenizer validates its arguments, sets the backend's padding and
truncation, calls the `tokenizers` backend's `encode_batch` and builds a BatchEncoding. Where it
would do nothing but that, `PlainIds` calls the backend's `encode` itself. Measured on the CPU
machine (llava-1.5-7b preset tokenizer, its 52-token vicuna_v1 prompt): 66 us -> 32 us back to
back, and 509 us -> 234 us right after a full `gc.collect()` (the benchmark's state before each
request: the wrapper's long Python path runs cache-cold).

The backend is used only when (checked once) the tokenizer is a fast one whose call and
`_encode_plus` are transformers' own, and the first text gives the same ids both ways; and
(checked every call, cheap) the backend has no padding or truncation set and splits special
tokens as the tokenizer says. Otherwise every text goes through the transformers call.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


class PlainIds:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cls = type(tokenizer)
        own_call = (cls.__call__ is PreTrainedTokenizerBase.__call__
                    and getattr(cls, "_encode_plus", None) is PreTrainedTokenizerFast._encode_plus)
        self.backend = backend if own_call else None
        self.checked = False  # the first text compared both ways

    @property
    def direct(self) -> bool:
        """Whether texts go to the backend directly (the first text decides; True until then)."""
        return self.backend is not None

    def via_transformers(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def __call__(self, text: str) -> list[int]:
        b = self.backend
        if b is None or b.padding is not None or b.truncation is not None \
                or b.encode_special_tokens != bool(getattr(self.tokenizer, "split_special_tokens", False)):
            return self.via_transformers(text)
        ids = b.encode(text, add_special_tokens=False).ids
        if not self.checked:
            self.checked = True
            if ids != self.via_transformers(text):
                self.backend = None
                return self.via_transformers(text)
        return ids
