"""Conversation templates, rendered exactly as the models were trained (see MODELS.md).

A prompt is `head + message + tail`. The message starts with the image placeholder, so
`head + placeholder (+ separator)` is the cacheable prefix (same for every question on an
image) and `question + tail` is the suffix.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
)

INTERNVL_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


@dataclass(frozen=True)
class ConvTemplate:
    name: str
    system: str
    head: str  # text before the user message; "{system}" is filled in
    tail: str  # text after the user message, ending with the assistant header
    bos_in_text: bool = False  # the template writes the BOS token itself

    def render(self, message: str) -> str:
        return self.head.format(system=self.system) + message + self.tail

    def split(self, question: str, image_block: str) -> tuple[str, str]:
        """(prefix, suffix) texts: prefix = head + the images' placeholders (the adapter writes
        them: placeholder, separator, labels), suffix = question + tail."""
        return self.head.format(system=self.system) + image_block, question + self.tail


TEMPLATES: dict[str, ConvTemplate] = {
    t.name: t
    for t in (
        ConvTemplate("vicuna_v1", VICUNA_SYSTEM, "{system} USER: ", " ASSISTANT:"),
        ConvTemplate(
            "llama_3",
            LLAMA3_SYSTEM,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n",
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            bos_in_text=True,
        ),
        ConvTemplate(
            "hermes-2",
            "Answer the questions.",
            "<|im_start|>system\n{system}<|im_end|><|im_start|>user\n",
            "<|im_end|><|im_start|>assistant\n",
        ),
        ConvTemplate("plain", "", "", "\n"),
        # InternVL2.5/3 ("internvl2_5" in InternVL's conversation.py) and VITA-1.5's Qwen2.5 chat.
        ConvTemplate("internvl2_5", INTERNVL_SYSTEM, "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n",
                     "<|im_end|>\n<|im_start|>assistant\n"),
        ConvTemplate("qwen2p5_instruct", "You are a helpful assistant.",
                     "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n",
                     "<|im_end|>\n<|im_start|>assistant\n"),
    )
}

# Tokens the templates need in the vocabulary as single special tokens.
TEMPLATE_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>",
]


def get_template(name: str) -> ConvTemplate:
    from bench.errors import UsageError

    if name not in TEMPLATES:
        raise UsageError(f"unknown --conv-mode {name!r}; choose one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
