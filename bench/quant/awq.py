"""AWQ (activation-aware weight quantization, Lin et al. 2023) and its round-to-nearest control.

Calibration runs whole requests through the VLM (image through the vision tower and projector,
then the prompt through the LLM), so image tokens count in the statistics. For every group of
linears that read one input (q/k/v; o; gate/up; down) it records the mean |x| per input channel
over all calibration tokens and a uniform sample of input rows. The scale search is AWQ's:
s = mean|x| ** a for a on a grid in [0, 1), normalised, keeping the a whose int4-quantized
W·diag(s) applied to x/s gives the smallest output error on the sampled rows (a = 0 is plain
round-to-nearest, so AWQ is never worse than RTN on its own calibration rows). As in AWQ, 1/s
is folded into what produces the input (the RMSNorm weight for q/k/v and gate/up, the rows of
v_proj for o_proj, of up_proj for down_proj), so decode pays nothing for it; where the shapes
do not allow that (o_proj under grouped-query attention) the layer multiplies its input by 1/s.

Written here rather than torchao.prototype.awq: that one searches each linear alone, keeps every
calibration input of every linear in host memory, and always multiplies activations by 1/s at
run time (one extra kernel per linear per token); its CUDA path also requires bfloat16.
Not done (as in AutoAWQ's defaults, but AWQ's paper has it): the weight-clipping search, and
sequential calibration (each layer's statistics come from the unquantized model).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageOps
from torch import nn
from transformers import DynamicCache

from bench.quant import DEFAULT_DENSE_ROWS
from bench.quant.int4 import Int4Linear, fake_quantize_int4, int4_modules, layer_group_size, quantize_int4

log = logging.getLogger(__name__)

CALIBRATION_QUESTIONS = [
    "Calibration: describe everything in the picture, object by object.",
    "Calibration: what would a person notice first here, and why?",
    "Calibration: list the shapes, textures and colours you can see.",
    "Calibration: tell a short story that starts with this scene.",
    "Calibration: explain where the light comes from in this image.",
    "Calibration: what is in the top left corner, and what is in the bottom right?",
    "Calibration: write a detailed alt text for a screen reader.",
    "Calibration: compare the foreground with the background.",
]


@dataclass
class Int4Options:
    method: str  # "awq" | "rtn"
    group_size: int = 128
    calib_samples: int = 8
    grid: int = 20
    max_rows: int = 2048  # sampled input rows per group for the search
    dense_rows: int = DEFAULT_DENSE_ROWS
    seed: int = 0


@dataclass
class QuantReport:
    """What quantization did: per scale group, the calibration output error of RTN and of AWQ."""

    layers: int = 0
    rtn_err: list[float] = field(default_factory=list)
    awq_err: list[float] = field(default_factory=list)
    runtime_scaled: int = 0  # linears that multiply their input by 1/s (not foldable)
    dense: int = 0  # linears left in dtype: no supported group size divides their in_features
    calib_tokens: int = 0
    seconds: float = 0.0

    @property
    def err_ratio(self) -> float | None:
        if not self.awq_err:
            return None
        return sum(self.awq_err) / max(sum(self.rtn_err), 1e-30)


# ---------------------------------------------------------------------------- model structure
@dataclass
class ScaleGroup:
    name: str
    linears: list[nn.Linear]
    fold_into: nn.Module | None  # RMSNorm (scale its weight) or Linear (scale its output rows)


def decoder_layers(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")
            and hasattr(m, "input_layernorm")]


def _is_plain_rmsnorm(m: nn.Module) -> bool:
    # y = weight * normalize(x): dividing weight by s divides y by s. (Gemma's 1 + weight is not.)
    name = type(m).__name__
    return name.endswith("RMSNorm") and "Gemma" not in name and getattr(m, "bias", None) is None


def layer_groups(layer: nn.Module) -> list[ScaleGroup]:
    a, m = layer.self_attn, layer.mlp
    norm1 = layer.input_layernorm if _is_plain_rmsnorm(layer.input_layernorm) else None
    norm2 = layer.post_attention_layernorm if _is_plain_rmsnorm(layer.post_attention_layernorm) else None
    v_into_o = a.v_proj if a.v_proj.out_features == a.o_proj.in_features else None  # not under GQA
    return [
        ScaleGroup("qkv", [a.q_proj, a.k_proj, a.v_proj], norm1),
        ScaleGroup("o", [a.o_proj], v_into_o),
        ScaleGroup("gate_up", [m.gate_proj, m.up_proj], norm2),
        ScaleGroup("down", [m.down_proj], m.up_proj),
    ]


# ---------------------------------------------------------------------------- calibration
class InputRecorder:
    """Forward pre-hook: running mean |x| per channel plus a uniform sample of rows (CPU)."""

    def __init__(self, rows_per_call: int, generator: torch.Generator):
        self.abs_sum, self.count, self.rows = None, 0, []
        self.rows_per_call, self.generator = rows_per_call, generator

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        s = x.abs().float().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[0]
        take = min(self.rows_per_call, x.shape[0])
        idx = torch.randperm(x.shape[0], generator=self.generator)[:take].to(x.device)
        self.rows.append(x.index_select(0, idx).to("cpu", torch.float16 if x.is_cuda else torch.float32))

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)


def calibration_images(image: Image.Image, n: int, extra: list[Image.Image] | None = None) -> list[Image.Image]:
    """The run's image and deterministic flips/crops/rotations of it (or the user's images)."""
    if extra:
        return [extra[i % len(extra)] for i in range(n)]
    w, h = image.size
    ops = [
        lambda im: im,
        ImageOps.mirror,
        ImageOps.flip,
        lambda im: im.rotate(90, expand=True),
        lambda im: im.crop((w // 8, h // 8, w - w // 8, h - h // 8)),
        lambda im: ImageOps.autocontrast(im),
        lambda im: im.crop((0, 0, max(1, w // 2), max(1, h // 2))),
        lambda im: ImageOps.grayscale(im).convert("RGB"),
    ]
    return [ops[i % len(ops)](image) for i in range(n)]


@torch.inference_mode()
def calibrate(adapter, images: list[Image.Image], opts: Int4Options) -> tuple[dict, int]:
    """Run len(images) requests through the VLM (request i shows image i, or for a model that
    takes images in groups of `adapter.visual_group`, images i, i+1, ... as one group);
    return {group linear: InputRecorder}, tokens."""
    root = adapter.quantization_targets(False)[0]
    gen = torch.Generator().manual_seed(opts.seed)
    per_call = max(1, opts.max_rows // max(1, len(images)))
    recorders, hooks = {}, []
    for layer in decoder_layers(root):
        for g in layer_groups(layer):
            rec = InputRecorder(per_call, gen)
            recorders[g.linears[0]] = rec
            hooks.append(g.linears[0].register_forward_pre_hook(rec))
    tokens = 0
    try:
        group = adapter.visual_group  # images per request the model takes (4: InternVideo2.5)
        for i, im in enumerate(images):
            visual = im if group == 1 else [images[(i + j) % len(images)] for j in range(group)]
            prepared = adapter.prepare(visual, CALIBRATION_QUESTIONS[i % len(CALIBRATION_QUESTIONS)])
            embeds = adapter.prompt_embeds(prepared, adapter.encode_image(adapter.pixels_to_device(prepared)))
            adapter.lm_forward(embeds, DynamicCache(), logits_to_keep=1)
            tokens += embeds.shape[1]
    finally:
        for h in hooks:
            h.remove()
    return recorders, tokens


# ---------------------------------------------------------------------------- search + fold
@torch.no_grad()
def search_scale(weights: list[torch.Tensor], x_mean: torch.Tensor, rows: torch.Tensor, group_size: int,
                 grid: int) -> tuple[torch.Tensor, float, float]:
    """AWQ's grid search. Returns (s, error with s, error of plain RTN); errors are output MSE."""
    w = torch.cat([t.float() for t in weights])
    x = rows.to(w.device, torch.float32)
    ref = x @ w.t()
    best_s, best_err, rtn_err = None, float("inf"), None
    x_mean = x_mean.to(w.device).float().clamp(min=1e-4)
    for i in range(grid):
        s = x_mean.pow(i / grid)
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quantize_int4(w * s, group_size) / s
        err = float((x @ wq.t() - ref).pow(2).mean())
        if i == 0:
            rtn_err = err
        if err < best_err:
            best_s, best_err = s, err
    return best_s, best_err, rtn_err


