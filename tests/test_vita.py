"""VITA-1.5 in its published layout (VITAQwen2ForCausalLM): make-checkpoint writes it, it loads onto
native transformers classes without running checkpoint code and without the audio encoder, its
feature path is VITA's (features x 0.5, pixel shuffle, mlp2x_gelu), and images and clips run
through the benchmark."""
import csv
import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from bench.cli import run_main
from bench.errors import UsageError
from bench.models.loader import build_preset, load_checkpoint, read_checkpoint_config, save_checkpoint
from bench.models.visual import VisualInput
from tests.conftest import assert_answers_as_built

CPU = torch.device("cpu")
AUDIO = {"model.audio_encoder.encoder.enc.0.core.conv.0.weight": torch.randn(8, 1, 3, 3),
         "model.audio_encoder.adpter.project.weight": torch.randn(64, 16)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """tiny-vita written as published, plus audio-encoder tensors and a .py file that raises when
    imported."""
    out = tmp_path_factory.mktemp("vita") / "tiny-vita"
    save_checkpoint(build_preset("tiny-vita", None, CPU, torch.float32), out)
    state = load_file(str(out / "model.safetensors"))
    save_file({**state, **AUDIO}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "modeling_vita_qwen2.py").write_text("raise RuntimeError('checkpoint code was executed')\n")
    return out


def test_written_as_published(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["VITAQwen2ForCausalLM"] and config["mm_projector_type"] == "mlp2x_gelu"
    assert config["mm_hidden_size"] == 4 * 64
    names = set(load_file(str(ckpt / "model.safetensors")))
    assert {"model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight",
            "lm_head.weight", "model.vision_tower.vision_tower.embeddings.class_embedding",
            "model.vision_tower.vision_tower.encoder.layers.0.attn.qkv.weight",
            "model.vision_tower.vision_tower.encoder.layers.1.ls2", "model.mm_projector.0.weight",
            "model.mm_projector.2.bias"} <= names
    assert not any("language_model" in n or "multi_modal_projector" in n or "mm_projector.1" in n for n in names)
    assert read_checkpoint_config(ckpt)[0] == "vita"


def test_feature_path_is_vitas_and_audio_is_ignored(ckpt):
    """Loaded features = mlp2x_gelu(pixel_shuffle(0.5 x InternViT's last hidden state without CLS))
    with the file's projector tensors; the audio tensors in the file load nowhere."""
    a = load_checkpoint(ckpt, None, CPU, torch.float32)
    raw = load_file(str(ckpt / "model.safetensors"))
    image = VisualInput((Image.new("RGB", (56, 56), (200, 30, 90)),), video=False)
    prepared = a.prepare(image, "What is it?")
    assert prepared.image_tokens == [4]  # one 56-px tile: 4x4 patches shuffled to 2x2
    with torch.no_grad():
        pixels = a.pixels_to_device(prepared)
        ours = a.encode_image(pixels)
        feats = a.model.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
        x = a.model.model.pixel_shuffle(0.5 * feats.reshape(1, 4, 4, -1), scale_factor=0.5).reshape(1, 4, -1)
        x = F.linear(x, raw["model.mm_projector.0.weight"], raw["model.mm_projector.0.bias"])
        ref = F.linear(F.gelu(x), raw["model.mm_projector.2.weight"], raw["model.mm_projector.2.bias"])
    torch.testing.assert_close(ours, ref)
    assert not any("audio" in k for k in a.model.state_dict())
    assert not [m for m in sys.modules if "vita_qwen2" in m]


def _decode(adapter, ids):  # the tiny tokenizer's decoder writes a space after special tokens
    return adapter.tokenizer.decode(ids).replace("|> ", "|>")


def test_prompt_has_one_image_per_tile_before_the_question(ckpt):
    a = load_checkpoint(ckpt, None, CPU, torch.float32, max_tiles=12)
    wide = Image.new("RGB", (200, 100))
    tiles = a.tiles(wide)
    prepared = a.prepare_text("What is it?", wide)
    assert tiles > 1 and prepared.image_tokens == [4 * tiles]
    head, after = (_decode(a, s) for s in prepared.text_segments)
    assert head.startswith("<|im_start|>system\nYou are an AI robot and your name is VITA.")
    assert head.endswith("Please note that you are seeing the image, not the video.<|im_end|>\n<|im_start|>user\n")
    assert after == "\n"
    assert a.tokenizer.decode(prepared.suffix_ids).replace(" ", "") == "Whatisit?<|im_end|>\n<|im_start|>assistant\n"
    clip = a.prepare_text("q", VisualInput(tuple(Image.new("RGB", (64, 48)) for _ in range(3)), video=True))
    assert clip.image_tokens == [4, 4, 4] and clip.text_segments[1:] == [[], [], prepared.text_segments[1]]
    assert _decode(a, clip.text_segments[0]).endswith("seeing the video, not the image.<|im_end|>\n"
                                                               "<|im_start|>user\n")


def test_checkpoint_answers_as_the_model_it_was_written_from(ckpt):
    image = VisualInput((Image.new("RGB", (120, 60), (40, 200, 9)),), video=False)
    assert_answers_as_built("tiny-vita", ckpt, image, "What is it?")


@pytest.mark.parametrize("media", ["image", "clip"])
def test_runs_through_the_benchmark(ckpt, frames, tmp_path, media):
    out = tmp_path / "run"
    visual = (["--image-path", str(frames / "frame_000.png")] if media == "image"
              else ["--frames-dir", str(frames), "--num-frames", "4", "--video-mode", "clip"])
    rc = run_main(["--model-path", str(ckpt), *visual, "--variants", "prefix", "--max-new-tokens", "3",
                   "--num-runs", "2", "--min-seconds", "0", "--warmup", "1", "--output-dir", str(out)])
    assert rc == 0
    with open(out / "runs.csv", newline="") as f:
        measured = [r for r in csv.DictReader(f) if r["kind"] == "measured"]
    assert measured and all(r["token_agree"] != "" for r in measured)
    assert not [m for m in sys.modules if "vita_qwen2" in m]


@pytest.mark.parametrize("change, needle", [
    (lambda c, s: c.update(mm_projector_type="ldp"), "'ldp'"),
    (lambda c, s: [s.pop(k) for k in list(s) if "vision_tower" in k], "no InternViT vision tower"),
    (lambda c, s: s.update({"model.speech_head.weight": torch.zeros(2)}), "'model.speech_head.weight'"),
    (lambda c, s: c.update(hidden_size=32), "shape"),
])
def test_bad_layouts_are_refused_in_one_line(ckpt, frames, tmp_path, capsys, change, needle):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    config, state = json.loads((bad / "config.json").read_text()), load_file(str(bad / "model.safetensors"))
    change(config, state)
    (bad / "config.json").write_text(json.dumps(config))
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    rc = run_main(["--model-path", str(bad), "--frames-dir", str(frames), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and needle in err, err
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError):
        read_checkpoint_config(bad)


def test_sharded_checkpoint_loads_the_same_weights(ckpt, tmp_path):
    built = build_preset("tiny-vita", None, CPU, torch.float32)
    save_checkpoint(built, tmp_path / "sharded", "100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    a, b = (load_checkpoint(d, None, CPU, torch.float32).model.state_dict() for d in (ckpt, tmp_path / "sharded"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
