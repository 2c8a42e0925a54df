"""A checkpoint's Llama-style tokenizer as a SentencePiece `tokenizer.model` with a published-style
`tokenizer_config.json`, the files VILA1.5's `llm/` ships (no `tokenizer.json`) and LLaVA-1.5
ships beside its `tokenizer.json`.

The tokenizer written by make-checkpoint (bench.models.tokenizer) is a byte-fallback BPE with a
SentencePiece-style metaspace; its pieces, byte tokens and merges map one to one onto a
SentencePiece BPE model (a piece's score orders its merge), and its added tokens (<image>,
<pad>, template markers) go into `added_tokens_decoder` as published configs list them. Loaded
back by transformers (which converts `tokenizer.model` with sentencepiece), prompts tokenize to
the same ids; the one known difference is text that starts with a space. (Hand-written: neither
tokenizers nor sentencepiece converts a trained BPE into a SentencePiece model; transformers
converts only the other way.)
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.errors import UsageError

TOKENIZER_FILES = ("json", "sentencepiece", "both")


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def sentencepiece_model(state: dict) -> bytes:
    """The serialized SentencePiece ModelProto of a tokenizer.json `state` (a BPE with byte
    fallback, as bench.models.tokenizer builds)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = state["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    rank = {a + b: i for i, (a, b) in enumerate(merges)}
    proto = pb.ModelProto()
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.byte_fallback = True
    spec.vocab_size = len(vocab)
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = vocab["<unk>"], vocab["<s>"], vocab["</s>"], -1
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = \
        "identity", True, False, True
    kind = pb.ModelProto.SentencePiece
    for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        p = proto.pieces.add()
        p.piece = piece
        if piece == "<unk>":
            p.type = kind.UNKNOWN
        elif piece in ("<s>", "</s>"):
            p.type = kind.CONTROL
        elif piece.startswith("<0x") and len(piece) == 6:
            p.type = kind.BYTE
        elif piece.startswith("<filler_"):
            p.type = kind.UNUSED
        else:
            p.type = kind.NORMAL
            p.score = -float(rank[piece]) if piece in rank else 0.0
    return proto.SerializeToString()


def write_sentencepiece(folder: Path, keep_json: bool) -> None:
    """Add `tokenizer.model` and a published-style `tokenizer_config.json` to the tokenizer saved
    in `folder` (its tokenizer.json), and drop tokenizer.json unless `keep_json`."""
    folder = Path(folder)
    state = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = state["model"].get("vocab")
    if state["model"].get("type") != "BPE" or not isinstance(vocab, dict) or "<s>" not in vocab:
        raise UsageError(f"{folder}: not a Llama-style tokenizer; a SentencePiece tokenizer.model is written for "
                         "LLaVA and VILA checkpoints (InternVL's Qwen2 tokenizer is published as tokenizer.json)")
    (folder / "tokenizer.model").write_bytes(sentencepiece_model(state))
    old = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {str(t["id"]): _added(t["content"]) for t in state.get("added_tokens", [])}
    config = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": True,
        "pad_token": old.get("pad_token"), "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
    }
    if isinstance(old.get("model_max_length"), int) and old["model_max_length"] < 10**9:
        config["model_max_length"] = old["model_max_length"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if not keep_json:
        (folder / "tokenizer.json").unlink()
