"""Saving and loading int4 models in the AutoAWQ GEMM tensor format.

- `save_int4` writes the decoder stack of a quantized LLM to one safetensors file: every Int4Linear
  as {name}.qweight/.qzeros/.scales (+ .bias, + .input_scale where AWQ could not fold 1/s), every
  other tensor of the stack (the RMSNorm weights AWQ rescaled) as it is. Metadata says how it
  was made, so a benchmark can reuse it instead of calibrating again.
- `load_int4_tensors` puts such tensors (or those of an AutoAWQ checkpoint) into a loaded model,
  repacking each linear for this device's int4 kernel.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from bench.quant.awq import decoder_layers
from bench.quant.awq_format import SUFFIXES, from_awq_gemm, to_awq_gemm
from bench.quant.int4 import Int4Linear, layer_group_size

FORMAT = "bench-int4-awq-gemm-v1"


def _stack_root(adapter) -> nn.Module:
    return adapter.quantization_targets(False)[0]


def save_int4(adapter, path: Path, meta: dict) -> None:
    root = _stack_root(adapter)
    tensors: dict[str, torch.Tensor] = {}
    int4_names = set()
    for name, m in root.named_modules():
        if isinstance(m, Int4Linear):
            int4_names.add(name)
            for k, v in to_awq_gemm(m.to_int4(on_device=True)).items():  # packed on the layer's device
                tensors[f"{name}.{k}"] = v.cpu()
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias.detach().cpu()
            if m.input_scale is not None:
                tensors[f"{name}.input_scale"] = m.input_scale.detach().cpu()
    if not int4_names:
        raise ValueError("no int4 layers to save")
    for name, t in root.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner not in int4_names and ".layers." in f".{name}":
            tensors[name] = t.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta, sort_keys=True),
                                               "sha256": tensors_digest(tensors)})
        tmp.replace(path)  # a crash mid-write never leaves a truncated file under the real name
    except (SafetensorError, OSError) as e:  # a failed write (read-only directory, full disk; the name a folder)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise
        raise OSError(" ".join(str(e).split())) from None  # (safetensors' own error for it)


class CorruptInt4File(ValueError):
    """A saved int4 file that cannot be trusted: unreadable, not ours, or its checksum differs."""


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _open_checked(path: Path, tensors: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for broken files
        raise CorruptInt4File(f"{path} cannot be read ({' '.join(str(e).split())[:200]})") from None
    if md.get("format") != FORMAT:
        raise CorruptInt4File(f"{path} is not a saved int4 model ({md.get('format')!r})")
    try:
        meta = json.loads(md["meta"])
    except (KeyError, json.JSONDecodeError):
        raise CorruptInt4File(f"{path}: its metadata is not readable") from None
    if not isinstance(meta, dict):
        raise CorruptInt4File(f"{path}: its metadata is not readable")
    if tensors and md.get("sha256") != tensors_digest(data):
        raise CorruptInt4File(f"{path}: checksum mismatch (the file was changed after it was saved)")
    return meta, data


def read_meta(path: Path) -> dict:
    return _open_checked(path, tensors=False)[0]


def read_int4_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a saved int4 model after checking its checksum; CorruptInt4File if
    it is unreadable, not a saved int4 model, or was changed after it was saved."""
    return _open_checked(path, tensors=True)


def load_int4_file(adapter, path: Path, dense_rows: int) -> int:
    meta, tensors = read_int4_file(path)
    return load_int4_tensors(adapter, tensors, meta["group_size"], dense_rows, strict=True)


def load_int4_tensors(adapter, tensors: dict[str, torch.Tensor], group_size: int, dense_rows: int,
                      strict: bool) -> int:
    """Tensors named relative to the decoder stack ('layers.N....'). Returns linears replaced."""
    root = _stack_root(adapter)
    device, dtype = adapter.device, adapter.dtype
    modules = dict(root.named_modules())
    replaced = 0
    rest = dict(tensors)
    for key in [k for k in tensors if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        old = modules.get(name)
        if not isinstance(old, (nn.Linear, Int4Linear)):
            raise ValueError(f"quantized tensor {key} has no linear layer {name!r} in this model")
        t = from_awq_gemm(*(rest.pop(f"{name}.{s}") for s in SUFFIXES), device=device)
        if t.group_size not in (group_size, layer_group_size(old.in_features, group_size)):
            raise ValueError(f"{name}: group size {t.group_size} in the tensors, {group_size} in the config")
        if tuple(t.q.shape) != (old.out_features, old.in_features):
            raise ValueError(f"{name}: quantized shape {tuple(t.q.shape)} does not match the layer "
                             f"({old.out_features}, {old.in_features})")
        bias = rest.pop(f"{name}.bias", None)
        if bias is None and isinstance(old, nn.Linear) and old.bias is not None:
            bias = old.bias
        new = Int4Linear.from_int4(t, device, dtype, bias=bias, input_scale=rest.pop(f"{name}.input_scale", None),
                                   dense_rows=dense_rows)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else root, child, new)
        replaced += 1
    if rest:
        missing, unexpected = root.load_state_dict({k: v.to(device) for k, v in rest.items()}, strict=False)
        if strict and unexpected:
            raise ValueError(f"saved int4 file has tensors this model lacks: {unexpected[:5]}")
    expected = sum(len(list(m for m in layer.modules() if isinstance(m, Int4Linear) or (
        isinstance(m, nn.Linear) and layer_group_size(m.in_features, group_size, m.out_features, device) is not None)))
                   for layer in decoder_layers(root))
    if strict and replaced != expected:
        raise ValueError(f"saved int4 file holds {replaced} quantized linears, the model has {expected}")
    return replaced


def checkpoint_awq_tensors(files: list[Path], key_filter) -> tuple[dict[str, torch.Tensor], set[str]]:
    """AWQ tensors of a checkpoint's safetensors, renamed relative to the decoder stack
    ('...layers.N.self_attn.q_proj.qweight' -> 'layers.N.self_attn.q_proj.qweight'), and the
    names of every decoder tensor the checkpoint stores (int4 or not), named the same way."""
    out, stored = {}, set()
    for file in files:
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                if not key_filter(k) or ".layers." not in f".{k}":
                    continue
                name = "layers." + k.split("layers.", 1)[1]
                stored.add(name)
                if name.rsplit(".", 1)[-1] in SUFFIXES:
                    out[name] = f.get_tensor(k)
    return out, stored
