"""int4 weight variants: awq4 (activation-aware, calibrated) and rtn4 (round-to-nearest control).

Both quantize every linear of the LLM's decoder (lm_head, vision tower and projector stay in
--dtype, as AutoAWQ deploys) to group-wise int4 run by a W4A16 kernel (tinygemm unless
--int4-kernels says otherwise: bench.quant.w4a16), with a dense path for prefill
(bench.quant.int4). A quantized model is saved under --int4-cache-dir, keyed by everything that
made it, and loaded from there next time. A checkpoint that is already AutoAWQ GEMM int4 loads
as awq4 without calibration.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from bench.log import status
from bench.measure.results import check_creatable
from bench.models.visual import check_image_file, load_image
from bench.errors import UsageError, VariantUnsupported, path_problem
from bench.quant import DEFAULT_CACHE_DIR, DEFAULT_DENSE_ROWS, KERNELS_FILE
from bench.quant.awq import Int4Options, calibration_images, int4_layers, quantize_model
from bench.quant.w4a16.choice import DEFAULT, MEASURED, ROW_POINTS, modes as kernel_modes
from bench.quant.w4a16.registry import KERNELS
from variants.base import WeightsPart, quantized_columns
from variants.options import empty_flag, opt, run_fact

# rows the decode kernels may serve: each kernel that tunes per row count is called at every one
# of them before the runs (bench.quant.w4a16.choice.tune_per_rows)
MAX_DENSE_ROWS = 4096
MAX_CALIB = 1024  # calibration requests (each runs the whole VLM, outside any measurement)
VERSION = 1  # bump when quantization output changes, so old saved files are not reused


@dataclass(frozen=True)
class Int4VariantOptions:
    awq_calib: int = opt("awq4: calibration requests (image + question) run through the whole VLM", 8)
    awq_calib_dir: str | None = opt("awq4: folder of calibration images (default: flips/crops of --image-path)",
                                    nonempty="a directory")
    int4_group_size: int = opt("awq4/rtn4: input channels per int4 scale and zero point (32, 64, 128 or 256); a "
                               "layer whose in_features it does not divide uses the largest smaller size that "
                               "does, and one that none divides stays in --dtype (columns quant_group_size, "
                               "quant_dense_layers)", 128)
    int4_dense_rows: int = opt("awq4/rtn4: above this many rows a linear runs the prefill path (dequantize + dense "
                               "GEMM, or --int4-prefill-kernel); at or below it the int4 kernel runs (decode; "
                               "--int4-kernels measured sets its own bounds)", DEFAULT_DENSE_ROWS)
    int4_prefetch: bool = opt("awq4/rtn4: a side stream dequantizes the next layer's prefill weights while a layer "
                              "runs (costs two layers' dense weights of memory)", True)
    int4_prefill_copy: bool = opt("awq4/rtn4: keep a dense --dtype copy of every int4 weight for the calls above "
                                  "--int4-dense-rows (prefill, long suffixes): prefill at the dense model's speed "
                                  "for the dense weights' memory on top of the int4 ones (column "
                                  "int4_prefill_copy_mb, counted in weight_mb); replaces --int4-prefetch", False)
    int4_kernels: str = opt("awq4/rtn4 on the static and graph engines (hf and the exact ones run tinygemm): the "
                            "W4A16 kernel for calls of few rows (decode, short suffixes): tinygemm (PyTorch's), "
                            "measured (every kernel that runs here timed and checked per weight shape at "
                            f"{ROW_POINTS[0]}-{ROW_POINTS[-1]} rows, the fastest correct one per row count, kept in "
                            "--int4-cache-dir/kernels.json), or one kernel by name up to --int4-dense-rows (python "
                            "-m bench int4-kernels lists them); column int4_kernels", DEFAULT)
    int4_kernel_candidates: str = opt("awq4/rtn4 with --int4-kernels measured (only): comma list of the kernels "
                                      "to time and choose from (e.g. tinygemm,gemlite-gemv-revsplitk,fbgemm-rowwise); "
                                      "default: every kernel that runs here")
    int4_prefill_kernel: str = opt("awq4/rtn4 on the static and graph engines (hf and the exact ones run dense): "
                                   "the kernel every call above the decode kernels' rows runs (a full prefill, "
                                   "longer suffixes and batched steps; under --int4-kernels measured, every call of "
                                   "a prompt's prefill, at any rows): dense (dequantize + GEMM, with "
                                   "--int4-prefetch) or a W4A16 kernel by name that reads int4 weights itself (e.g. "
                                   "fbgemm-shuffled; python -m bench int4-kernels lists them); column "
                                   "int4_prefill_kernel", "dense")
    int4_fold_norms: bool = opt("awq4/rtn4 on the graph engine: each layer's residual add and RMSNorm run in the "
                                "launch of the int4 o_proj / down_proj before them, and SiLU(gate) * up in the "
                                "fused gate/up projection's, where that is triton-f16x2 at one row (decode at "
                                "batch 1; engine_detail says so); the norm's mean sums in the kernel's order, so "
                                "tokens may differ by rounding (--no-int4-fold-norms: kernels of their own)", True)
    int4_cache_dir: str = opt("awq4/rtn4: where quantized models (and kernel measurements) are saved and reused "
                              "('' = never)", DEFAULT_CACHE_DIR)
    image_path: str | None = run_fact()  # awq4 calibrates on this image (unless --awq-calib-dir)
    seed: int = run_fact()

    def __post_init__(self):
        if empty_flag(self):
            raise UsageError(empty_flag(self))
        if self.int4_group_size not in (32, 64, 128, 256):
            raise UsageError(f"--int4-group-size must be 32, 64, 128 or 256, got {self.int4_group_size}")
        if self.awq_calib < 1:
            raise UsageError("--awq-calib must be at least 1")
        if not 0 <= self.int4_dense_rows <= MAX_DENSE_ROWS:
            raise UsageError(f"--int4-dense-rows must be between 0 and {MAX_DENSE_ROWS:,} (calls of more rows are "
                             f"prefills: --int4-prefill-kernel), got {self.int4_dense_rows}")
        if self.awq_calib > MAX_CALIB:
            raise UsageError(f"--awq-calib {self.awq_calib}: at most {MAX_CALIB:,} calibration requests (AutoAWQ "
                             "calibrates on 128 samples)")
        if self.awq_calib_dir:
            problem = path_problem(self.awq_calib_dir, "directory")
            if problem:
                raise UsageError(f"--awq-calib-dir {self.awq_calib_dir}: {problem}")
            files = _calib_files(self.awq_calib_dir)
            if not files:
                raise UsageError(f"--awq-calib-dir {self.awq_calib_dir}: no image files ({', '.join(CALIB_SUFFIXES)})")
            for f in files:  # each opens and verifies before any model loads
                check_image_file(f, "--awq-calib-dir")
        if self.int4_prefill_kernel not in KERNELS:
            raise UsageError(f"--int4-prefill-kernel must be one of {', '.join(KERNELS)}, "
                             f"got {self.int4_prefill_kernel!r}")
        if self.int4_prefill_kernel != "dense" and self.int4_prefill_copy:
            raise UsageError("--int4-prefill-copy keeps dense weights for the dense prefill path; it does not go "
                             f"with --int4-prefill-kernel {self.int4_prefill_kernel}")
        if self.int4_kernels not in kernel_modes():
            raise UsageError(f"--int4-kernels must be one of {', '.join(kernel_modes())}, got {self.int4_kernels!r}")
        if self.int4_kernel_candidates is not None:
            wrong = [n for n in self.candidate_kernels() if n not in KERNELS]
            if wrong or not self.candidate_kernels():
                raise UsageError(f"--int4-kernel-candidates {self.int4_kernel_candidates!r}: "
                                 f"{'unknown ' + ', '.join(wrong) if wrong else 'no kernel named'}; give a comma "
                                 f"list of {', '.join(KERNELS)}")
            if self.int4_kernels != MEASURED:
                raise UsageError("--int4-kernel-candidates limits what --int4-kernels measured chooses from; it "
                                 f"does not go with --int4-kernels {self.int4_kernels}")
        if self.int4_cache_dir and not self.int4_cache_dir.strip():
            raise UsageError("--int4-cache-dir is blank; give a directory, or '' to never save")
        if self.int4_cache_dir:  # (an unwritable one only warns: the model is quantized again next time)
            check_creatable(Path(self.int4_cache_dir).expanduser(), "--int4-cache-dir", writable=False)

    def candidate_kernels(self) -> tuple[str, ...]:
        """--int4-kernel-candidates as names (empty: every kernel that runs here)."""
        text = self.int4_kernel_candidates or ""
        return tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))

    def quantization(self, method: str) -> Int4Options:
        """What bench.quant.awq needs to quantize with `method` (awq or rtn)."""
        return Int4Options(method=method, group_size=self.int4_group_size, calib_samples=self.awq_calib,
                           dense_rows=self.int4_dense_rows, seed=self.seed)


CALIB_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _calib_files(path: str) -> list[Path]:
    return sorted(p for p in Path(path).iterdir() if p.suffix.lower() in CALIB_SUFFIXES)


def _load_image_dir(path: str) -> list:
    files = _calib_files(path)
    if not files:
        raise VariantUnsupported(f"--awq-calib-dir {path}: no images")
    return [load_image(p, "--awq-calib-dir") for p in files]


def model_fingerprint(source) -> list | None:
    """A checkpoint's files as (relative path, size, mtime) plus its config.json text: a changed,
    replaced or re-downloaded checkpoint gets another key. None for presets (name + seed say it)."""
    path = getattr(source, "model_path", None)
    if not path:
        return None
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    config = (root / "config.json").read_bytes() if (root / "config.json").is_file() else b""
    return [hashlib.sha256(config).hexdigest()] + [
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


class Int4Weights(WeightsPart):
    requires_packages = ("torchao",)
    options_class = Int4VariantOptions

    def __init__(self, name: str, method: str, description: str):
        self.name, self.method, self.description = name, method, description

    def engine_options(self, options: Int4VariantOptions) -> dict:
        # with dense copies there is nothing to dequantize ahead (nor where the engine's prefill
        # runs another kernel: it makes no prefetch then)
        cache = str(Path(options.int4_cache_dir).expanduser() / KERNELS_FILE) if options.int4_cache_dir else ""
        return {"int4_prefetch": bool(options.int4_prefetch) and not options.int4_prefill_copy,
                "int4_kernels": options.int4_kernels, "int4_kernel_cache": cache,
                "int4_prefill_kernel": options.int4_prefill_kernel,
                "int4_kernel_candidates": options.candidate_kernels(), "fold_norms": options.int4_fold_norms}

    def key(self, options: Int4VariantOptions) -> tuple:
        o = options.quantization(self.method)
        return (self.name, o.group_size, o.calib_samples if self.method == "awq" else None,
                options.awq_calib_dir if self.method == "awq" else None, options.image_path,
                o.dense_rows, bool(options.int4_prefill_copy))

    def source_reason(self, source) -> str | None:
        if source.prequantized and self.method != "awq":
            return f"{self.name}: the checkpoint is already AWQ int4; only awq4 applies to it"
        return None

    def _saved_path(self, options: Int4VariantOptions, adapter, opts: Int4Options, image_digest: str,
                    source=None) -> Path | None:
        """Where this quantized model is saved: the name hashes everything that made it: the model
        (a preset's name and seed; a checkpoint's path, config and every file's size and mtime),
        dtype, method, group size and search settings; for awq4 also the calibration (requests,
        images, seed), the conversation template and the tiling (max_tiles) the calibration
        prompts were made with."""
        root = options.int4_cache_dir
        if not root:
            return None
        ident = {"v": VERSION, "model": adapter.identity, "files": model_fingerprint(source),
                 "dtype": str(adapter.dtype), "method": self.method, "group": opts.group_size, "grid": opts.grid,
                 "rows": opts.max_rows}
        if self.method == "awq":
            ident.update(calib=opts.calib_samples, images=image_digest, seed=opts.seed,
                         template=repr(adapter.template), max_tiles=getattr(adapter, "max_tiles", None))
        key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return Path(root).expanduser() / f"{adapter.name}-{self.name}-g{opts.group_size}-{key}.safetensors"

    def load(self, source, device, dtype, options: Int4VariantOptions):
        from bench.quant.store import load_int4_tensors, read_int4_file, save_int4

        opts = options.quantization(self.method)
        adapter = source.load(device, dtype)

        def done(facts: dict):
            if options.int4_prefill_copy:
                for m in int4_layers(adapter):
                    m.keep_dense_copy(dtype)
            return self.loaded(adapter, options, facts)

        if source.prequantized:  # AutoAWQ checkpoint: already int4
            from bench.quant.awq import set_dense_rows

            set_dense_rows(adapter, opts.dense_rows)
            return done({"quant_method": "checkpoint", "quant_source": "checkpoint"})
        images, digest = [], ""
        if self.method == "awq":
            from bench.models.base import image_content_digest
            from bench.models.visual import load_image

            extra = _load_image_dir(options.awq_calib_dir) if options.awq_calib_dir else None
            images = calibration_images(load_image(options.image_path), opts.calib_samples, extra)
            digest = hashlib.sha256("".join(image_content_digest(i) for i in images).encode()).hexdigest()
        saved = self._saved_path(options, adapter, opts, digest, source)
        if saved is not None and saved.is_file():
            status(f"{self.name}: loading the saved int4 model {saved}")
            try:
                meta, tensors = read_int4_file(saved)
                load_int4_tensors(adapter, tensors, meta["group_size"], opts.dense_rows, strict=True)
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                status(f"warning: {self.name}: discarding the saved int4 model {saved} "
                       f"({' '.join(str(e).split())[:200]}); quantizing again")
                saved.unlink(missing_ok=True)
                adapter = source.load(device, dtype)  # the failed load may have replaced some layers
            else:  # (outside the try: running out of memory afterwards says nothing about the file)
                return done({"quant_method": self.method, "quant_err_ratio": meta.get("err_ratio"),
                             "quant_source": str(saved)})
        status(f"{self.name}: quantizing {adapter.name} ({'AWQ calibration on ' + str(len(images)) + ' requests' if images else 'round-to-nearest'})")
        report = quantize_model(adapter, opts, images)
        status(f"{self.name}: done in {report.seconds:.1f} s" + (f", AWQ/RTN calibration error {report.err_ratio:.3f}"
                                                               if report.err_ratio is not None else ""))
        facts = {"quant_method": self.method, "quant_err_ratio": report.err_ratio,
                 "quant_source": f"calibrated ({report.seconds:.1f} s, {report.calib_tokens} tokens)"
                 if self.method == "awq" else "quantized in this run"}
        if saved is not None:
            status(f"{self.name}: saving to {saved}")
            try:
                save_int4(adapter, saved, {"group_size": opts.group_size, "method": self.method,
                                           "err_ratio": report.err_ratio, "calib_tokens": report.calib_tokens,
                                           "model": adapter.identity})
            except OSError as e:  # the quantized model is measured all the same, only not kept
                status(f"warning: {self.name}: the int4 model was not saved to {saved} ({e.strerror or e}); "
                       "it is quantized again next time")
        return done(facts)

    def describe(self, adapter) -> dict:
        from torch import nn

        from bench.quant.awq import decoder_layers

        layers = int4_layers(adapter)
        root = adapter.quantization_targets(False)[0]
        dense = sum(1 for layer in decoder_layers(root) for m in layer.modules() if type(m) is nn.Linear)
        copies = [m.dense_copy for m in layers if m.dense_copy is not None]
        return {**quantized_columns(layers, lambda m: m.weight_bytes()),
                "int4_prefill_copy_mb": sum(t.numel() * t.element_size() for t in copies) / 2**20,
                "quant_group_size": ",".join(str(g) for g in sorted({m.group_size for m in layers})),
                "quant_dense_layers": dense}


PARTS = [
    Int4Weights("awq4", "awq", "AWQ int4 (--awq-calib requests through the VLM, --int4-group-size), tinygemm "
                               "decode unless --int4-kernels"),
    Int4Weights("rtn4", "rtn", "round-to-nearest int4, same kernel and format as awq4 (the control)"),
]
