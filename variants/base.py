"""The variant contract. A variant is up to one part of each kind, composed with '+':

- weights: how the model's weights are stored and loaded (fp16, bnb8, bnb4, ...)
- cache:   what a request may reuse (prefix KV, image embeddings)
- engine:  how the forward passes are driven (hf)

Each part says what it needs; the runner skips a variant whose needs the device lacks.
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


class Part:
    name: str
    kind: str
    description: str
    requires_cuda: bool = False
    requires_packages: tuple[str, ...] = ()

    def unavailable_reason(self, device: torch.device) -> str | None:
        if self.requires_cuda and device.type != "cuda":
            return f"{self.name} needs a CUDA device"
        for pkg in self.requires_packages:
            if importlib.util.find_spec(pkg) is None:
                return f"{self.name} needs the package {pkg!r} (not installed)"
        return None


class WeightsPart(Part):
    kind = "weights"

    def load(self, source, device: torch.device, dtype: torch.dtype, options: dict) -> VLMAdapter:
        raise NotImplementedError

    def source_reason(self, source) -> str | None:
        """Why these weights cannot come from `source` (None: they can)."""
        if getattr(source, "prequantized", None):
            return f"{self.name}: the checkpoint is already AWQ int4 (no {self.name} weights in it); use awq4"
        return None

    def key(self, options: dict) -> tuple:
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

    def make_policy(self, options: dict) -> CachePolicy:
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

    def make_policy(self, options):
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
