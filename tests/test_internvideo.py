"""InternVideo2.5-Chat in its published remote-code layout (InternVLChatModel with InternLM2):
make-checkpoint writes that layout, it loads onto native transformers classes without running any
of the checkpoint's code, InternLM2's packed weights give the logits of InternLM2's own equations,
and clips run through the benchmark with token-merged frames."""
import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from bench.cli import run_main
from bench.errors import UsageError
from bench.models.internvideo import FRAME_TOKENS
from bench.models.loader import build_preset, load_checkpoint, read_checkpoint_config, save_checkpoint
from bench.models.presets import get_preset
from bench.models.source import ModelSource
from bench.models.token_merge import merge_schedule, merge_tokens
from bench.models.visual import VisualInput
from tests.conftest import assert_answers_as_built

CPU = torch.device("cpu")
CODE_FILES = ("modeling_internvl_chat_hico2.py", "configuration_internvl_chat.py", "modeling_internlm2.py",
              "configuration_internlm2.py", "tokenization_internlm2.py")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """tiny-internvideo written as published, with the remote code it names replaced by files that
    raise when imported."""
    out = tmp_path_factory.mktemp("internvideo") / "tiny-internvideo"
    save_checkpoint(build_preset("tiny-internvideo", None, CPU, torch.float32), out)
    for name in CODE_FILES:
        (out / name).write_text("raise RuntimeError('checkpoint code was executed')\n")
    return out


def _no_checkpoint_code(ckpt):
    loaded = [m for m in sys.modules.values() if str(getattr(m, "__file__", "") or "").startswith(str(ckpt))]
    assert not loaded and not any(n.split(".")[-1] in {c[:-3] for c in CODE_FILES} for n in sys.modules)


