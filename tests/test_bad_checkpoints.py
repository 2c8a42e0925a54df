"""Broken checkpoints are one-line usage errors (exit 2, nothing written); the int4 cache is keyed
by everything that made the model and checked on load; every variant runs on every tiny preset."""
import csv
import json
import shutil
import struct

import pytest
import torch

from bench.cli import run_main
from tests.conftest import DEMO

RUN = ["--device", "cpu", "--num-runs", "1", "--warmup", "0", "--no-fidelity", "--max-new-tokens", "4"]


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _truncate(f, keep=None):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _garbage(f):
    f.write_bytes(b"\x89PNG not a safetensors file at all" * 10)


def _rewrite_tensors(f, change):
    """Rewrite a safetensors file with `change(dict of tensors)` applied."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def _shard(d):
    """Split model.safetensors into two shards with an index (save_pretrained's layout)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _first_key(f, contains):
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        return next(k for k in h.keys() if contains in k)


def _llm(d, family):
    return d / "llm" if family == "vila" else d


# Each case: (family, what it breaks, how). `how(d)` breaks the copied checkpoint d in place.
def _missing_shard(d, family):
    folder = _shard(_llm(d, family))
    (folder / "model-00002-of-00002.safetensors").unlink()


def _zero_byte(d, family):
    (_llm(d, family) / "model.safetensors").write_bytes(b"")


def _config_list(d, family):
    (d / "config.json").write_text("[1, 2]")


def _config_null(d, family):
    (d / "config.json").write_text("null")


def _config_not_utf8(d, family):
    (d / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')


def _no_preprocessor(d, family):
    (d / "vision_tower" if family == "vila" else d).joinpath("preprocessor_config.json").unlink()


def _no_tokenizer(d, family):
    folder = _llm(d, family)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"):
        if (folder / name).exists():
            (folder / name).unlink()


def _shape_mismatch(d, family):
    f = _llm(d, family) / "model.safetensors"
    key = _first_key(f, "embed_tokens")
    _rewrite_tensors(f, lambda t: t.__setitem__(key, torch.zeros(t[key].shape[0] + 3, t[key].shape[1])))


def _missing_tensor(d, family):
    f = _llm(d, family) / "model.safetensors"
    key = _first_key(f, "layers.1.mlp.down_proj")
    _rewrite_tensors(f, lambda t: t.pop(key))


def _header_past_end(d, family):
    # A header that claims more data than the file holds (a tensor's offsets past the end).
    f = _llm(d, family) / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    f.write_bytes(data[: 8 + n + 16])


def _vila_no_projector_weights(d, family):
    (d / "mm_projector" / "model.safetensors").unlink()


def _vila_pickle_llm(d, family):
    from safetensors.torch import load_file

    f = d / "llm" / "model.safetensors"
    torch.save(load_file(str(f)), d / "llm" / "pytorch_model.bin")
    f.unlink()


def _vila_pickle_projector(d, family):
    from safetensors.torch import load_file

    f = d / "mm_projector" / "model.safetensors"
    torch.save(load_file(str(f)), d / "mm_projector" / "pytorch_model.bin")
    f.unlink()


def _vila_projector_config_list(d, family):
    (d / "mm_projector" / "config.json").write_text("[]")


def _vila_projector_config_type(d, family):
    (d / "mm_projector" / "config.json").write_text(json.dumps({"mm_projector_type": "linear"}))


def _vila_projector_shape(d, family):
    f = d / "mm_projector" / "model.safetensors"
    _rewrite_tensors(f, lambda t: t.__setitem__("layers.4.weight", torch.zeros(5, 5)))


def _vila_projector_missing_tensor(d, family):
    _rewrite_tensors(d / "mm_projector" / "model.safetensors", lambda t: t.pop("layers.4.bias"))


def _vila_vision_truncated(d, family):
    _truncate(d / "vision_tower" / "model.safetensors")


def _tokenizer_garbage(d, family):
    (_llm(d, family) / "tokenizer.json").write_text("{garbage")


def _tokenizer_empty_object(d, family):
    (_llm(d, family) / "tokenizer.json").write_text("{}")


def _preprocessor_list(d, family):
    (d / "vision_tower" if family == "vila" else d).joinpath("preprocessor_config.json").write_text("[]")


def _preprocessor_unknown_class(d, family):
    (d / "vision_tower" if family == "vila" else d).joinpath("preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "NoSuchProcessor"}))


def _index_garbage(d, family):
    folder = _shard(_llm(d, family))
    (folder / "model.safetensors.index.json").write_text("nope")


def _config_bad_field(d, family):
    f = _llm(d, family) / "config.json"
    cfg = json.loads(f.read_text())
    if "text_config" in cfg:
        cfg["text_config"]["hidden_size"] = "abc"
    else:
        cfg["hidden_size"] = "abc"
    f.write_text(json.dumps(cfg))


def _layers_past_the_weights(d, family):
    # a config that claims a million layers: refused, never built (not even on the meta device)
    f = _llm(d, family) / "config.json"
    cfg = json.loads(f.read_text())
    (cfg.get("text_config") or cfg)["num_hidden_layers"] = 10**6
    f.write_text(json.dumps(cfg))


def _preprocessor_size(side):
    def change(d, family):
        f = (d / "vision_tower" if family == "vila" else d) / "preprocessor_config.json"
        cfg = json.loads(f.read_text())
        cfg["size"] = {"height": side, "width": side} if isinstance(cfg.get("size"), dict) and "height" in cfg["size"] \
            else {"shortest_edge": side}
        f.write_text(json.dumps(cfg))
    change.__name__ = f"_preprocessor_size_{side}"
    return change


def _set_text_config(key, value):
    def change(d, family):
        f = _llm(d, family) / "config.json"
        cfg = json.loads(f.read_text())
        (cfg.get("text_config") or cfg)[key] = value
        f.write_text(json.dumps(cfg))  # NaN is written as the literal NaN, which json reads back
    change.__name__ = f"_{key}_{value}"
    return change


def _architectures_wrong(d, family):
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (d / "config.json").write_text(json.dumps(cfg))


def _embedding_stored_as_int32(d, family):
    f = _llm(d, family) / "model.safetensors"
    key = _first_key(f, "embed_tokens")
    _rewrite_tensors(f, lambda t: t.__setitem__(key, t[key].to(torch.int32)))


def _unexpected_tensor(d, family):
    _rewrite_tensors(_llm(d, family) / "model.safetensors", lambda t: t.__setitem__("model.extra.weight", torch.zeros(3)))


def _vila_part_config_null(d, family):
    (d / "llm" / "config.json").write_text("null")


def _vila_vision_no_config(d, family):
    (d / "vision_tower" / "config.json").unlink()


ALL = ("llava", "vila", "internvl")
CASES = [(fam, fn) for fn in (_missing_shard, _zero_byte, _config_list, _config_null, _config_not_utf8,
                              _no_preprocessor, _no_tokenizer, _shape_mismatch, _missing_tensor, _header_past_end,
                              _tokenizer_garbage, _tokenizer_empty_object, _preprocessor_list,
                              _preprocessor_unknown_class, _index_garbage, _config_bad_field,
                              _layers_past_the_weights, _preprocessor_size(60_000), _preprocessor_size(0),
                              _set_text_config("rms_norm_eps", float("nan")),
                              _set_text_config("num_attention_heads", -4),
                              _set_text_config("max_position_embeddings", 0), _architectures_wrong,
                              _embedding_stored_as_int32)
         for fam in ALL]
CASES += [(fam, lambda d, family: _truncate(_llm(d, family) / "model.safetensors")) for fam in ALL]
CASES += [(fam, lambda d, family: _garbage(_llm(d, family) / "model.safetensors")) for fam in ALL]
CASES += [("vila", fn) for fn in (_vila_no_projector_weights, _vila_pickle_llm, _vila_pickle_projector,
                                  _vila_projector_config_list, _vila_projector_config_type, _vila_projector_shape,
                                  _vila_projector_missing_tensor, _vila_vision_truncated, _vila_part_config_null,
                                  _vila_vision_no_config)]
def _llava_image_token_past_vocab(d, family):
    cfg = json.loads((d / "config.json").read_text())
    cfg["image_token_index"] = 10**6
    (d / "config.json").write_text(json.dumps(cfg))


def _llava_nan_weights(d, family):  # found once the weights are loaded: still refused, nothing written
    f = d / "model.safetensors"
    key = _first_key(f, "embed_tokens")
    _rewrite_tensors(f, lambda t: t.__setitem__(key, torch.full_like(t[key], float("nan"))))


def _vila_model_type_wrong(d, family):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (d / "config.json").write_text(json.dumps(cfg))


def _top_set(key, value):
    def change(d, family):
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
    change.__name__ = f"_{key}_{value}"
    return change


def _top_del(key):
    def change(d, family):
        cfg = json.loads((d / "config.json").read_text())
        del cfg[key]
        (d / "config.json").write_text(json.dumps(cfg))
    change.__name__ = f"_{key}_deleted"
    return change


CASES += [("llava", _llava_image_token_past_vocab), ("vila", _vila_model_type_wrong)]
# an image token id the tokenizer does not give the placeholder (left out: the class default, past
# the tiny vocabulary): every request's prompt held no image token, so every row failed
CASES += [("llava", _top_set("image_token_index", 5)), ("internvl", _top_set("image_token_id", 5)),
          ("llava", _top_del("image_token_index")), ("internvl", _top_del("image_token_id"))]
# a vision layer past the tower's hidden states, or not one: a failed row (IndexError, TypeError) before
CASES += [("vila", _top_set("mm_vision_select_layer", v)) for v in (-99, 10, "x", [-2, -1])]
CASES += [("vila", _top_set("mm_vision_select_feature", "cls")), ("llava", _top_set("vision_feature_layer", 40))]
CASES += [("internvl", _top_set("vision_feature_layer", [-1, -2]))]  # the adapters index with one layer
CASES += [(fam, lambda d, family: (d / "model.safetensors").rename(d / "pytorch_model.bin"))
          for fam in ("llava", "internvl")]


def _id(case):
    fam, fn = case
    return f"{fam}-{getattr(fn, '__name__', 'fn').strip('_')}"


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{_id(c)}" for i, c in enumerate(CASES)])
def test_broken_checkpoint_is_one_line_usage_error(case, checkpoint_dirs, tmp_path, capsys):
    family, breaks = case
    d = _copy(checkpoint_dirs[family], tmp_path)
    breaks(d, family)
    out = tmp_path / "out"
    rc = run_main(["--model-path", str(d), *RUN, "--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert str(d) in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("part", ["vision_tower", "mm_projector", "llm"])
def test_a_vila_checkpoint_without_a_part_folder_names_it(part, checkpoint_dirs, tmp_path, capsys):
    import shutil

    d = _copy(checkpoint_dirs["vila"], tmp_path)
    shutil.rmtree(d / part)
    out = tmp_path / "out"
    assert run_main(["--model-path", str(d), *RUN, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model-path {d}: a VILA checkpoint without {part}/ ") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("family,breaks", [(fam, _unexpected_tensor) for fam in ALL] + [("llava", _llava_nan_weights)],
                         ids=[f"{fam}-unexpected_tensor" for fam in ALL] + ["llava-nan_weights"])
def test_broken_checkpoint_found_once_loaded(family, breaks, checkpoint_dirs, tmp_path, capsys):
    """What transformers' loading reports (a tensor the model does not have, less the names its
    class declares ignorable) and weight values: a one-line usage error after the progress lines,
    nothing written."""
    d = _copy(checkpoint_dirs[family], tmp_path)
    breaks(d, family)
    out = tmp_path / "out"
    rc = run_main(["--model-path", str(d), *RUN, "--output-dir", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert rc == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and errors[0].startswith("error: ") and str(d) in errors[0], err
    assert not out.exists()


def test_intact_copies_still_load(checkpoint_dirs, tmp_path):
    from bench.models.loader import read_checkpoint_config

    for family, src in checkpoint_dirs.items():
        assert read_checkpoint_config(_copy(src, tmp_path / family))[0] == family
        d = _shard(_llm(_copy(src, tmp_path / f"{family}-sharded"), family))
        assert read_checkpoint_config(d.parent if family == "vila" else d)[0] == family


# ------------------------------------------------------------------------------- int4 cache
def _rtn_options(cache, **extra):
    from variants import parse_variant

    v = parse_variant("rtn4")
    return v, v.weights.options({"int4_cache_dir": str(cache), "seed": 0, "image_path": str(DEMO), **extra})


def test_int4_key_covers_checkpoint_template_and_tiling(tiny_internvl_dir, tmp_path):
    import os

    from bench.models.source import ModelSource
    from bench.models.templates import get_template
    from variants import parse_variant

    d = _copy(tiny_internvl_dir, tmp_path)
    v = parse_variant("awq4")
    opts = v.weights.options({"int4_cache_dir": str(tmp_path / "c"), "seed": 0, "image_path": str(DEMO)})
    q = opts.quantization("awq")
    source = ModelSource(str(d), None, None)
    adapter = source.load(torch.device("cpu"), torch.float32)

    def key(a=adapter, s=source, digest="x"):
        return v.weights._saved_path(opts, a, q, digest, s)

    base = key()
    assert key() == base
    assert key(digest="y") != base  # calibration images
    original = adapter.template
    adapter.template = get_template("vicuna_v1")
    assert key() != base  # conversation template
    adapter.template = original
    adapter.max_tiles = 1
    assert key() != base  # tiling
    adapter.max_tiles = 12
    assert key() == base
    f = d / "model.safetensors"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert key() != base  # the checkpoint's weights changed
    # rtn4: dtype and group size are in the key; the preset's seed too
    rv, ropts = _rtn_options(tmp_path / "c")
    p0 = ModelSource(None, "tiny-llava", None, seed=0).load(torch.device("cpu"), torch.float32)
    p1 = ModelSource(None, "tiny-llava", None, seed=1).load(torch.device("cpu"), torch.float32)
    rq = ropts.quantization("rtn")
    assert rv.weights._saved_path(ropts, p0, rq, "") != rv.weights._saved_path(ropts, p1, rq, "")


@pytest.mark.parametrize("damage", ["flip", "truncate", "zero"])
def test_tampered_int4_file_is_rebuilt_with_a_warning(tmp_path, capsys, damage):
    from bench.models.source import ModelSource
    from bench.quant.store import read_int4_file

    cache = tmp_path / "cache"
    v, opts = _rtn_options(cache)
    first = v.weights.load(ModelSource(None, "tiny-llava", None), torch.device("cpu"), torch.float32, opts)
    assert first.facts["quant_source"] == "quantized in this run"
    (saved,) = cache.glob("*.safetensors")
    read_int4_file(saved)  # checksum verifies
    data = bytearray(saved.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF  # one byte of tensor data
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = b""
    saved.write_bytes(bytes(data))
    capsys.readouterr()
    second = v.weights.load(ModelSource(None, "tiny-llava", None), torch.device("cpu"), torch.float32, opts)
    err = capsys.readouterr().err
    assert "warning" in err and "discarding the saved int4 model" in err and str(saved) in err
    assert second.facts["quant_source"] == "quantized in this run"
    read_int4_file(saved)  # rebuilt, whole again
    third = v.weights.load(ModelSource(None, "tiny-llava", None), torch.device("cpu"), torch.float32, opts)
    assert third.facts["quant_source"] == str(saved)


# ----------------------------------------------------------- every variant on every tiny preset
WEIGHTS = ("fp16", "bnb8", "bnb4", "bnb4-fp4", "awq4", "rtn4")


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-vila", "tiny-internvl"])
def test_every_weights_variant_runs_on_every_tiny_preset(preset, tmp_path):
    out = tmp_path / "out"
    rc = run_main(["--preset", preset, "--variants", ",".join(WEIGHTS), *RUN, "--min-seconds", "0",
                   "--awq-calib", "2", "--int4-cache-dir", "", "--output-dir", str(out)])
    assert rc == 0
    with open(out / "runs.csv", newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    for name in WEIGHTS:
        row = rows[name]
        if name.startswith("bnb") and row["status"] != "ok":  # bitsandbytes absent or without CPU kernels
            assert row["status"] == "skipped" and row["error"], row
            continue
        assert row["status"] == "ok", (name, row["error"])
    for name in ("awq4", "rtn4"):  # hidden 64 is not a multiple of the default group 128: 64 there
        assert rows[name]["quant_group_size"] == "64,128" and rows[name]["quant_dense_layers"] == "0"
        assert int(rows[name]["quantized_layers"]) == 14


def test_group_size_falls_back_per_layer():
    from bench.quant.int4 import layer_group_size

    assert layer_group_size(4096, 128) == 128
    assert layer_group_size(64, 128) == 64
    assert layer_group_size(96, 128) == 32
    assert layer_group_size(11008, 256) == 256
    assert layer_group_size(100, 128) is None  # stays dense
    assert layer_group_size(64, 32) == 32  # never coarser than asked


@pytest.mark.parametrize("family", ["llava", "vila"])
@pytest.mark.parametrize("damage", ["no-scales", "scales-shape"])
def test_broken_autoawq_checkpoint_is_one_line_usage_error(family, damage, checkpoint_dirs, tmp_path, capsys):
    from tests.test_int4 import write_autoawq_checkpoint

    d = write_autoawq_checkpoint(checkpoint_dirs[family], tmp_path / "awq", family)
    f = _llm(d, family) / "model.safetensors"
    key = _first_key(f, "layers.0.mlp.up_proj.scales")
    if damage == "no-scales":
        _rewrite_tensors(f, lambda t: t.pop(key))
    else:
        _rewrite_tensors(f, lambda t: t.__setitem__(key, t[key][:, :-8].contiguous()))
    out = tmp_path / "out"
    rc = run_main(["--model-path", str(d), *RUN, "--variants", "awq4", "--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "up_proj" in lines[0], err
    assert not out.exists()


# ------------------------------------------------- SentencePiece tokenizers and InternVideo2.5
@pytest.fixture(scope="module")
def vila_sentencepiece(tiny_vila_dir, tmp_path_factory):
    """tiny-vila with its llm/ tokenizer as VILA1.5 publishes it: tokenizer.model, no tokenizer.json."""
    from bench.models.sentencepiece_files import write_sentencepiece

    d = _copy(tiny_vila_dir, tmp_path_factory.mktemp("vila-sp"))
    write_sentencepiece(d / "llm", keep_json=False)
    return d


def _sp_garbage(d):
    (d / "llm" / "tokenizer.model").write_bytes(b"not a sentencepiece model " * 20)


def _sp_empty(d):  # transformers loads it as a tokenizer of the added tokens only
    (d / "llm" / "tokenizer.model").write_bytes(b"")


def _sp_a_folder(d):
    (d / "llm" / "tokenizer.model").unlink()
    (d / "llm" / "tokenizer.model").mkdir()


def _sp_config_only(d):
    (d / "llm" / "tokenizer.model").unlink()


@pytest.mark.parametrize("breaks,needle", [(_sp_garbage, "not a SentencePiece model"),
                                           (_sp_empty, "not a SentencePiece model"),
                                           (_sp_a_folder, "no tokenizer vocabulary"),
                                           (_sp_config_only, "no tokenizer vocabulary")],
                         ids=["garbage", "empty", "a-folder", "config-only"])
def test_broken_sentencepiece_tokenizer_is_one_line_usage_error(breaks, needle, vila_sentencepiece, tmp_path,
                                                                capsys):
    d = _copy(vila_sentencepiece, tmp_path)
    breaks(d)
    out = tmp_path / "out"
    rc = run_main(["--model-path", str(d), *RUN, "--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_internvideo_dir(tmp_path_factory):
    from bench.models.loader import build_preset, save_checkpoint

    out = tmp_path_factory.mktemp("internvideo") / "tiny-internvideo"
    save_checkpoint(build_preset("tiny-internvideo", None, torch.device("cpu"), torch.float32), out)
    return out


@pytest.mark.parametrize("frame_tokens", [None, "abc", 0, 10**6])
def test_internvideo_merge_past_the_frame_tokens_is_one_line_usage_error(frame_tokens, tiny_internvideo_dir,
                                                                          tmp_path, frames, capsys):
    """The merged tokens per frame must be what a frame gives or fewer (no key: the published 16,
    more than tiny-internvideo's 4), refused before loading, not a failed row at run time."""
    from bench.models.internvideo import FRAME_TOKENS_KEY

    d = _copy(tiny_internvideo_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop(FRAME_TOKENS_KEY)
    if frame_tokens is not None:
        cfg[FRAME_TOKENS_KEY] = frame_tokens
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    rc = run_main(["--model-path", str(d), *RUN, "--frames-dir", str(frames), "--num-frames", "4", "--video-mode",
                   "clip", "--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(d) in lines[0], err
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_vita_dir(tmp_path_factory):
    from bench.models.loader import build_preset, save_checkpoint

    out = tmp_path_factory.mktemp("vita") / "tiny-vita"
    save_checkpoint(build_preset("tiny-vita", None, torch.device("cpu"), torch.float32), out)
    return out


def _top_config(**changes):
    def change(d):
        cfg = json.loads((d / "config.json").read_text())
        for key, value in changes.items():
            inner = key not in cfg and key in cfg.get("llm_config", {})  # InternVideo's language model sizes
            (cfg["llm_config"] if inner else cfg)[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
    return change


def _int32_embedding(d):
    from safetensors import safe_open

    f = d / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        key = next(k for k in h.keys() if "tok_embeddings" in k or "embed_tokens" in k)
    _rewrite_tensors(f, lambda t: t.__setitem__(key, t[key].to(torch.int32)))


@pytest.mark.parametrize("family,breaks", [
    ("internvideo", _top_config(num_attention_heads=-4)),  # a traceback from building the model before
    ("internvideo", _top_config(hidden_size=float("nan"))),
    ("internvideo", _top_config(downsample_ratio=0)),  # a division by zero before
    ("internvideo", _top_config(force_image_size=-56)),  # a failed row before
    ("internvideo", _top_config(architectures=["InternVLForConditionalGeneration"])),
    ("internvideo", _top_config(model_type="llava")),
    ("internvideo", _int32_embedding),
    ("vita", _top_config(num_attention_heads=-4)),
    ("vita", _top_config(rms_norm_eps=float("nan"))),
    ("vita", _top_config(vocab_size=0)),
    ("vita", _top_config(mm_hidden_size=999)),  # the projector takes another width
    ("vita", _top_config(architectures=["Qwen2ForCausalLM"])),
    # not a list of class names: a TypeError traceback from the layouts' detection before
    ("vita", _top_config(architectures=5)),
    ("internvideo", _top_config(architectures=2.5)),
    ("vita", _int32_embedding),
])
def test_broken_internvideo_and_vita_checkpoints(family, breaks, tiny_internvideo_dir, tiny_vita_dir, tmp_path,
                                                 capsys):
    d = _copy(tiny_internvideo_dir if family == "internvideo" else tiny_vita_dir, tmp_path)
    breaks(d)
    out = tmp_path / "out"
    extra = ["--num-images", "4"] if family == "internvideo" else []  # its frames merge in fours
    rc = run_main(["--model-path", str(d), *RUN, *extra, "--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(d) in lines[0], err
    assert not out.exists()
