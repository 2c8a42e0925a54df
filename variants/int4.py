"""int4 weight variants: awq4 (activation-aware, calibrated) and rtn4 (round-to-nearest control).

Both quantize every linear of the LLM's decoder (lm_head, vision tower and projector stay in
--dtype, as AutoAWQ deploys) to group-wise int4 run by the tinygemm kernel, with a dense path for
prefill (bench.quant.int4). A quantized model is saved under --int4-cache-dir, keyed by everything
that made it, and loaded from there next time. A checkpoint that is already AutoAWQ GEMM int4
loads as awq4 without calibration.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bench.log import status
from bench.errors import VariantUnsupported
from bench.quant import DEFAULT_DENSE_ROWS
from bench.quant.awq import Int4Options, calibration_images, int4_layers, quantize_model
from variants.base import WeightsPart, quantized_columns

VERSION = 1  # bump when quantization output changes, so old saved files are not reused


def _load_image_dir(path: str) -> list:
    from PIL import Image

    files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if not files:
        raise VariantUnsupported(f"--awq-calib-dir {path}: no images")
    return [Image.open(p).convert("RGB") for p in files]


class Int4Weights(WeightsPart):
    requires_packages = ("torchao",)

    def __init__(self, name: str, method: str, description: str):
        self.name, self.method, self.description = name, method, description

    def options(self, options: dict) -> Int4Options:
        return Int4Options(method=self.method, group_size=options.get("int4_group_size", 128),
                           calib_samples=options.get("awq_calib", 8),
                           dense_rows=options.get("int4_dense_rows", DEFAULT_DENSE_ROWS), seed=options.get("seed", 0))

    def key(self, options: dict) -> tuple:
        o = self.options(options)
        return (self.name, o.group_size, o.calib_samples if self.method == "awq" else None,
                options.get("awq_calib_dir") if self.method == "awq" else None, options.get("image_path"),
                o.dense_rows)

    def source_reason(self, source) -> str | None:
        if getattr(source, "prequantized", None) and self.method != "awq":
            return f"{self.name}: the checkpoint is already AWQ int4; only awq4 applies to it"
        return None

    def _saved_path(self, options: dict, adapter, opts: Int4Options, image_digest: str) -> Path | None:
        root = options.get("int4_cache_dir", "")
        if not root:
            return None
        ident = {"v": VERSION, "model": adapter.identity, "dtype": str(adapter.dtype), "method": self.method,
                 "group": opts.group_size, "grid": opts.grid, "rows": opts.max_rows}
        if self.method == "awq":
            ident.update(calib=opts.calib_samples, images=image_digest, seed=opts.seed)
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        return Path(root).expanduser() / f"{adapter.name}-{self.name}-g{opts.group_size}-{key}.safetensors"

    def load(self, source, device, dtype, options):
        from bench.quant.store import load_int4_file, read_meta, save_int4

        opts = self.options(options)
        adapter = source.load(device, dtype)
        if getattr(adapter, "prequantized", None):  # AutoAWQ checkpoint: already int4
            from bench.quant.awq import set_dense_rows

            set_dense_rows(adapter, opts.dense_rows)
            adapter.int4_info = {"quant_method": "checkpoint", "quant_source": "checkpoint"}
            return adapter
        images, digest = [], ""
        if self.method == "awq":
            from bench.models.base import image_content_digest
            from bench.models.visual import load_image

            extra = _load_image_dir(options["awq_calib_dir"]) if options.get("awq_calib_dir") else None
            images = calibration_images(load_image(options["image_path"]), opts.calib_samples, extra)
            digest = hashlib.sha256("".join(image_content_digest(i) for i in images).encode()).hexdigest()
        saved = self._saved_path(options, adapter, opts, digest)
        if saved is not None and saved.is_file():
            status(f"{self.name}: loading the saved int4 model {saved}")
            meta = read_meta(saved)
            load_int4_file(adapter, saved, opts.dense_rows)
            adapter.int4_info = {"quant_method": self.method, "quant_err_ratio": meta.get("err_ratio"),
                                 "quant_source": str(saved)}
            return adapter
        status(f"{self.name}: quantizing {adapter.name} ({'AWQ calibration on ' + str(len(images)) + ' requests' if images else 'round-to-nearest'})")
        report = quantize_model(adapter, opts, images)
        status(f"{self.name}: done in {report.seconds:.1f} s" + (f", AWQ/RTN calibration error {report.err_ratio:.3f}"
                                                               if report.err_ratio is not None else ""))
        adapter.int4_info = {"quant_method": self.method, "quant_err_ratio": report.err_ratio,
                             "quant_source": f"calibrated ({report.seconds:.1f} s, {report.calib_tokens} tokens)"
                             if self.method == "awq" else "quantized in this run"}
        if saved is not None:
            status(f"{self.name}: saving to {saved}")
            save_int4(adapter, saved, {"group_size": opts.group_size, "method": self.method,
                                       "err_ratio": report.err_ratio, "calib_tokens": report.calib_tokens,
                                       "model": adapter.identity})
        return adapter

    def describe(self, adapter) -> dict:
        return {**quantized_columns(int4_layers(adapter), lambda m: m.weight_bytes()),
                **getattr(adapter, "int4_info", {})}


PARTS = [
    Int4Weights("awq4", "awq", "AWQ int4 (--awq-calib requests through the VLM, --int4-group-size), tinygemm decode"),
    Int4Weights("rtn4", "rtn", "round-to-nearest int4, same kernel and format as awq4 (the control)"),
]