def test_written_as_published(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"] and "auto_map" in config
    assert config["llm_config"]["model_type"] == "internlm2" and config["template"] == "internvl2_5"
    assert config["llm_config"]["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    names = set(load_file(str(ckpt / "model.safetensors")))
    assert {"language_model.model.tok_embeddings.weight", "language_model.model.layers.1.attention.wqkv.weight",
            "language_model.model.layers.0.feed_forward.w3.weight", "language_model.output.weight",
            "vision_model.encoder.layers.0.attn.qkv.weight", "vision_model.embeddings.class_embedding",
            "mlp1.0.weight", "mlp1.3.bias"} <= names
    assert not any("q_proj" in n or n.startswith("model.") for n in names)
    assert read_checkpoint_config(ckpt)[0] == "internvideo"


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def internlm2_reference(w: dict, llm: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2's forward from its published equations, on the checkpoint's raw tensors."""
    heads, kv, hidden = llm["num_attention_heads"], llm["num_key_value_heads"], llm["hidden_size"]
    d, groups, eps, n = hidden // heads, heads // kv, llm["rms_norm_eps"], ids.shape[0]
    pre = "language_model.model."
    x = w[pre + "tok_embeddings.weight"][ids]
    inv = 1.0 / llm["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.outer(torch.arange(n, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(llm["num_hidden_layers"]):
        p = f"{pre}layers.{i}."
        h = _rms(x, w[p + "attention_norm.weight"], eps)
        qkv = (h @ w[p + "attention.wqkv.weight"].T).reshape(n, kv, groups + 2, d)  # (h gs d)
        q = qkv[:, :, :groups].reshape(n, heads, d).transpose(0, 1)
        k = qkv[:, :, -2].transpose(0, 1).repeat_interleave(groups, 0)
        v = qkv[:, :, -1].transpose(0, 1).repeat_interleave(groups, 0)
        q, k = q * cos + _rotate(q) * sin, k * cos + _rotate(k) * sin
        att = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5 + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(n, hidden) @ w[p + "attention.wo.weight"].T
        h = _rms(x, w[p + "ffn_norm.weight"], eps)
        x = x + (F.silu(h @ w[p + "feed_forward.w1.weight"].T) * (h @ w[p + "feed_forward.w3.weight"].T)) \
            @ w[p + "feed_forward.w2.weight"].T
    return _rms(x, w[pre + "norm.weight"], eps) @ w["language_model.output.weight"].T


def test_internlm2_mapping_gives_internlm2_logits(ckpt):
    adapter = load_checkpoint(ckpt, None, CPU, torch.float32)
    assert adapter.weights == "random" and adapter.family == "internvideo"
    llm = json.loads((ckpt / "config.json").read_text())["llm_config"]
    ids = torch.tensor([1, 50, 7, 300, 605, 22, 9, 410, 3, 77, 120, 5])
    with torch.no_grad():
        ours = adapter.model(input_ids=ids[None]).logits[0]
        ref = internlm2_reference(load_file(str(ckpt / "model.safetensors")), llm, ids)
    assert ours.shape == (len(ids), llm["vocab_size"])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    _no_checkpoint_code(ckpt)


def test_clip_prompt_has_labelled_merged_frames(ckpt):
    adapter = load_checkpoint(ckpt, None, CPU, torch.float32)
    clip = VisualInput(tuple(Image.new("RGB", (64, 48), (30 * i, 0, 0)) for i in range(8)), video=True)
    prepared = adapter.prepare(clip, "What happens?")
    assert prepared.image_tokens == [1] * 8  # tiny-internvideo: 4 tokens per frame merged to 1
    ids = [t for s in prepared.text_segments for t in s] + prepared.suffix_ids
    text = adapter.tokenizer.decode(ids).replace(" ", "")  # the tiny tokenizer's decoder spaces special tokens
    assert text.startswith("<s><|im_start|>system\n") and "Frame1:<img></img>\nFrame2:<img>" in text
    assert text.endswith("Whathappens?<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        embeds = adapter.encode_image(adapter.pixels_to_device(prepared))
    assert embeds.shape == (1, 8, 64)
    with pytest.raises(UsageError, match="multiple of 4"):
        adapter.prepare_text("q", VisualInput(clip.images[:6], video=True))


def test_clip_runs_through_the_benchmark(ckpt, frames, tmp_path):
    out = tmp_path / "run"
    rc = run_main(["--model-path", str(ckpt), "--frames-dir", str(frames), "--num-frames", "8", "--video-mode",
                   "clip", "--variants", "prefix", "--max-new-tokens", "3", "--num-runs", "2", "--min-seconds", "0",
                   "--warmup", "1", "--output-dir", str(out)])
    assert rc == 0
    import csv

    with open(out / "runs.csv", newline="") as f:
        measured = [r for r in csv.DictReader(f) if r["kind"] == "measured"]
    assert measured and all(r["token_agree"] != "" for r in measured)
    assert any(r["cache_hit"] == "true" for r in measured if r["cache_state"] == "warm")
    _no_checkpoint_code(ckpt)


def test_awq4_calibrates_and_probes_in_groups_of_four_images(ckpt, tmp_path, capsys):
    """A model that merges every 4 frames takes images in fours: by default a request shows 4 (the
    image and 3 derived from it), and AWQ's calibration requests and the fidelity probe show 4
    too; --num-images 1 is a one-line usage error naming the flags, before the model loads,
    nothing written."""
    import csv

    pytest.importorskip("torchao")
    out = tmp_path / "run"
    args = ["--model-path", str(ckpt), "--variants", "fp16,awq4", "--engine", "static", "--max-new-tokens", "3",
            "--num-runs", "1", "--min-seconds", "0", "--warmup", "0", "--int4-group-size", "32",
            "--int4-cache-dir", "", "--awq-calib", "2"]
    assert run_main([*args, "--output-dir", str(out)]) == 0
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows if r["status"] == "ok"} == {"fp16+static", "awq4+static"}
    assert all(r["token_agree"] != "" and r["num_images"] == "4" for r in rows)
    capsys.readouterr()
    assert run_main([*args, "--num-images", "1", "--output-dir", str(tmp_path / "one")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--num-images 4" in err and not (tmp_path / "one").exists()


def test_frames_mode_is_refused_in_one_line_naming_clip_mode(ckpt, frames, tmp_path, capsys):
    """--video-mode frames shows one frame per request, which a model merging every 4 frames cannot
    take: one line naming --video-mode clip (not --num-images, which video input refuses), exit 2,
    nothing written."""
    out = tmp_path / "frames"
    rc = run_main(["--model-path", str(ckpt), "--frames-dir", str(frames), "--num-frames", "8", "--video-mode",
                   "frames", "--variants", "fp16", "--engine", "static", "--max-new-tokens", "2", "--num-runs", "1",
                   "--min-seconds", "0", "--warmup", "0", "--output-dir", str(out)])
    last = capsys.readouterr().err.strip()
    assert rc == 2 and last.startswith("error: ") and "\n" not in last and "not 1 " in last and not out.exists()
    assert "--video-mode clip with --num-frames a multiple of 4" in last


def test_unmappable_remote_config_is_refused_in_one_line(ckpt, frames, tmp_path, capsys):
    bad = tmp_path / "qwen-llm"
    shutil.copytree(ckpt, bad)
    config = json.loads((bad / "config.json").read_text())
    config["llm_config"]["model_type"] = "qwen2"
    (bad / "config.json").write_text(json.dumps(config))
    rc = run_main(["--model-path", str(bad), "--frames-dir", str(frames), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "'qwen2'" in err and "-hf layout" in err
    assert not (tmp_path / "o").exists()


def test_token_merging_averages_the_most_similar_tokens():
    assert merge_schedule(4 * 256, 4 * FRAME_TOKENS) == [512, 256, 128, 64]  # the real model: 16 per frame
    base = torch.randn(1, 4, 8)
    x = base.repeat_interleave(2, dim=1)  # every token has an exact twin: one step merges the twins
    merged = merge_tokens(x, 4, heads=2)
    torch.testing.assert_close(merged, base)
    # A = tokens 0, 2; B = tokens 1, 3. Token 0 points the way token 3 does (cosine 1): it is the one
    # merged (averaged into token 3); token 2 stays, first, then B.
    x = torch.tensor([[[1.0, 0], [1, 0.1], [0, 1], [5, 0]]])
    torch.testing.assert_close(merge_tokens(x, 3, heads=1), torch.tensor([[[0.0, 1], [1, 0.1], [3, 0]]]))



def test_token_merging_sums_several_tokens_into_one_match_exactly():
    """Three A tokens match one B token: their size-weighted mean, with no scatter (whose CUDA
    atomics add in no fixed order) in the way; repeated calls are identical."""
    x = torch.tensor([[[1.0, 0], [1, 0], [1, 0.01], [0, 1], [1, 0.02], [0, 2], [0.5, -1], [0, 4]]])
    # A = 0, 2, 4, 6; B = 1, 3, 5, 7. A 0, 2 and 4 point along B 1 and are merged into it; A 6
    # matches nothing well and stays (first), then B.
    merged = merge_tokens(x, 5, heads=1)
    expected = torch.tensor([[[0.5, -1], [1, 0.0075], [0, 1], [0, 2], [0, 4]]])  # (0+0+.01+.02)/4
    torch.testing.assert_close(merged, expected)
    assert all(torch.equal(merge_tokens(x, 5, heads=1), merged) for _ in range(3))


def test_preset_geometry():
    p = get_preset("internvideo2.5-8b")
    assert (p.llm.hidden, p.llm.mlp, p.llm.layers, p.llm.heads, p.llm.kv_heads, p.llm.vocab) == \
        (4096, 14336, 32, 32, 8, 92553)
    assert (p.llm.rope_theta, p.llm.rms_norm_eps, p.llm.max_pos) == (1e6, 1e-5, 32768)
    assert (p.vision.hidden, p.vision.layers, p.vision.image_size, p.vision.patch) == (1024, 24, 448, 14)
    assert p.tokenizer_base_vocab + len(p.special_tokens) == p.llm.vocab
    assert p.special_tokens.index("<IMG_CONTEXT>") + p.tokenizer_base_vocab == 92546


def test_published_sentencepiece_tokenizer_loads_without_its_code(ckpt, tmp_path):
    """As published: tokenizer.model with a tokenizer_config.json naming InternLM2Tokenizer (auto_map)."""
    from bench.models.sentencepiece_files import write_sentencepiece

    sp = tmp_path / "sp"
    shutil.copytree(ckpt, sp)
    write_sentencepiece(sp, keep_json=False)
    config = json.loads((sp / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="InternLM2Tokenizer",
                  auto_map={"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]})
    (sp / "tokenizer_config.json").write_text(json.dumps(config))
    a, b = (load_checkpoint(d, None, CPU, torch.float32) for d in (sp, ckpt))
    clip = VisualInput(tuple(Image.new("RGB", (60, 40)) for _ in range(4)), video=True)
    pa, pb = (x.prepare_text("Describe the image in detail.", clip) for x in (a, b))
    assert not (sp / "tokenizer.json").exists()
    assert (pa.text_segments, pa.suffix_ids) == (pb.text_segments, pb.suffix_ids)
    _no_checkpoint_code(sp)


def test_sharded_checkpoint_loads_the_same_weights(ckpt, tmp_path):
    adapter = build_preset("tiny-internvideo", None, CPU, torch.float32)
    save_checkpoint(adapter, tmp_path / "sharded", "40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "language_model.model.layers.0.attention.wqkv.weight" in index["weight_map"]
    ids = torch.tensor([[1, 40, 500, 7]])
    a, b = (load_checkpoint(d, None, CPU, torch.float32) for d in (tmp_path / "sharded", ckpt))
    with torch.no_grad():
        torch.testing.assert_close(a.model(input_ids=ids).logits, b.model(input_ids=ids).logits)


@pytest.mark.parametrize("change,needle", [
    (lambda c: c["llm_config"].update(num_hidden_layers=3), "layers.2.attention.wqkv.weight' is missing"),
    (lambda c: c["llm_config"].update(num_key_value_heads=4), "the config implies [192, 64]"),
    (lambda c: c["vision_config"].update(qk_normalization=True), "qk_normalization"),
    (lambda c: c["llm_config"].update(rope_scaling={"type": "yarn", "factor": 2}), "not one of dynamic, linear"),
])
def test_config_the_weights_do_not_fit_is_refused_before_loading(ckpt, tmp_path, change, needle):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    config = json.loads((bad / "config.json").read_text())
    change(config)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError) as e:
        read_checkpoint_config(bad)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_answers_as_the_model_it_was_written_from(ckpt):
    """The layout's renaming and qkv packing lose nothing: vision features and greedy logits of a
    clip prompt equal those of the in-memory model make-checkpoint wrote."""
    clip = VisualInput(tuple(Image.new("RGB", (64, 48), (40 * i, 200, 9 * i)) for i in range(4)), video=True)
    loaded, logits = assert_answers_as_built("tiny-internvideo", ckpt, clip, "What happens?")
    assert logits.shape[1] == loaded.prepare_text("What happens?", clip).prompt_tokens


def test_internvl2_5_remote_layout_runs_unmerged(ckpt, tmp_path):
    """The same layout with InternVL2.5's own model code named (no token merging): tiles of all
    their tokens, any frame count, still images tiled."""
    plain = tmp_path / "internvl2_5"
    shutil.copytree(ckpt, plain)
    config = json.loads((plain / "config.json").read_text())
    config.pop("bench_frame_tokens")
    config["auto_map"] = {k: v.replace("_hico2", "") for k, v in config["auto_map"].items()}
    (plain / "config.json").write_text(json.dumps(config))
    adapter = load_checkpoint(plain, None, CPU, torch.float32, max_tiles=12)
    # --max-tiles applies here (still images tiled), not to the merging layout it was copied from
    assert ModelSource(str(plain), None, None, max_tiles=4).max_tiles_warning() is None
    assert ModelSource(str(ckpt), None, None, max_tiles=4).max_tiles_warning().endswith("takes each image whole")
    clip = VisualInput(tuple(Image.new("RGB", (64, 48), (40 * i, 0, 0)) for i in range(3)), video=True)
    prepared = adapter.prepare(clip, "What happens?")
    assert prepared.image_tokens == [4] * 3  # 56 px tiles: 4x4 patches pixel-shuffled to 4 tokens
    with torch.no_grad():
        assert adapter.encode_image(adapter.pixels_to_device(prepared)).shape == (1, 12, 64)
    wide = Image.new("RGB", (200, 100))
    assert adapter.tiles(wide) > 1 and adapter.prepare_text("q", wide).image_tokens == [4 * adapter.tiles(wide)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scatter_add's atomics)")
def test_token_merging_is_deterministic_on_cuda():
    """The real model's merge (4 frames x 256 tokens down to 64) gives the same tokens every call
    in fp16, though many A tokens share a match."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4 * 256, 1024, generator=g).half().cuda()
    first = merge_tokens(x, 4 * FRAME_TOKENS, heads=16)
    assert all(torch.equal(merge_tokens(x, 4 * FRAME_TOKENS, heads=16), first) for _ in range(5))
