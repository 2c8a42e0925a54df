"""bitsandbytes weight variants: bnb8 (LLM.int8), bnb4 (NF4), bnb4-fp4 (FP4).

Settings live in one transformers BitsAndBytesConfig. Real checkpoints are quantized while
loading (from_pretrained(quantization_config=...)); presets, built with random weights on
the device, have their nn.Linear layers swapped for bitsandbytes modules made from those
weights with the same settings. By default only the language model's decoder is quantized
(lm_head, vision tower and projector stay in --dtype, as deployed); --quantize-vision adds
the vision tower and projector.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bench.errors import UsageError
from bench.log import status
from variants.base import WeightsOptions, WeightsPart, quantized_columns
from variants.options import opt

COMPUTE_DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class BnbOptions(WeightsOptions):
    bnb_int8_threshold: float = opt("bnb8: LLM.int8 outlier threshold", 6.0)
    bnb4_double_quant: bool = opt("bnb4: double quantization of the scales", False)
    bnb4_compute_dtype: str = opt("bnb4: compute dtype float16, bfloat16 or auto (= --dtype)", "auto")

    def __post_init__(self):
        if not (math.isfinite(self.bnb_int8_threshold) and self.bnb_int8_threshold >= 0):
            raise UsageError(f"--bnb-int8-threshold must be a finite number, at least 0 (0: no outlier columns), "
                             f"got {self.bnb_int8_threshold}")
        if self.bnb4_compute_dtype not in COMPUTE_DTYPES:
            raise UsageError(f"unknown --bnb4-compute-dtype {self.bnb4_compute_dtype!r}; choose auto, float16, bfloat16")

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The 4-bit layers' compute dtype; `dtype` is the run's (what auto means)."""
        return dtype if self.bnb4_compute_dtype == "auto" else getattr(torch, self.bnb4_compute_dtype)


class BnbWeights(WeightsPart):
    requires_packages = ("bitsandbytes",)
    options_class = BnbOptions

    def __init__(self, name: str, mode: str, description: str):
        self.name, self.mode, self.description = name, mode, description

    def quantization_config(self, options: BnbOptions, dtype: torch.dtype):
        from transformers import BitsAndBytesConfig

        if self.mode == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=options.bnb_int8_threshold)
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.mode,
            bnb_4bit_use_double_quant=bool(options.bnb4_double_quant),
            bnb_4bit_compute_dtype=options.compute_dtype(dtype),
        )

    def key(self, options: BnbOptions) -> tuple:
        return (self.name, options.bnb_int8_threshold, options.bnb4_double_quant, options.bnb4_compute_dtype,
                options.quantize_vision)

    def load(self, source, device, dtype, options: BnbOptions):
        if self.mode == "int8" and dtype != torch.float16:
            # what bitsandbytes would otherwise log on every forward (bench.quiet filters it)
            status(f"{self.name}: LLM.int8 casts {str(dtype).removeprefix('torch.')} inputs to float16 in every "
                   "8-bit layer")
        qc = self.quantization_config(options, dtype)
        vision = bool(options.quantize_vision)
        if source.model_path:
            adapter = source.load(device, dtype, quantization=(qc, vision))
        else:
            adapter = source.load(device, dtype)
        # Presets: everything is swapped here. Checkpoints: from_pretrained quantized the
        # transformers parts; only VILA's own projector (with --quantize-vision) is left.
        for module in adapter.quantization_targets(vision):
            swap_linears(module, qc, device)
        return self.loaded(adapter, options)

    def describe(self, adapter) -> dict:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt

        layers = [m for m in adapter.model.modules() if isinstance(m, (Linear4bit, Linear8bitLt))]
        vision_q = any(isinstance(m, (Linear4bit, Linear8bitLt)) for v in adapter.vision_modules()
                       for m in v.modules())
        return quantized_columns(layers, bnb_layer_bytes, vision_q)


def swap_linears(root: nn.Module, qc, device: torch.device) -> int:
    """Replace every nn.Linear under `root` by the bitsandbytes module `qc` describes, built from
    the layer's own weights (already on `device`). Returns the number of layers swapped."""
    import bitsandbytes as bnb

    swapped = 0
    for parent in list(root.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            has_bias = child.bias is not None
            if qc.load_in_8bit:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                          has_fp16_weights=False, threshold=qc.llm_int8_threshold, device="meta")
                weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
                # Int8Params.to() only quantizes weights coming from the CPU; ours are already on
                # the device (a 7B preset never visits the CPU), so quantize in place.
                new.weight = weight._quantize(device)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                        compute_dtype=qc.bnb_4bit_compute_dtype,
                                        compress_statistics=qc.bnb_4bit_use_double_quant,
                                        quant_type=qc.bnb_4bit_quant_type, device="meta")
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                               quant_type=qc.bnb_4bit_quant_type,
                                               compress_statistics=qc.bnb_4bit_use_double_quant,
                                               module=new).to(device)
            if has_bias:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            new.train(child.training)  # LLM.int8 takes another path in training mode
            setattr(parent, child_name, new)
            swapped += 1
    return swapped


def bnb_layer_bytes(module: nn.Module) -> int:
    """Bytes a quantized layer keeps: packed weight + scales (what a checkpoint stores)."""
    w = module.weight
    total = w.numel() * w.element_size()
    state = getattr(w, "quant_state", None)
    if state is not None:
        total += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values()
                     if isinstance(t, torch.Tensor))
    scb = getattr(w, "SCB", None)
    if scb is not None:
        total += scb.numel() * scb.element_size()
    if module.bias is not None:
        total += module.bias.numel() * module.bias.element_size()
    return total


PARTS = [
    BnbWeights("bnb8", "int8", "bitsandbytes LLM.int8 (outlier threshold --bnb-int8-threshold)"),
    BnbWeights("bnb4", "nf4", "bitsandbytes 4-bit NF4 (--bnb4-double-quant, --bnb4-compute-dtype)"),
    BnbWeights("bnb4-fp4", "fp4", "bitsandbytes 4-bit FP4"),
]
