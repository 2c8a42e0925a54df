"""A warm request's tokenization shortcuts give exactly the ids of one transformers call over the
whole prompt: the backend called directly (bench.models.plain_ids) and only the text from the last
image placeholder tokenized per request (VLMAdapter._tokenize_prompt)."""
import pytest
import torch
from tokenizers import AddedToken

from bench.models.loader import build_preset, load_checkpoint
from bench.models.plain_ids import PlainIds
from bench.models.templates import TEMPLATES

CPU = torch.device("cpu")
QUESTIONS = ["What is shown here?", "  leading spaces and a trailing one ", "two\nlines\n", "café ☕ 42?",
             "ASSISTANT: USER: a turn marker inside", "x"]


def whole_ids(adapter, prepared_text: str) -> list[int]:
    """One transformers call over the whole prompt text, BOS as the adapter adds it."""
    ids = adapter.tokenizer(prepared_text, add_special_tokens=False).input_ids
    bos = adapter.tokenizer.bos_token_id
    if not adapter.template.bos_in_text and bos is not None:
        ids = [bos] + ids
    return ids


def flat(adapter, p) -> list[int]:
    out = list(p.text_segments[0])
    for seg in p.text_segments[1:]:
        out += [adapter.image_token_id] + list(seg)
    return out + list(p.suffix_ids)


@pytest.mark.parametrize("conv", sorted(TEMPLATES))
def test_llava_prompt_ids_equal_one_call_over_the_whole_prompt(conv, tiny_llava_dir, demo_image):
    a = load_checkpoint(tiny_llava_dir, conv, CPU, torch.float32)
    for images in ([demo_image], [demo_image, demo_image]):
        block = ("<image>" + a.image_separator) * len(images)
        for q in QUESTIONS * 2:  # the first request checks the memoized head, the later ones use it
            want = whole_ids(a, "".join(a.template.split(q, block)))
            assert flat(a, a.prepare_text(q, images)) == want, (conv, q)
    assert a._plain_ids.direct  # the shortcut was taken, not silently dropped
    assert all(ids is not None for ids in a._head_ids.values())


def test_internvl_prompt_equals_the_whole_text_call():
    a = build_preset("tiny-internvl", None, CPU, torch.float32)
    for q in QUESTIONS * 2:
        p = a.prepare_text(q, None)
        one = "<img><IMG_CONTEXT></img>\n"
        text = "".join(a.template.split(q, one))
        want = a.tokenizer(text, add_special_tokens=False).input_ids
        assert flat(a, p) == want, q


def test_plain_ids_equal_the_transformers_call_and_fall_back():
    a = build_preset("tiny-llava", None, CPU, torch.float32)
    tok = a.tokenizer
    enc = PlainIds(tok)
    for q in QUESTIONS:
        assert enc(q) == tok(q, add_special_tokens=False).input_ids
    assert enc.direct
    # padding set on the backend: the transformers call (which turns it off) answers, same ids
    tok.backend_tokenizer.enable_padding(length=64, pad_id=0)
    assert enc(QUESTIONS[0]) == tok(QUESTIONS[0], add_special_tokens=False).input_ids
    assert len(enc(QUESTIONS[0])) < 64
    # a backend giving other ids than the transformers call on the first text: never used again
    wrong = PlainIds(tok)

    class Off:
        padding = truncation = None
        encode_special_tokens = False

        @staticmethod
        def encode(text, add_special_tokens):
            return type("E", (), {"ids": [1, 2, 3]})()

    wrong.backend = Off()
    assert wrong(QUESTIONS[0]) == tok(QUESTIONS[0], add_special_tokens=False).input_ids
    assert not wrong.direct


def test_plain_ids_leave_an_overridden_call_alone():
    a = build_preset("tiny-llava", None, CPU, torch.float32)

    class Custom(type(a.tokenizer)):
        def __call__(self, text, **kw):
            return super().__call__(text.upper(), **kw)

    tok = a.tokenizer
    tok.__class__ = Custom
    enc = PlainIds(tok)
    assert not enc.direct
    assert enc("what") == tok("what", add_special_tokens=False).input_ids


def test_head_memo_falls_back_where_an_added_token_strips_the_text_before_it():
    a = build_preset("tiny-llava", None, CPU, torch.float32)
    a.tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<pic>", lstrip=True, special=True)]})
    text = "A chat. USER:   <pic>\nWhat is here? ASSISTANT:"
    want = whole_ids(a, text)
    head_alone = a._tokenize(text[:text.rindex("<pic>")], add_bos=True)
    assert want[:len(head_alone)] != head_alone  # lstrip: the spaces before <pic> are part of it
    for _ in range(3):
        assert a._tokenize_prompt(text, text.rindex("<pic>")) == want
    assert a._head_ids[text[:text.rindex("<pic>")]] is None  # checked once, then the whole text each time
    plain = "A chat. USER: <image>\nWhat is here? ASSISTANT:"
    for _ in range(2):
        assert a._tokenize_prompt(plain, plain.rindex("<image>")) == whole_ids(a, plain)
    assert a._head_ids[plain[:plain.rindex("<image>")]] is not None
