"""A variant part defined outside the package joins with variants.register(): its name works in
--variants, its options dataclass's fields become flags, and its rows land in runs.csv."""
import csv
from dataclasses import dataclass

import pytest
import torch

import variants
from bench.cli import run_main
from bench.errors import UsageError
from bench.run.config import build_parser, config_class, config_from_args
from variants.base import CachePart, WeightsPart
from variants.options import opt
from variants.prefix import PrefixKVPolicy

RUN = ["--preset", "tiny-vila", "--device", "cpu", "--num-runs", "2", "--min-seconds", "0", "--max-new-tokens", "4",
       "--warmup", "0", "--no-fidelity"]


@dataclass(frozen=True)
class ToyOptions:
    toy_scale: float = opt("toy: factor every linear weight of the decoder is multiplied by", 1.0)

    def __post_init__(self):
        if self.toy_scale <= 0:
            raise UsageError(f"--toy-scale must be positive, got {self.toy_scale}")


class ToyWeights(WeightsPart):
    """fp16 weights with the decoder's linears scaled by --toy-scale (1: unchanged)."""
    name = "toy"
    description = "test part: fp16 weights, decoder linears scaled by --toy-scale"
    options_class = ToyOptions

    def key(self, options: ToyOptions) -> tuple:
        return (self.name, options.toy_scale)

    def load(self, source, device, dtype, options: ToyOptions):
        adapter = source.load(device, dtype)
        with torch.no_grad():
            for m in adapter.quantization_targets(False)[0].modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.mul_(options.toy_scale)
        return self.loaded(adapter, options, {"quant_method": f"scaled x{options.toy_scale}"})


class ToyCache(CachePart):
    """The prefix cache, recording the weights key each policy was made for."""
    name = "toycache"
    description = "test part: prefix KV cache that records its weights keys"
    made_for: list = []

    def make_policy(self, options, weights_key):
        self.made_for.append(weights_key)
        return PrefixKVPolicy(64, weights_key)


@pytest.fixture
def toy():
    parts = [variants.register(ToyWeights()), variants.register(ToyCache())]
    yield parts
    for p in parts:
        variants.unregister(p.name)


def read(path):
    return list(csv.DictReader(open(path)))


def test_registered_parts_run_and_write_rows(toy, tmp_path):
    out = tmp_path / "o"
    assert run_main([*RUN, "--variants", "fp16,toy,toy+toycache", "--toy-scale", "1.0", "--output-dir", str(out)]) == 0
    rows = [r for r in read(out / "runs.csv") if r["kind"] == "measured"]
    assert {r["variant"] for r in rows} == {"fp16", "toy", "toy+toycache"}
    assert all(r["status"] == "ok" for r in rows)
    toys = [r for r in rows if r["variant"].startswith("toy")]
    assert all(r["quant_method"] == "scaled x1.0" for r in toys)
    # scale 1 changes nothing: the same tokens as fp16
    assert {r["output_text"] for r in toys} == {r["output_text"] for r in rows if r["variant"] == "fp16"}
    assert ToyCache.made_for[-1] == ("toy", 1.0)  # the cache is made for the loaded model's weights
    cached = [r for r in toys if r["variant"] == "toy+toycache"]
    assert {r["cache_state"] for r in cached} == {"cold", "warm"}
    assert all(r["cache_hit"] == "true" for r in cached if r["cache_state"] == "warm")


def test_registered_options_are_flags(toy):
    assert "toy_scale" in {f for f in config_class().__dataclass_fields__}
    help_text = build_parser().format_help()
    assert "--toy-scale" in help_text and "factor every linear weight" in help_text
    assert config_from_args(["--toy-scale", "0.5"]).toy_scale == 0.5
    assert config_from_args([]).toy_scale == 1.0
    assert variants.registry()["toy"].options(config_from_args(["--toy-scale", "2"])) == ToyOptions(2.0)
    with pytest.raises(UsageError, match="--toy-scale must be positive"):  # the options check their values
        config_from_args(["--toy-scale", "0"])
    with pytest.raises(UsageError, match="unrecognized arguments: --no-such-flag"):
        config_from_args(["--no-such-flag", "1"])
    assert "weights fp16, bnb8, bnb4, bnb4-fp4, awq4, rtn4, toy;" in " ".join(help_text.split())  # --variants


def test_unregistered_part_leaves_no_flag():
    variants.register(ToyWeights())
    variants.unregister("toy")
    assert "toy" not in variants.registry()
    assert "--toy-scale" not in build_parser().format_help()
    with pytest.raises(UsageError, match="unrecognized arguments: --toy-scale"):
        config_from_args(["--toy-scale", "2"])
    with pytest.raises(UsageError, match="unknown variant part 'toy'"):
        variants.parse_variant("toy")


def test_register_refuses_clashes(toy):
    with pytest.raises(ValueError, match="exists already"):
        variants.register(ToyWeights())
    with pytest.raises(TypeError):
        variants.register(ToyOptions())
    with pytest.raises(KeyError):
        variants.unregister("fp16")  # the package's own parts stay


def test_a_variant_has_one_name_however_it_is_spelled():
    """Its parts other than the defaults in kind order (weights, cache, engine), fp16 first where
    it names no weights or cache, no spaces: the name every row carries, so two spellings never
    make two results of one variant (the names of committed results are these already)."""
    for spec, name in (("prefix + static", "prefix+static"), ("static+awq4+prefix", "awq4+prefix+static"),
                       (" fp16 ", "fp16"), ("graph+fp16", "fp16+graph"), ("awq4+prefix+graph", "awq4+prefix+graph"),
                       ("fp16+prefix", "prefix"), ("prefix+hf", "prefix"), ("nocache", "fp16"), ("hf", "fp16"),
                       ("graph", "fp16+graph"), ("fp16+nocache+graph-exact", "fp16+graph-exact"), ("awq4+hf", "awq4")):
        assert variants.parse_variant(spec).name == name
    cfg = config_from_args(["--variants", "prefix + bnb4", "--engine", "hf,static"])
    assert cfg.variant_specs == ["bnb4+prefix", "bnb4+prefix+static"]
