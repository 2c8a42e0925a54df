"""A Llama-style tokenizer built locally (no download) for presets and test checkpoints.

Layout follows Llama/Vicuna: <unk>=0, <s>=1, </s>=2, byte-fallback tokens <0x00>..<0xFF> at
3..258, then BPE pieces learned from an embedded English corpus with a SentencePiece-style
metaspace, padded with unreachable filler pieces to `base_vocab`; model-specific special
tokens (e.g. <image>, <pad>, chat-template markers) come after, so LLaVA-1.5's
<image>=32000 and <pad>=32001 hold for a 32000-piece base.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from bench.models.templates import TEMPLATES
from bench.models.prompts import BUILTIN_QUESTIONS, WARMUP_QUESTIONS

_CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Describe the image in detail. What objects, people, colors and text can you see?",
    "The picture shows a street with cars, buildings, trees, a bicycle and a red sign.",
    "Please answer the question about the photo briefly and accurately.",
    "There is a person standing next to a table with a cup of coffee and a laptop.",
    "How many animals are in the scene, and what are they doing right now?",
    "The weather looks sunny and warm; the sky is blue with a few white clouds.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024. Punctuation: , . ; : ! ? ' \" ( ) - /",
]

SPECIAL_BASE = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def _corpus() -> list[str]:
    texts = list(_CORPUS) + list(BUILTIN_QUESTIONS) + list(WARMUP_QUESTIONS)
    texts += [t.system for t in TEMPLATES.values() if t.system]
    return texts * 4


def build_tokenizer(base_vocab: int, extra_special: list[str], qwen: bool = False) -> PreTrainedTokenizerFast:
    """Train on the embedded corpus; ids of `extra_special` start at `base_vocab`.
    `qwen`: Qwen2-style use (no BOS added, <|endoftext|> pads, <|im_end|> ends a turn)."""
    reserved = len(SPECIAL_BASE) + len(BYTE_TOKENS)
    if base_vocab < reserved + 64:
        raise ValueError(f"base_vocab must be at least {reserved + 64}")
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab,
        special_tokens=SPECIAL_BASE + BYTE_TOKENS,
        show_progress=False,
        initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-/\n"),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    vocab = tok.get_vocab()
    merges = _merges(tok)
    for i in range(len(vocab), base_vocab):  # unreachable filler pieces, like unused ids in real vocabs
        vocab[f"<filler_{i}>"] = i
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    full = Tokenizer(bpe)
    full.normalizer = tok.normalizer
    full.pre_tokenizer = tok.pre_tokenizer
    full.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    full.add_special_tokens(SPECIAL_BASE)
    full.add_special_tokens(list(extra_special))
    from tokenizers.processors import TemplateProcessing

    if qwen:
        return PreTrainedTokenizerFast(tokenizer_object=full, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       unk_token="<unk>", add_bos_token=False)
    full.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=full,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if "<pad>" in extra_special else None,
        add_bos_token=True,
    )
    return hf


def _merges(tok: Tokenizer) -> list[tuple[str, str]]:
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
