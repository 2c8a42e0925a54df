import pytest

from bench.errors import UsageError
from bench.models.templates import TEMPLATES, get_template

Q = "What is in the image?"

EXPECTED = {
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the image? ASSISTANT:"
    ),
    "llama_3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
        "assistant. You are able to understand the visual content that the user provides, and assist the user "
        "with a variety of tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "<image>\nWhat is in the image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "hermes-2": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the image?"
        "<|im_end|><|im_start|>assistant\n"
    ),
    "plain": "<image>\nWhat is in the image?\n",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_exact_string(name):
    assert TEMPLATES[name].render("<image>\n" + Q) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("sep", ["\n", ""])
def test_split_is_prefix_plus_suffix(name, sep):
    t = TEMPLATES[name]
    prefix, suffix = t.split(Q, "<image>" + sep)
    assert prefix + suffix == t.render("<image>" + sep + Q)
    assert prefix.endswith("<image>" + sep)
    assert suffix.startswith(Q)
    # the prefix does not depend on the question
    assert t.split("another question", "<image>" + sep)[0] == prefix


def test_vila_places_image_directly_before_question():
    prefix, suffix = TEMPLATES["vicuna_v1"].split(Q, "<image>")
    assert (prefix + suffix).endswith("USER: <image>What is in the image? ASSISTANT:")


def test_unknown_template_names_choices():
    with pytest.raises(UsageError, match="vicuna_v1, llama_3, hermes-2, plain"):
        get_template("chatml")
