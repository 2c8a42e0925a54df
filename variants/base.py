"""The variant contract. A variant is up to one part of each kind, composed with '+':

- weights: how the model's weights are stored and loaded (fp16, bnb8, bnb4, ...)
- cache:   what a request may reuse (prefix KV, image embeddings)
- engine:  how the forward passes are driven (hf)

Each part says what it needs; the runner skips a variant whose needs the device lacks. A part
with settings declares them as a dataclass (`options_class`, see variants.options): its flags
join the command line, and the part receives an instance of it (`options(config)`).
A weights part's `load` returns a LoadedModel: the adapter and what the run needs to know about
how its weights came to be.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

import torch

from bench.engines.cache_policy import CachePolicy
from bench.engines.hf import HFEngine
from bench.engines.spec import EngineSpec
from bench.models.base import VLMAdapter
from variants.options import opt, options_from


class Part:
    name: str
    kind: str
    description: str
    requires_cuda: bool = False
    requires_packages: tuple[str, ...] = ()
    options_class: type | None = None  # a dataclass of this part's settings (None: it has none)

    def options(self, config):
        """This part's typed options read from `config` (the run config, or a mapping whose
        missing keys take the defaults); None for a part without options."""
        return None if self.options_class is None else options_from(self.options_class, config)

    def unavailable_reason(self, device: torch.device) -> str | None:
        if self.requires_cuda and device.type != "cuda":
            return f"{self.name} needs a CUDA device"
        for pkg in self.requires_packages:
            if importlib.util.find_spec(pkg) is None:
                return f"{self.name} needs the package {pkg!r} (not installed)"
        return None


@dataclass(frozen=True)
class WeightsOptions:
    """Settings every weights part that quantizes may read."""
    quantize_vision: bool = opt("weight variants also quantize the vision tower and projector", False)


@dataclass
class LoadedModel:
    """A loaded model and what the run needs to know about its weights."""
    adapter: VLMAdapter
    weights: WeightsPart  # the part that loaded it
    weights_key: tuple  # weights.key(options): two variants with the same key share this model
    facts: dict = field(default_factory=dict)  # columns fixed by the load (int4: quant_method, quant_source, ...)

    def columns(self) -> dict:
        """The quantization columns of a run row (definitions in bench.measure.schema), measured
        from the model as it is now (bitsandbytes layers move their scales into layer state on
        their first forward, which changes the bytes counted), and the facts of the load."""
        return {**self.weights.describe(self.adapter), **self.facts}


class WeightsPart(Part):
    kind = "weights"

    def load(self, source, device: torch.device, dtype: torch.dtype, options) -> LoadedModel:
        """Load the model from `source` with these weights; `options` is self.options(config)."""
        raise NotImplementedError

    def loaded(self, adapter: VLMAdapter, options, facts: dict | None = None) -> LoadedModel:
        """The record `load` returns for `adapter`."""
        return LoadedModel(adapter, self, self.key(options), dict(facts or {}))

    def engine_options(self, options) -> dict:
        """EngineSpec fields these weights choose for the engines that run them (int4: whether
        prefill weights are dequantized a layer ahead); none by default."""
        return {}

    def source_reason(self, source) -> str | None:
        """Why these weights cannot come from `source` (None: they can)."""
        if source.prequantized:
            return f"{self.name}: the checkpoint is already AWQ int4 (no {self.name} weights in it); use awq4"
        return None

    def key(self, options) -> tuple:
        """Two variants with the same key share one loaded model."""
        return (self.name,)

    def describe(self, adapter: VLMAdapter) -> dict:
        return {"quantized": "none", "quantized_layers": 0}


def quantized_columns(layers: list, layer_bytes, vision_quantized: bool = False) -> dict:
    """The quantization columns every weight variant reports (definitions in bench.measure.metrics)."""
    return {
        "quantized": ("llm+vision" if vision_quantized else "llm") if layers else "none",
        "quantized_layers": len(layers),
        "quantized_layers_mb": sum(layer_bytes(m) for m in layers) / 2**20,
        "quantized_layers_fp16_mb": sum(m.in_features * m.out_features * 2 for m in layers) / 2**20,
    }


class CachePart(Part):
    kind = "cache"

    def make_policy(self, options, weights_key: tuple) -> CachePolicy:
        """A fresh policy for one model; `weights_key` (LoadedModel.weights_key) says which weights
        it was loaded with, so entries of other weights never match."""
        raise NotImplementedError


class EnginePart(Part):
    kind = "engine"

    def engine_class(self) -> type:
        """The engine this part makes (imported when asked: the static engines pull in more)."""
        raise NotImplementedError

    def spec(self, **overrides) -> EngineSpec:
        """The engine's spec: its class default with the run's `overrides` (EngineSpec fields,
        e.g. attention=..., int4_prefetch=...)."""
        return dataclasses.replace(self.engine_class().default_spec, **overrides)

    def make_engine(self, adapter: VLMAdapter, policy: CachePolicy, **overrides):
        return self.engine_class()(adapter, policy, spec=self.spec(**overrides))


class HFEnginePart(EnginePart):
    name = "hf"
    description = "transformers eager forward with a DynamicCache (the loop generate runs)"

    def engine_class(self):
        return HFEngine


class StaticEnginePart(EnginePart):
    name = "static"
    description = "own decoder (fused q/k/v, gate/up) over KV buffers reused across requests, eager (runs anywhere)"

    def engine_class(self):
        from bench.engines.static import StaticEngine

        return StaticEngine


class GraphEnginePart(EnginePart):
    name = "graph"
    description = "static + CUDA graphs: compiled decode step, suffix-length buckets, vision tower"
    requires_cuda = True

    def engine_class(self):
        from bench.engines.graph import GraphEngine

        return GraphEngine


class GraphExactEnginePart(EnginePart):
    name = "graph-exact"
    description = ("graph engine doing transformers' arithmetic (logits bit-identical to hf): "
                   "a decode graph per attended length, exact-length suffixes, one request at a time")
    requires_cuda = True

    def engine_class(self):
        from bench.engines.graph_exact import GraphExactEngine

        return GraphExactEngine


class NoCachePart(CachePart):
    name = "nocache"
    description = "no reuse between requests"

    def make_policy(self, options, weights_key):
        return CachePolicy()


@dataclass
class Variant:
    spec: str
    weights: WeightsPart
    cache: CachePart
    engine: EnginePart
    parts: list[Part] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec

    def unavailable_reason(self, device: torch.device) -> str | None:
        for part in (self.weights, self.cache, self.engine):
            reason = part.unavailable_reason(device)
            if reason:
                return reason
        return None
