"""A model family is one module plus one registry line: the loader names none of them, and a family
registered from outside the package is detected, loaded and written like the built-in ones."""
import ast
import dataclasses

import pytest
import torch

from bench.cli import run_main
from bench.models import llava, registry
from bench.models.loader import build_preset, load_checkpoint, read_checkpoint_config, save_checkpoint
from tests.conftest import ROOT


def test_loader_names_no_family():
    tree = ast.parse((ROOT / "bench" / "models" / "loader.py").read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not strings & set(registry.families()), "family-specific branches belong in the family's module"
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"bench.models.llava", "bench.models.vila", "bench.models.internvl"}


def test_every_family_round_trips_a_preset(tmp_path):
    for name, preset in (("llava", "tiny-llava"), ("vila", "tiny-vila"), ("internvl", "tiny-internvl"),
                         ("internvideo", "tiny-internvideo"), ("vita", "tiny-vita")):
        adapter = build_preset(preset, None, torch.device("cpu"), torch.float32)
        save_checkpoint(adapter, tmp_path / name)
        assert read_checkpoint_config(tmp_path / name)[0] == name
        assert registry.get_family(name).default_conv_mode == load_checkpoint(
            tmp_path / name, None, torch.device("cpu"), torch.float32).template.name


def _toy_family():
    """LLaVA's layout with a marker file: a family defined here, not in the package."""
    base = llava.FAMILY

    def save(adapter, out, max_shard_size=None):
        base.save(adapter, out, max_shard_size)
        (out / "TOY_LAYOUT").write_text("")

    return dataclasses.replace(base, name="toy", layout="toy layout (llava-hf + TOY_LAYOUT)",
                               detect=lambda path, config: (path / "TOY_LAYOUT").is_file(), save=save)


def test_a_family_registered_from_outside_is_detected_and_runs(tmp_path):
    toy = _toy_family()
    registry.register(toy)
    try:
        adapter = build_preset("tiny-llava", None, torch.device("cpu"), torch.float32)
        toy.save(adapter, tmp_path / "ckpt")
        assert read_checkpoint_config(tmp_path / "ckpt")[0] == "toy"
        assert run_main(["--model-path", str(tmp_path / "ckpt"), "--device", "cpu", "--num-runs", "2",
                         "--min-seconds", "0", "--max-new-tokens", "4", "--warmup", "0", "--no-fidelity",
                         "--output-dir", str(tmp_path / "out")]) == 0
        rows = (tmp_path / "out" / "runs.csv").read_text().splitlines()
        assert len(rows) == 3 and ",toy," in rows[1]
    finally:
        registry.unregister("toy")
    assert read_checkpoint_config(tmp_path / "ckpt")[0] == "llava"


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-vila", "tiny-internvl"])
def test_sharded_checkpoints_load_and_answer_as_single_files(preset, checkpoint_dirs, demo_image, tmp_path):
    """make-checkpoint --shard-size writes the published layout (shards + model.safetensors.index.json,
    for VILA in llm/ and vision_tower/); loaded, it gives the single-file checkpoint's greedy tokens."""
    from bench.cli import main
    from bench.engines.cache_policy import CachePolicy
    from bench.engines.hf import HFEngine

    out = tmp_path / preset
    assert main(["make-checkpoint", "--preset", preset, "--out", str(out), "--dtype", "float32",
                 "--shard-size", "100KB"]) == 0
    indexed = [out / "llm", out / "vision_tower"] if preset == "tiny-vila" else [out]
    for folder in indexed:
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
        assert not (folder / "model.safetensors").exists()
    cpu = torch.device("cpu")
    tokens = [HFEngine(load_checkpoint(d, None, cpu, torch.float32), CachePolicy()).run(
        demo_image, "What is here?", 6).tokens for d in (out, checkpoint_dirs[preset.removeprefix("tiny-")])]
    assert tokens[0] == tokens[1]


