"""The runner: for each variant, load (or reuse) the model, warm up, time N requests, write a
row per run as it finishes, then the summary. It knows nothing about any particular variant."""
from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from bench.engines import attention_kernels
from bench.measure import calibration, compile_events
from bench.run import envinfo, host, interrupt
from bench.run import fidelity
from bench.run.preprocess import place_preprocessing
from bench.run.config import FINGERPRINT_DEFAULTS, MAX_RUNS_PER_RUN, NOT_FINGERPRINTED, RunConfig
from bench.run.plan import Job, build_plan
from bench.log import status
from bench.errors import NothingWritten, UsageError, VariantUnsupported, no_room
from bench.run.monitors import GpuMonitor
from bench.measure.metrics import request_metrics
from bench.measure.schema import counts_in_summary
from bench.quant.int4 import is_extra_buffer
from bench.run.limits import check_prompt, check_sizes, loaded_max_pos, model_dims
from bench.run.questions import load_questions, warmup_questions
from bench.run.summary import summarize_runs
from bench.measure.results import (DirLock, DirState, check_output_dir, make_dir, new_run_id, printable, read_runs,
                                   run_writer, utc_now, write_json, write_summary)
from bench.models.base import QuestionError
from bench.models.prompts import FIDELITY_PROBE
from bench.models.source import ModelSource
from bench.models.visual import VisualInput, load_image
from bench.run.workload import RequestSource, WorkloadPoint, derived_images, questions_of_length
from variants import baseline_variant, parse_variant


def resolve_device(name: str) -> torch.device:
    """cpu, cuda, cuda:N or auto; anything else (mps, meta, xpu, a missing GPU) is a usage error.
    cuda:N becomes this process's current CUDA device: kernels that launch on the current device
    (Triton's, FBGEMM's) run on N's tensors there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise UsageError(f"unsupported --device {name!r}; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s) "
                             f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


def identity_columns(source, variant, device: torch.device, dtype: torch.dtype) -> dict:
    """The result key's columns that name what ran (bench.measure.schema.RESULT_KEY): the model
    `source`, the variant, its engine, device and dtype."""
    return {"model": source.name, "family": source.family, "weights": source.weights, "variant": variant.name,
            "engine": variant.engine.name, "device": device.type, "dtype": str(dtype).removeprefix("torch.")}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _file_digest(path: Path, whole: bool = True) -> str:
    """SHA-256 of a file's bytes; not `whole`: of its size and its first and last MiB (a video's)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        if whole:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            size = path.stat().st_size
            h.update(str(size).encode() + f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read())
    return h.hexdigest()[:16]


def _tree_digest(root: Path, recursive: bool = True) -> str:
    """SHA-256 of a folder's file names and sizes and of its config.json (a checkpoint's, a frame
    folder's), hidden files and folders left out (an editor's, git's, a download tool's cache):
    what tells another model or other frames at the same path, without reading GBs."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*") if recursive else root.glob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        try:
            if p.is_file():
                h.update(f"{rel.as_posix()}\0{p.stat().st_size}\n".encode())
        except OSError:  # gone since it was listed
            continue
    if (root / "config.json").is_file():
        h.update((root / "config.json").read_bytes())
    return h.hexdigest()[:16]


def input_digests(cfg, image_file: bytes, questions: list[str]) -> dict[str, str]:
    """What a run reads from files, as digests env.json keeps: --resume refuses inputs whose
    contents changed at the same paths (its settings compare only the paths)."""
    out = {"image": hashlib.sha256(image_file).hexdigest()[:16],
           "questions": hashlib.sha256("\n".join(questions).encode()).hexdigest()[:16]}
    if cfg.video_path:
        out["video"] = _file_digest(Path(cfg.video_path), whole=False)
    if cfg.frames_dir:
        out["frames"] = _tree_digest(Path(cfg.frames_dir), recursive=False)  # the frames are its files
    if cfg.model_path:
        out["model"] = _tree_digest(Path(cfg.model_path))
    return out


def _progress(rows: list[dict]) -> tuple[int, int, float]:
    """(attempts made, so the next run's run_index; clean runs, those a summary counts; their
    measured seconds) of a measured group's rows."""
    clean = [r for r in rows if counts_in_summary(r)]
    return (max((int(float(r.get("run_index") or 0)) + 1 for r in rows), default=0), len(clean),
            sum(float(r.get("e2e_ms") or 0) for r in clean) / 1e3)