@torch.no_grad()
def apply_scale(group: ScaleGroup, s: torch.Tensor) -> torch.Tensor | None:
    """W <- W·diag(s) for the group; 1/s folded into the producer. Returns the runtime input
    scale (1/s) when it could not be folded, else None."""
    for lin in group.linears:
        lin.weight.copy_((lin.weight.float() * s).to(lin.weight.dtype))
    prod = group.fold_into
    if prod is None:
        return (1.0 / s)
    if isinstance(prod, nn.Linear):
        prod.weight.copy_((prod.weight.float() / s.unsqueeze(1)).to(prod.weight.dtype))
        if prod.bias is not None:
            prod.bias.copy_((prod.bias.float() / s).to(prod.bias.dtype))
    else:
        prod.weight.copy_((prod.weight.float() / s).to(prod.weight.dtype))
    return None


def _replace(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is target:
                setattr(parent, name, new)
                return
    raise KeyError("module not found under root")


@torch.no_grad()
def quantize_model(adapter, opts: Int4Options, images: list[Image.Image] | None = None) -> QuantReport:
    """Quantize every decoder linear of the adapter's LLM to int4 in place (AWQ or RTN)."""
    t0 = time.perf_counter()
    report = QuantReport()
    root = adapter.quantization_targets(False)[0]
    device, dtype = adapter.device, adapter.dtype
    layers = decoder_layers(root)
    recorders = {}
    if opts.method == "awq":
        if not images:
            raise ValueError("AWQ needs calibration images")
        recorders, report.calib_tokens = calibrate(adapter, images, opts)
    for layer in layers:
        groups = layer_groups(layer)
        input_scale: dict[nn.Linear, torch.Tensor] = {}
        if opts.method == "awq":
            scales = []
            for g in groups:
                rec = recorders.pop(g.linears[0])
                group_size = layer_group_size(g.linears[0].in_features, opts.group_size, g.linears[0].out_features,
                                              device)
                if group_size is None:  # stays dense: nothing to search
                    scales.append(None)
                    continue
                rows = torch.cat(rec.rows)
                s, err, rtn = search_scale([l.weight for l in g.linears], rec.mean_abs(), rows,
                                           group_size, opts.grid)
                report.awq_err.append(err)
                report.rtn_err.append(rtn)
                scales.append(s)
            for g, s in zip(groups, scales):  # all searches saw the original weights
                if s is None:
                    continue
                inv = apply_scale(g, s)
                if inv is not None:
                    for lin in g.linears:
                        input_scale[lin] = inv
                        report.runtime_scaled += 1
        for g in groups:
            for lin in g.linears:
                group_size = layer_group_size(lin.in_features, opts.group_size, lin.out_features, device)
                if group_size is None:
                    report.dense += 1
                    continue
                t = quantize_int4(lin.weight, group_size)
                new = Int4Linear.from_int4(t, device, dtype, bias=lin.bias, input_scale=input_scale.get(lin),
                                           dense_rows=opts.dense_rows)
                _replace(layer, lin, new)
        report.layers += 1
    report.seconds = time.perf_counter() - t0
    return report


def int4_layers(adapter) -> list[Int4Linear]:
    return int4_modules(adapter.model)


def set_dense_rows(adapter, rows: int) -> None:
    for m in int4_layers(adapter):
        m.dense_rows = rows