def test_shard_size_must_be_a_size(tmp_path, capsys):
    from bench.cli import main

    assert main(["make-checkpoint", "--preset", "tiny-vila", "--out", str(tmp_path / "c"), "--shard-size", "big"]) == 2
    assert "--shard-size" in capsys.readouterr().err and not (tmp_path / "c").exists()


@pytest.mark.parametrize("preset, files", [("tiny-vila", "sentencepiece"), ("tiny-llava", "both")])
def test_sentencepiece_tokenizer_files_load_and_answer_as_tokenizer_json(preset, files, checkpoint_dirs, demo_image,
                                                                         tmp_path):
    """VILA1.5's llm/ ships only tokenizer.model + tokenizer_config.json, LLaVA-1.5 both files: such
    checkpoints load (transformers converts the SentencePiece model) and tokenize prompts to the
    ids of the tokenizer.json checkpoint, so greedy tokens match."""
    from bench.cli import main
    from bench.engines.cache_policy import CachePolicy
    from bench.engines.hf import HFEngine

    out = tmp_path / preset
    assert main(["make-checkpoint", "--preset", preset, "--out", str(out), "--dtype", "float32",
                 "--tokenizer-files", files]) == 0
    folder = out / "llm" if preset == "tiny-vila" else out
    assert (folder / "tokenizer.model").is_file()
    assert (folder / "tokenizer.json").is_file() == (files == "both")
    cpu = torch.device("cpu")
    adapters = [load_checkpoint(d, None, cpu, torch.float32) for d in (out, checkpoint_dirs[preset.removeprefix("tiny-")])]
    if files == "sentencepiece":
        assert type(adapters[0].tokenizer).__name__ == "LlamaTokenizer"
    prompts = [a.prepare_text("What is in the picture? Describe it.") for a in adapters]
    assert prompts[0].text_segments == prompts[1].text_segments and prompts[0].suffix_ids == prompts[1].suffix_ids
    tokens = [HFEngine(a, CachePolicy()).run(demo_image, "What is here?", 6).tokens for a in adapters]
    assert tokens[0] == tokens[1]


def test_sentencepiece_files_are_refused_for_a_qwen_tokenizer(tmp_path, capsys):
    from bench.cli import main

    assert main(["make-checkpoint", "--preset", "tiny-internvl", "--out", str(tmp_path / "c"),
                 "--tokenizer-files", "sentencepiece"]) == 2
    assert "--tokenizer-files" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_image_processor_loads_by_its_named_class_where_the_auto_class_needs_torchvision(tiny_llava_dir, tmp_path,
                                                                                         monkeypatch):
    """transformers 5.17 (the GPU reference machine's) refuses AutoImageProcessor itself without
    torchvision, with an ImportError, while CLIPImageProcessor & co. fall back to PIL: the
    checkpoint's image processor still loads, by the class its preprocessor_config.json names;
    a name that is not a transformers image processor is never looked up further."""
    import json
    import shutil

    import transformers

    from bench.errors import UsageError
    from bench.models import native

    want = native.image_processor_from(tiny_llava_dir, "x")

    class Refusing:  # AutoImageProcessor as transformers 5.17 has it without torchvision
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise ImportError("AutoImageProcessor requires the Torchvision library but it was not found")

    monkeypatch.setattr(native, "AutoImageProcessor", Refusing)
    got = native.image_processor_from(tiny_llava_dir, "x")
    assert isinstance(got, transformers.BaseImageProcessor) and got.to_dict() == want.to_dict()

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llava_dir, bad)
    config = json.loads((bad / "preprocessor_config.json").read_text())
    for name in ("AutoModel", "os.system", "NoSuchImageProcessor"):
        (bad / "preprocessor_config.json").write_text(json.dumps({**config, "image_processor_type": name}))
        assert native._named_image_processor(bad) is None
        with pytest.raises(UsageError, match="cannot load the image processor.*Torchvision"):
            native.image_processor_from(bad, "x")