def shape_matched_warmups(adapter, questions: list[str], batch: int = 1, runs: int | None = None,
                          limit: int = 16) -> list[list[str]]:
    """Warm-up batches that meet the shapes of the measured ones, with other text of the same
    token counts: each batch's questions in its rows' order, one batch per distinct sequence of
    prompt lengths the measured batches hold (measured run n holds questions[n x batch:][:batch],
    cyclically; `runs`: the most measured runs a group makes), at most `limit`.

    GPU libraries pick kernels per shape on first use (seen on the H200: a 628-token prefill took
    58 ms the first time, 22 ms after), and the graph engines capture a graph per batch shape (a
    batch whose rows share one suffix length runs other graphs than one whose rows differ), so
    every measured batch shape is warmed, never with a measured question: each question stands in
    by its twin, the question's words in reverse (or rotated) order, or filler words of its token
    count. A batch holding a length no such text has is not warmed (real tokenizers have one)."""
    def suffix_len(q: str) -> int:  # tokenization only: the image is the same for every question
        return len(adapter.prepare_text(q).suffix_ids)

    lengths: dict[str, int] = {}
    twin_of_length: dict[int, str | None] = {}

    def twin(q: str) -> str | None:
        if q not in lengths:
            lengths[q] = suffix_len(q)
        target = lengths[q]
        if target not in twin_of_length:
            words = q.split()
            candidates = [" ".join(reversed(words)), " ".join(words[1:] + words[:1])]
            candidates += [" ".join(["warm"] * k) for k in range(1, 2 * target + 2)]
            twin_of_length[target] = next((c for c in candidates if c not in questions and suffix_len(c) == target),
                                          None)
        return twin_of_length[target]

    out, seen = [], set()
    for n in range(min(len(questions), runs or len(questions))):  # starts repeat after len(questions) runs
        start = n * batch
        rows = [questions[(start + i) % len(questions)] for i in range(batch)]
        twins = [twin(q) for q in rows]
        shape = tuple(lengths[q] for q in rows)
        if shape in seen or None in twins:
            continue
        seen.add(shape)
        out.append(twins)  # the measured batch's rows in its order, each by its twin
        if len(out) >= limit:
            break
    return out


# Settings given as comma lists whose spelling does not change what is measured: counts ("1, 4",
# "01,4" and "1,4" sweep the same points) and a set of names (the kernels `measured` chooses from).
COUNT_LISTS = ("batch_size", "prompt_lengths", "new_tokens", "num_images")
NAME_SETS = ("int4_kernel_candidates",)
# Settings naming a file or directory, which "c1", "./c1/" and "/abs/c1" (from where the run began),
# or "~/x" and its expansion, name alike: compared as absolute paths ("": none, as given)
PATHS = ("model_path", "image_path", "video_path", "frames_dir", "questions", "awq_calib_dir", "int4_cache_dir")


def _canonical(key: str, value):
    """A comma-list setting as one spelling of it (COUNT_LISTS, NAME_SETS), a path as an absolute
    one (PATHS); others as they are."""
    if isinstance(value, str) and value and key in PATHS:
        return os.path.abspath(os.path.expanduser(value))
    if not isinstance(value, str) or key not in COUNT_LISTS + NAME_SETS:
        return value
    items = [v.strip() for v in value.split(",") if v.strip()]
    if key in NAME_SETS:
        return ",".join(sorted(set(items)))
    try:
        return ",".join(str(int(v)) for v in items)
    except ValueError:
        return value


def config_fingerprint(config: dict) -> tuple[str, dict]:
    """What --resume compares: the run's settings less where its results go (NOT_FINGERPRINTED),
    unset ones as their defaults (FINGERPRINT_DEFAULTS), comma lists in one spelling and paths
    absolute (_canonical),
    as JSON would store them, and their SHA-256."""
    config = {**config, **{k: v for k, v in FINGERPRINT_DEFAULTS.items() if config.get(k) is None}}
    config = {k: _canonical(k, v) for k, v in config.items()}
    settings = json.loads(json.dumps({k: v for k, v in config.items() if k not in NOT_FINGERPRINTED},
                                     sort_keys=True, default=str))
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16], settings


def _derived(key: str, *settings: dict) -> bool:
    """Whether `key` holds, in each of `settings`, the value another setting gives it (--max-runs 0:
    MAX_RUNS_PER_RUN x --num-runs), so a difference in it is that setting's, not one to name."""
    return key == "max_runs" and all(
        isinstance(s.get("num_runs"), int) and s.get("max_runs") == MAX_RUNS_PER_RUN * s["num_runs"] for s in settings)


def _point_key(row) -> tuple:
    """A row's workload point as text (runs.csv cells and in-memory values compare alike)."""
    from bench.measure.schema import WORKLOAD_KEYS

    return tuple("" if row.get(k) is None else str(row.get(k)) for k in WORKLOAD_KEYS)


def weight_mb(module: torch.nn.Module) -> float:
    """Parameters and buffers, less the int4 layers' prefill scratch (bench.quant.prefetch) and
    the weight formats of their chosen kernels (int4_kernel_mb, counted by the engine: the fused
    projections that hold most of them live outside the model)."""
    total = sum(t.numel() * t.element_size() for t in module.parameters())
    total += sum(t.numel() * t.element_size() for name, t in module.named_buffers() if not is_extra_buffer(name))
    return total / 2**20


class Benchmark:
    """`worker`: set when the run is one job of a sweep in a worker process (bench.run.worker):
    its name, run_id, mode and --resume rows; the rows then go to `sink`, not to a directory."""

    FREE_ENGINES_ON = ("cuda",)  # device types whose engines are freed as soon as done (_engine_done)

    def __init__(self, cfg: RunConfig, command: str = "", worker: dict | None = None):
        self.cfg, self.command = cfg, command
        self.sink = None  # where a worker's rows go (the parent writes them)
        # Everything a user can get wrong is checked before any model is loaded.
        self.variants = [parse_variant(s) for s in cfg.variant_specs]
        if not self.variants:
            raise UsageError("--variants is empty")
        seen: dict[tuple, str] = {}
        for v in self.variants:  # the same parts twice: measured twice, one name's rows mixed in one summary
            parts = (v.weights.name, v.cache.name, v.engine.name)
            if parts in seen:
                same = f"{seen[parts]!r} and {v.name!r} are" if seen[parts] != v.name else f"{v.name!r} is"
                raise UsageError(f"--variants/--engine: {same} the same variant ({'+'.join(parts)}) given twice; "
                                 "give it once")
            seen[parts] = v.name
        self.image = load_image(cfg.image_path)
        self.image_file = Path(cfg.image_path).read_bytes()  # what a request would carry (prefix key)
        self.frames = None
        if cfg.video_path or cfg.frames_dir:
            from bench.run.media import FrameSource

            self.frames = FrameSource(cfg.video_path, cfg.frames_dir, cfg.num_frames)
        self.questions = load_questions(cfg.questions, cfg.text_prompt)
        self.warmups = warmup_questions(self.questions)
        if cfg.conv_mode is not None:
            from bench.models.templates import get_template

            get_template(cfg.conv_mode)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.cpu_threads = host.cpu_threads(cfg.cpu_threads, self.device)
        if cfg.calibrate and self.device.type != "cpu":
            raise UsageError("--calibrate measures host CPU work: it needs --device cpu")
        self.preprocess_facts: dict[str, dict] = {}  # by variant: where its image processing ran, and why
        self._placement: dict = {}  # the loaded model's (bench.run.preprocess.place_preprocessing)
        self.source = ModelSource(cfg.model_path, cfg.preset, cfg.conv_mode, cfg.seed, cfg.max_tiles)
        self.dims = model_dims(cfg.model_path, cfg.preset)
        if cfg.num_images is None and self.frames is None and self.dims.visual_group > 1:  # the model's default
            cfg.points = [dataclasses.replace(p, num_images=self.dims.visual_group) for p in cfg.points]
        check_sizes(cfg, self.dims, self.source.name, self.questions, self.frames, self.device, self.dtype)
        self.prompts_checked = False  # check_prompt ran on the first loaded tokenizer
        self.point_questions: dict[int, list[str]] = {}  # --prompt-lengths: questions by token count
        self.rows: list[dict] = []
        self.run_id = new_run_id()  # on every row and in env.json
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.out_dir = Path(cfg.output_dir or f"results/local/{stamp}-{self.source.name}")
        if not cfg.output_dir and self.out_dir.exists():  # two runs in one second: the default stays new
            self.out_dir = Path(f"results/local/{self.run_id}-{self.source.name}")
        gpu_index = (self.device.index or 0) if self.device.type == "cuda" else None
        self.monitor = GpuMonitor(gpu_index)
        self.reference: fidelity.FidelityReference | None = None
        self.placement = {"worker": "serial", "host": socket.gethostname(), "gpu": _gpu_label(self.device)}
        self.plan = build_plan(cfg)
        self.summary: list[dict] | None = None
        if worker is not None:
            self.run_id, self.mode, self.prior = worker["run_id"], worker["mode"], worker["prior"]
            self.placement["worker"] = worker["name"]
            return
        self.inputs = input_digests(cfg, self.image_file, self.questions)  # env.json's, what --resume compares
        # The results directory has one owner: refused here, before anything is written.
        self.mode = "resume" if cfg.resume else "append" if cfg.append else "new"
        check_output_dir(self.out_dir, self.mode)
        self.prior: dict[tuple, list[dict]] = {}  # --resume: this run's rows already in runs.csv, by variant/point
        self.old_env: dict | None = None
        if self.out_dir.is_dir() and (self.out_dir / "env.json").is_file() and self.mode != "new":
            try:
                self.old_env = json.loads((self.out_dir / "env.json").read_text())
            except (OSError, ValueError, RecursionError) as e:
                raise UsageError(f"{self.out_dir / 'env.json'} is not readable JSON ({e.__class__.__name__}): "
                                 "use a new --output-dir") from None
            old = self.old_env
            if not (isinstance(old, dict) and isinstance(old.get("config"), dict)
                    and isinstance(old.get("runs", {}), dict) and isinstance(old.get("run_id", ""), str)):
                raise UsageError(f"{self.out_dir / 'env.json'} is not an env.json this harness writes (its config, "
                                 "runs or run_id are of another kind): use a new --output-dir")
        self.fingerprint, settings = config_fingerprint(asdict(cfg))
        if self.mode == "resume" and self.old_env is not None:
            self._prepare_resume(settings)

    def _prepare_resume(self, settings: dict) -> None:
        if not self.old_env.get("run_id"):  # its rows could not be told from this process's
            raise UsageError(f"--resume: {self.out_dir / 'env.json'} records no run_id, so its run cannot be "
                             "continued; use --append for a new run beside it, or a new --output-dir")
        if "endpoint" in self.old_env["config"]:  # no in-process settings could match a served run's
            raise UsageError(f"--resume: {self.out_dir} holds a run of a served model (run --endpoint), which an "
                             "in-process run cannot continue; use --append for a new run beside it, or a new "
                             "--output-dir")
        old_settings = config_fingerprint(self.old_env.get("config") or {})[1]
        if old_settings != settings:
            changed = sorted(k for k in set(old_settings) | set(settings) if old_settings.get(k) != settings.get(k)
                             and not _derived(k, old_settings, settings))
            shown = ", ".join(f"--{k.replace('_', '-')} {old_settings.get(k)!r} -> {settings.get(k)!r}"
                              for k in changed[:3]) + (", ..." if len(changed) > 3 else "")
            raise UsageError(f"--resume: {self.out_dir} holds a run of another configuration ({shown}): "
                             "give its settings, or --append for a new run")
        old_inputs = self.old_env.get("inputs")
        if isinstance(old_inputs, dict):  # recorded since runs kept digests of their inputs
            changed = [k for k in sorted(set(old_inputs) | set(self.inputs)) if old_inputs.get(k) != self.inputs.get(k)]
            if changed:
                raise UsageError(f"--resume: {self.out_dir} holds a run of other inputs: the {', '.join(changed)} "
                                 "at the same paths changed since it began (contents differ); give its inputs, "
                                 "or --append for a new run")
        self.run_id = self.old_env.get("run_id") or self.run_id
        old_rows = read_runs(self.out_dir / "runs.csv")
        self.first_row = len(old_rows)  # this process's rows follow them (env.json's "resumed" entry)
        for r in old_rows:
            if r.get("run_id") == self.run_id:
                key = (r.get("variant"), _point_key(r) if r.get("batch_size") is not None else None)
                self.prior.setdefault(key, []).append(r)

    def _env(self) -> dict:
        """env.json's content for this invocation (--append: every run's, under "runs")."""
        old = self.old_env
        if self.mode == "resume" and old is not None:  # recorded once this process has written rows
            # "first_row": runs.csv's rows from that one on are this process's (bench.analysis.reference.processes)
            mine = [{"first_row": self.first_row, "at": utc_now(), "command": self.command}] if self.rows else []
            return {**old, "resumed": [*old.get("resumed", []), *mine]}
        env = envinfo.collect(self.command, self.monitor.device_facts(), {
            "config": asdict(self.cfg), "fingerprint": self.fingerprint, "device": str(self.device),
            "dtype": str(self.dtype), "attention_kernels": attention_kernels.describe(self.cfg.attention_kernels),
            "engines": self._engine_specs(), "host": self.host_facts, "preprocess": self.preprocess_facts,
            "model": self.source.name, "weights": self.source.weights, "run_id": self.run_id,
            "inputs": self.inputs,
        })
        if self.mode == "append" and old is not None:
            # the top level is the latest record of the run before (its "resumed" entries included)
            runs = {**(old.get("runs") or {}), old.get("run_id", "?"): {k: v for k, v in old.items() if k != "runs"}}
            runs[self.run_id] = env
            return {**env, "runs": runs}
        return env

    # ------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Measure every variant into the results directory; a usage error found on the way (one
        only a loaded model shows), or a disk that fills before any row is finished (NothingWritten),
        leaves the directory as it was before."""
        before = DirState(self.out_dir)
        try:
            self._run_into_dir(before)
        except (UsageError, NothingWritten):
            before.remove_created()
            raise
        return self.out_dir

    def _run_into_dir(self, before: DirState) -> None:
        make_dir(self.out_dir, "--output-dir")
        lock = DirLock(self.out_dir)  # a concurrent writer is refused here (its directory left alone)
        try:
            self.writer = run_writer(self.out_dir)  # refuses a runs.csv with other columns
            self.host_facts = host.set_cpu_threads(self.cpu_threads)
            refused = False
            try:
                write_json(self.out_dir / "env.json", self._env())
                self._run_variants()
            except UsageError:
                refused = True
                raise
            except Exception as e:  # a full disk before any row: nothing to summarize (the files are put back)
                refused = no_room(e) is not None and not self.rows
                raise
            finally:
                self.writer.close()
                if (self.preprocess_facts or self.rows) and not refused:  # decided per loaded model; a resume's record
                    write_json(self.out_dir / "env.json", self._env())
                if not refused:
                    self._write_summary()
        except UsageError:
            before.restore_files()  # under the lock
            raise
        except Exception as e:  # (a full disk's OSError, or an error raised while handling one)
            # no row: not a directory holding no env.json, which nothing could continue or read
            nothing = before.nothing_written(e, len(self.rows))
            if nothing is None:
                raise
            raise nothing from e
        finally:
            lock.release()

    def _write_summary(self) -> None:
        """summary.csv from every run in runs.csv (this one only when the directory was new); a
        failure here (a host out of memory) keeps the previous file and says how to rebuild it."""
        try:
            self.summary = self._summarize()
            write_summary(self.out_dir, self.summary)
        except Exception as e:  # noqa: BLE001 - the rows are safe in runs.csv
            self.summary = None
            status(f"summary.csv not written ({e.__class__.__name__}: {e}); "
                   f"rebuild it with: python -m bench summarize {self.out_dir}")

    def exit_code(self) -> int:
        """0: all measured; 1: something failed, something measured; 3: nothing measured."""
        rows = [*self.rows, *(r for rs in self.prior.values() for r in rs)]
        measured = any(r.get("status") == "ok" and r.get("kind") == "measured" for r in rows)
        failed = any(r.get("status") == "failed" for r in rows)
        return 3 if not measured else 1 if failed else 0

    def _point_done(self, variant_name: str, point) -> bool:
        """--resume: the point has its outcome already (a failed or skipped row, or every
        measured group complete by the stop rule)."""
        rows = self.prior.get((variant_name, _point_key(point.columns())), [])
        if any(r.get("status") != "ok" for r in rows):
            return True
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if r.get("kind") == "measured":
                groups.setdefault(r.get("cache_state"), []).append(r)
        if "none" in groups:
            return self._group_done(*_progress(groups["none"]))
        if "cold" in groups:
            return all(self._group_done(*_progress(groups.get(state, []))) for state in ("cold", "warm"))
        return False

    def _group_done(self, attempts: int, clean: int, measured_s: float) -> bool:
        """Whether a measured group is finished (the stop rule): enough clean runs (those a
        summary counts) and time, or --max-runs attempts, the runs left out included."""
        cfg = self.cfg
        return (clean >= cfg.num_runs and measured_s >= cfg.min_seconds) or attempts >= cfg.max_runs

    def say_started(self) -> None:
        """The run's one-line warnings about its configuration, once it has started (past every
        usage error its start may raise: the directory, its lock, a sweep's workers)."""
        if warning := self.source.max_tiles_warning():
            status(warning)

    def _run_variants(self) -> None:
        if self.cfg.executor == "serial":
            self.say_started()
            for job in self.plan:
                self.run_job(job)
            return
        from bench.run import executors

        executors.run(self, self.plan)

    def run_job(self, job: Job, finished=None) -> None:
        """The job's variants in order, loading their weights once; `finished(name)` is called
        as each variant's rows are all out."""
        loaded = None
        for variant in (self.variants[i] for i in job.variants):
            loaded = self._run_variant(variant, loaded)
            if finished is not None:
                finished(variant.name)

    def _run_variant(self, variant, loaded):
        """One variant's rows; returns the loaded model for the next variant (None when freed)."""
        base = self._base_row(variant)
        if self.prior.get((variant.name, None)) or (
                self.mode == "resume" and all(self._point_done(variant.name, p) for p in self.cfg.points)):
            return loaded  # --resume: this variant's outcome is in runs.csv already
        try:
            reason = variant.unavailable_reason(self.device) or variant.weights.source_reason(self.source)
            if reason:
                self._emit({**base, "status": "skipped", "error": reason})
                return loaded
            options = variant.weights.options(self.cfg)
            if loaded is None or variant.weights.key(options) != loaded.weights_key:
                loaded = None
                self._free()
                status(f"{variant.name}: loading {variant.weights.name} weights")
                loaded = variant.weights.load(self.source, self.device, self.dtype, options)
                self._check_prompts(loaded.adapter)
                self._placement = place_preprocessing(  # once per loaded model
                    loaded.adapter, self.cfg.preprocess, self.device, self.fidelity_visual)
            self.preprocess_facts[variant.name] = self._placement
            probe = self.cfg.fidelity and not self.source.prequantized  # as _fidelity decides
            status(f"{variant.name}: {'fidelity probe, then ' if probe else ''}measured runs")
            fid = self._fidelity(variant, loaded)
            self._measure_variant(variant, loaded, {**base, **fid})
            self._engine_done()  # the variant's, before the next variant's is made
            return loaded
        except VariantUnsupported as e:  # the loaded weights serve the next variant
            self._emit({**base, "status": "skipped", "error": str(e)[:500]})
            skipped = True
        except UsageError:  # the user's to fix (e.g. a prompt longer than the loaded model's context)
            raise
        except Exception as e:  # noqa: BLE001 - any fault (host or device out of memory too) is this variant's
            self._emit({**base, "status": "failed", "error": _reason(e)})
            loaded, skipped = None, False
        # outside the handler, whose exception's frames hold what the variant made (an engine found
        # unsupported midway, e.g. by a capture in its fidelity probe, with its graphs and buffers)
        if skipped:
            self._engine_done()
        else:  # the loaded weights too
            self._free()
        return loaded

    def _check_prompts(self, adapter) -> None:
        """Every workload point's longest prompt (measured and warm-up questions, and the fidelity
        probe), tokenized as its runs are, against the model's positions and the device's
        memory, before any measured run: a UsageError (exit 2). Once: every variant of a run
        tokenizes alike. Positions not known before loading come from the loaded model."""
        if self.prompts_checked:
            return
        if self.dims.max_pos is None:
            self.dims = replace(self.dims, max_pos=loaded_max_pos(getattr(adapter, "model", None)))
        cfg = self.cfg
        checks = [(p, self._point_questions(adapter, p) + self.warmups[:cfg.warmup], None) for p in cfg.points]
        if cfg.fidelity and not self.source.prequantized:  # the probe generates --max-new-tokens tokens
            checks.append((WorkloadPoint(new_tokens=cfg.max_new_tokens, num_images=self._probe_images()),
                           [FIDELITY_PROBE], "--max-new-tokens"))
        for point, questions, new_flag in checks:
            try:
                prompts = [adapter.prepare_text(q, v) for v in self._size_visuals(point) for q in questions]
            except QuestionError as e:
                flag = f"--questions {cfg.questions}" if cfg.questions else "--text-prompt"
                raise UsageError(f"{flag}: {e}") from None
            longest = max(prompts, key=lambda prepared: prepared.prompt_tokens)
            check_prompt(cfg, self.dims, self.source.name, point, longest, self.frames, self.device, self.dtype,
                         new_flag)
        self.prompts_checked = True

    def _probe_images(self) -> int:
        """Images the fidelity probe shows with image input: the fewest a workload point shows."""
        return min(p.num_images for p in self.cfg.points)

    def _size_visuals(self, point) -> list[VisualInput]:
        """What a point's requests show, as far as their token counts go (which depend on the
        images' number and sizes only): the image `num_images` times (its derived images are
        the same size), the clip's frames, or one frame of each size the frames come in."""
        if self.frames is None:
            return [VisualInput((self.image,) * point.num_images)]
        sizes = self.frames.sizes
        if not all(w and h for w, h in sizes):  # a video stream that does not say: its first frame
            sizes = [next(iter(self.frames)).size] * len(sizes)
        if self.cfg.video_mode == "clip":
            return [VisualInput(tuple(Image.new("1", s) for s in sizes), video=True)]
        return [VisualInput((Image.new("1", s),)) for s in dict.fromkeys(sizes)]

    def _engine_options(self, variant) -> dict:
        """EngineSpec fields this run sets for the variant's engine: the run's (attention kernels,
        decode attention, PDL) and whatever its weights part chooses (bench.engines.spec)."""
        weights = variant.weights
        return {**self.cfg.engine_options(), **weights.engine_options(weights.options(self.cfg))}

    def _engine_specs(self) -> dict:
        """The spec each variant's engine runs with, by variant (and the fidelity reference's)."""
        specs = {v.name: {"engine": v.engine.name, **asdict(v.engine.spec(**self._engine_options(v)))}
                 for v in self.variants}
        if self.cfg.fidelity and not self.source.prequantized:
            base = baseline_variant()
            specs["fidelity reference"] = {"engine": base.engine.name,
                                           **asdict(base.engine.spec(**self._engine_options(base)))}
        return specs

    def _policy(self, variant, loaded):
        """A fresh cache policy of the variant's cache part for this loaded model."""
        return variant.cache.make_policy(variant.cache.options(self.cfg), loaded.weights_key)

    def _engine(self, variant, loaded, policy):
        return variant.engine.make_engine(loaded.adapter, policy, **self._engine_options(variant))

    def _fidelity(self, variant, loaded) -> dict:
        """Fidelity columns for this variant; the fp16 reference is made once, first."""
        if not self.cfg.fidelity or self.source.prequantized:  # no fp16 weights to compare against
            return {}
        base = baseline_variant()
        if self.reference is None:
            base_options = base.weights.options(self.cfg)
            if loaded.weights_key == base.weights.key(base_options):
                ref = loaded
            else:  # load the baseline weights just for the reference, then free them
                ref = base.weights.load(self.source, self.device, self.dtype, base_options)
            ref_engine = self._engine(base, ref, self._policy(base, ref))
            self.reference = fidelity.make_reference(ref_engine, self.fidelity_visual, self.cfg.max_new_tokens)
            del ref_engine, ref
            self._free()
        engine = self._engine(variant, loaded, self._policy(variant, loaded))
        columns = fidelity.compare(self.reference, engine, self.fidelity_visual)
        del engine
        self._engine_done()  # the probe's, before the measured runs' is made
        return columns

    @functools.cached_property
    def fidelity_visual(self):
        """What the fidelity probe shows: the run's image (as many images as the run's requests
        show at fewest: --num-images), the clip, or the first sampled frame (read once: every
        variant is probed on it)."""
        if self.frames is None:
            n = self._probe_images()
            return self.image if n == 1 else VisualInput(tuple(derived_images(self.image, n)))
        if self.cfg.video_mode == "clip":
            return self.frames.clip()
        return next(iter(self.frames))

    def _engine_done(self) -> None:
        """An engine is no longer used (a variant's, a fidelity probe's): on a device in
        FREE_ENGINES_ON it is freed now (_free), before the next engine is made beside it: its
        CUDA graphs, memory pools and buffers are device memory, and in a reference cycle under
        the frozen heap it would otherwise outlive its variant (its graphs once destroyed by a
        collection inside a later capture: bench.measure.capture). On the CPU its memory is the
        host's and goes at the next point's collection; a full collection costs 0.2-0.4 s with
        a test process's heap, twice per variant."""
        if self.device.type in self.FREE_ENGINES_ON:
            self._free()

    def _free(self) -> None:
        """Garbage freed now (frozen too: bench.run.host), and on CUDA the cached blocks: an
        engine no longer used, in reference cycles, would otherwise keep its graphs and buffers
        until some later collection (inside a CUDA graph capture: bench.measure.capture)."""
        host.release_frozen()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _base_row(self, variant) -> dict:
        return identity_columns(self.source, variant, self.device, self.dtype)

    def _emit(self, row: dict) -> None:
        self.record({"timestamp": utc_now(), "run_id": self.run_id, **self.placement, **row})

    def record(self, row: dict) -> None:
        """A finished row: to the results directory's runs.csv (a worker's: to its sink)."""
        if self.sink is not None:
            self.sink(row)
        else:
            self.writer.write(row)
        self.rows.append(row)
        if len(self.rows) == 1 and self.sink is None and self.mode == "resume" and self.old_env is not None:
            # this process's first row: its "resumed" entry now, not only at the end (a process
            # killed outright would leave its rows counted as the one's before it)
            write_json(self.out_dir / "env.json", self._env())

    def lost_job_rows(self, job: Job, finished: set[str], reason: str, placement: dict) -> None:
        """Failed rows for the work a dead worker left: every workload point of each of the job's
        variants not finished (nor already complete under --resume)."""
        for variant in (self.variants[i] for i in job.variants):
            if variant.name in finished or self.prior.get((variant.name, None)):
                continue
            for point in self.cfg.points:
                if self.mode == "resume" and self._point_done(variant.name, point):
                    continue
                self.record({"timestamp": utc_now(), "run_id": self.run_id, **placement,
                             **self._base_row(variant), **point.columns(), "status": "failed",
                             "error": reason[:500]})

    # ------------------------------------------------------------------------------------
    def _measure_variant(self, variant, loaded, base: dict) -> None:
        """Every workload point on one engine (compiled code and graphs are reused across points).

        A point that fails gets a failed row with the reason; the engine and its cache are then
        freed and made again from the loaded model, and the next point runs on them. If that
        remake fails too, every remaining point gets a failed row saying why."""
        adapter = loaded.adapter
        policy = self._policy(variant, loaded)
        engine = self._engine(variant, loaded, policy)
        base = {**base, "weight_mb": weight_mb(adapter.model), **loaded.columns(), **engine.memory_columns()}
        points = self.cfg.points
        for i, point in enumerate(points):
            if self.mode == "resume" and self._point_done(variant.name, point):
                continue
            row = {**base, **point.columns()}
            failed = False
            try:
                self._measure_point(engine, policy, adapter, point, row)
            except VariantUnsupported as e:
                self._emit({**row, "status": "skipped", "error": str(e)[:500]})
            except Exception as e:  # noqa: BLE001 - MemoryError, OutOfMemoryError, any other fault
                self._emit({**row, "status": "failed", "error": _reason(e)})
                failed = True
            if not failed:
                continue
            engine = policy = None
            self._free()
            try:
                policy = self._policy(variant, loaded)
                engine = self._engine(variant, loaded, policy)
            except Exception as e:  # noqa: BLE001
                why = f"not run: the engine could not be made again after {point.label()} failed: {_reason(e)}"
                for rest in points[i + 1:]:
                    if not (self.mode == "resume" and self._point_done(variant.name, rest)):
                        self._emit({**base, **rest.columns(), "status": "failed", "error": why[:500]})
                return

    def _point_questions(self, adapter, point) -> list[str]:
        """The point's questions: as given, or stretched/cut to its question tokens, counted as the
        question alone without special tokens (as endpoint mode counts them with --tokenizer), so
        both modes send the same text. Made once a run: every variant's tokenizer is the source's."""
        n = point.question_tokens
        if n is None:
            return self.questions
        if n not in self.point_questions:
            self.point_questions[n] = questions_of_length(adapter.count_tokens, self.questions, n)
        return self.point_questions[n]

    def _measure_point(self, engine, policy, adapter, point, base: dict) -> None:
        cfg = self.cfg
        questions = self._point_questions(adapter, point)
        state = "warm" if policy.stateful else "none"
        source = RequestSource(point, self.image, self.frames, cfg.video_mode, adapter.preprocess,
                               self.image_file)
        # --resume: this point's rows already written (warm-ups then run again unrecorded, and a
        # measured group goes on from its count; complete groups are not run again).
        prior = [r for r in self.prior.get((base["variant"], _point_key(point.columns())), []) if r.get("status") == "ok"]
        try:
            host.before_warmup()  # a full collection now, not before the measured runs (bench.run.host)
            generic = [self.warmups[i % len(self.warmups)] for i in range(cfg.warmup)]
            batches = [(generic, i, False) for i in range(cfg.warmup)]
            if cfg.warmup:
                batches += [(qs, 0, True) for qs in
                            shape_matched_warmups(adapter, questions, point.batch_size, cfg.max_runs)]
            record_warmups = not any(r.get("kind") == "warmup" for r in prior)
            # A cache's cold requests (prefill of the whole prompt, then store) meet other shapes
            # than its warm ones: each shape-matched warm-up batch runs cold, then warm.
            plan = [(qs, start, s) for qs, start, matched in batches
                    for s in ((("cold", "warm") if matched else ("warm",)) if policy.stateful else (state,))]
            for k, (qs, start, cache_state) in enumerate(plan):
                if cache_state == "cold":
                    policy.clear()
                self._timed_run(engine, source, qs, start, point,
                                {**base, "kind": "warmup", "run_index": k,
                                 "cache_state": None if policy.stateful else state}, record_warmups)

            # each group, cold and warm alike, stops after --num-runs runs and --min-seconds (or --max-runs)
            groups = ["cold", state] if policy.stateful else [state]
            ran_cold = False
            for cache_state in groups:
                if cache_state == "warm" and self.frames is not None and cfg.video_mode == "frames":
                    raise VariantUnsupported("warm runs not measured: --video-mode frames shows each request its "
                                             "own frame, so no request reuses another's cached work (the cold rows "
                                             "are this variant's measurement)")
                # --resume: the group goes on from its rows (attempts after every earlier one, those
                # left out included: their run_index is taken, and they count toward --max-runs)
                attempts, n, measured_s = _progress([r for r in prior if r.get("kind") == "measured"
                                                     and r.get("cache_state") == cache_state])
                if self._group_done(attempts, n, measured_s):
                    continue
                bar = tqdm(total=cfg.num_runs, desc=f"{base['variant']} {point.label()} [{cache_state}]",
                           leave=False,
                           disable=None if self.placement["worker"] == "serial" else True)  # a sweep has one bar
                if policy.stateful and cache_state == "warm" and prior and not ran_cold:
                    # --resume: the cache is empty in this process; one unrecorded run fills it as
                    # the cold runs would have, so the first recorded warm run is warm
                    self._timed_run(engine, source, questions, 0, point,
                                    {**base, "kind": "measured", "run_index": -1, "cache_state": "cold"}, False)
                ran_cold = ran_cold or cache_state == "cold"
                # n counts clean runs (bench.measure.schema.counts_in_summary): a run that compiled
                # or captured is recorded, left out, and made again (at most --max-runs attempts).
                while not self._group_done(attempts, n, measured_s):
                    if cache_state == "cold":
                        policy.clear()
                    row = self._timed_run(engine, source, questions, n * point.batch_size, point,
                                          {**base, "kind": "measured", "run_index": attempts,
                                           "cache_state": cache_state})
                    attempts += 1
                    if counts_in_summary(row):
                        measured_s += row["e2e_ms"] / 1e3
                        n += 1
                        bar.update(1)
                bar.close()
        finally:
            source.close()

    def _timed_run(self, engine, source: RequestSource, questions: list[str], start: int, point, base: dict,
                   record: bool = True) -> dict:
        interrupt.check()  # a Ctrl-C whose KeyboardInterrupt a finalizer dropped (bench.run.interrupt)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        calibrate = self.cfg.calibrate and base["kind"] == "measured"
        calib_ms = calibration.reference_ms() if calibrate else None
        with host.one_request():  # garbage collection: bench.run.host
            compiles = compile_events.count()
            self.monitor.start()  # GPU utilisation covers waiting for frames too: what a loader buys
            t0 = time.perf_counter()
            requests, waited_s = source.next(questions, start)
            result = engine.run_batch(requests, point.new_tokens)
            stream_ms = (time.perf_counter() - t0) * 1e3
            gpu = self.monitor.stop()
            compiles = compile_events.count() - compiles
        if base["cache_state"] == "warm" and not result.cache_hit:
            # a "warm" row that missed would be a cold number under a warm label: the point fails
            why = engine.policy.refusal()
            raise RuntimeError(f"{why}; raise it" if why else "a warm request missed the cache (no earlier request "
                               "stored what it shows)")
        if base["cache_state"] is None:  # a cache's warm-up: cold or warm as it turned out
            base = {**base, "cache_state": "warm" if result.cache_hit else "cold"}
        row = {**base, "status": "ok", "question": requests[0][1], "compiles": compiles,
               "preprocess_device": (engine.adapter.preprocess_device or torch.device("cpu")).type,
               **request_metrics(result, point.new_tokens),
               "load_ms": waited_s * 1e3, "stream_ms": stream_ms,
               "gpu_phase_pct": 100 * sum(result.phases_ms.get(k, 0.0) for k in GPU_PHASES) / stream_ms,
               "output_text": printable(engine.adapter.decode(result.tokens))[:80]}
        if calibrate:
            calib_ms = (calib_ms + calibration.reference_ms()) / 2
            row["calib_ms"] = calib_ms
            row["ttft_rel"] = row["cpu_ttft_ms"] / calib_ms
            if row.get("cpu_tpot_ms") is not None:
                row["tpot_rel"] = row["cpu_tpot_ms"] / calib_ms
        if cuda:
            row["peak_alloc_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            row["peak_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / 2**20
        row["nvml_used_mb"] = gpu.nvml_used_mb
        row["gpu_util_pct"] = gpu.gpu_util_pct
        if gpu.energy_j is not None:
            row["energy_j_per_token"] = gpu.energy_j / (point.new_tokens * point.batch_size)
        if record:
            self._emit(row)
        return row

    # ------------------------------------------------------------------------------------
    def summary_rows(self) -> list[dict]:
        """What summary.csv holds (every run of the directory's runs.csv when appending or resuming)."""
        return self._summarize() if self.summary is None else self.summary

    def _summarize(self) -> list[dict]:
        if self.mode != "new":
            return summarize_runs(read_runs(self.out_dir / "runs.csv"), self.cfg)
        # in the order of --variants, however the sweep's workers finished (a stable sort)
        order = {v.name: i for i, v in reversed(list(enumerate(self.variants)))}
        return summarize_runs(sorted(self.rows, key=lambda r: order.get(r.get("variant"), len(order))), self.cfg)


GPU_PHASES = ("restore", "vision", "prefill", "store", "decode")  # timed with CUDA events on a GPU


def _gpu_label(device: torch.device) -> str:
    """The GPU as the machine numbers it (CUDA_VISIBLE_DEVICES maps this process's cuda:N)."""
    if device.type != "cuda":
        return ""
    index = device.index or 0
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[index] if index < len(visible) else str(index)


def _reason(e: BaseException) -> str:
    """A failed row's error cell: the exception's class and message, one line, at most 500 chars."""
    return " ".join(f"{e.__class__.__name__}: {e}".split())[:500]
