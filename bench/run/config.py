"""One validated config per invocation; the CLI flags are generated from its fields.

The run config is composed: the run's own fields (RunFields) with the options of every variant
part (variants.option_classes(), each field declared once in its part's options dataclass)
inserted after --max-new-tokens. config_class() composes it for the parts registered now;
RunConfig is the composition for the package's own parts.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from pathlib import Path

from bench.engines import attention_kernels
from bench.engines.spec import DECODE_ATTENTION
from bench.pdl import MODES as PDL_MODES
from bench.errors import ArgumentParser, UsageError, check_seed
from bench.models.family import DEFAULT_MAX_TILES
from bench.run.summary import ValidityRule
from bench.run.workload import DEFAULT_LOADER, LOADERS, VIDEO_MODES, int_list, name_list, workload_points
from variants.options import empty_flag, flag_fields, opt, options_from, run_facts

DEMO_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "demo.png"
DEFAULT_PRESET = "tiny-vila"
MAX_TILES = 64  # InternVL tiles per still image (its processors use max_num 12, some configs up to 40)
MAX_FRAMES = 4096  # sampled video frames (each is at least one image token of the prompt)
DEFAULT_FRAMES = 8  # --num-frames left out
PREPROCESS_PLACES = ("device", "cpu")
EXECUTORS = ("serial", "local", "ray")
MAX_CPU_THREADS = 1024
MAX_WARMUP = 1000  # warm-up requests per variant (or endpoint point): their questions are made up front
MAX_WORKERS = 1024  # --executor local's worker processes (each loads its own model)
MAX_RUNS_PER_RUN = 20  # --max-runs 0: this many measured runs per --num-runs at most
PART_OPTIONS_AFTER = "max_new_tokens"  # where the variant parts' flags go in the field (and --help) order


@dataclass
class RunFields:
    """The run's own settings (the variant parts' are in their options dataclasses)."""
    model_path: str | None = opt("checkpoint directory in a family's published layout: LLaVA-1.5 (llava-hf), VILA1.5 "
                                 "(llm/ vision_tower/ mm_projector/), InternVL3 (-hf), InternVideo2.5, VITA-1.5 "
                                 "(`list` shows the layouts)",
                                 aliases=("--model_path",), nonempty="a directory")
    preset: str | None = opt(f"architecture preset with random weights (default: {DEFAULT_PRESET} when no "
                             "--model-path)", nonempty="a preset name")
    image_path: str | None = opt("image file (default: the demo image shipped with the repo); with --video-path or "
                                 "--frames-dir the requests show the frames, and awq4 calibrates on this image",
                                 aliases=("--image_path", "--image-file"), nonempty="a path")
    video_path: str | None = opt("video file (decoded with PyAV); frames sampled uniformly (--num-frames)",
                                 nonempty="a path")
    frames_dir: str | None = opt("folder of extracted video frames (sorted by name), sampled like --video-path",
                                 nonempty="a directory")
    num_frames: int | None = opt(f"video: frames sampled uniformly (default: {DEFAULT_FRAMES}; 0: every frame)")
    video_mode: str | None = opt("video: frames (each request shows the next frame, as frame-by-frame analysis) or "
                                 "clip (each request shows all sampled frames as one video) (default: frames)",
                                 nonempty="a mode")
    loader: str | None = opt("--video-mode frames: serial (read + preprocess each frame when needed), prefetch "
                             "(a background thread does it ahead), or both: serial,prefetch (default: prefetch)",
                             nonempty="a loader name")
    text_prompt: str | None = opt("the question to measure (default: a built-in list of questions)",
                                  aliases=("--text_prompt", "--query"))
    questions: str | None = opt("file with one measured question per line", nonempty="a path")
    conv_mode: str | None = opt("conversation template (default: the model's)",
                                aliases=("--conv_mode",), nonempty="a template name")
    variants: str = opt("comma-separated variants, each up to one part of each kind joined by '+' (e.g. "
                        "fp16,prefix,bnb4+prefix+static); a variant's weights are fp16, its cache nocache and its "
                        "engine hf unless it names another", "fp16")
    engine: str | None = opt("comma list of engines to cross with every variant that names none (default: hf)")
    batch_size: str = opt("requests run together as one batch; a list sweeps it, e.g. 1,4,16", "1")
    prompt_lengths: str | None = opt("question lengths in tokens to sweep, e.g. 16,128,512 (questions are "
                                     "repeated or cut to length; default: as written)")
    new_tokens: str | None = opt("generated-token counts to sweep, e.g. 32,128 (default: --max-new-tokens)")
    num_images: str | None = opt("images per prompt (the image, then flips/rotations of it); a list sweeps it "
                                 "(default: 1, or the frames a model merges together: 4 for InternVideo2.5)")
    max_tiles: int = opt("tiles per still image (aspect-ratio grid + thumbnail, as the processor; 1 = no tiling) "
                         "where the model tiles: InternVL, VITA-1.5, InternVL2.5 in the InternVideo2.5 layout "
                         "(no frame merging)", DEFAULT_MAX_TILES)
    num_runs: int = opt("measured runs per variant (at least)", 10, aliases=("--num_runs",))
    min_seconds: float = opt("measured time per variant (at least), s", 1.0)
    max_runs: int = opt(f"hard cap on measured runs per variant (0: {MAX_RUNS_PER_RUN} x --num-runs)", 0)
    warmup: int = opt("warm-up runs per variant (unmeasured questions); when at least 1, also one batch per "
                      "distinct sequence of prompt lengths the measured batches hold, in other text of the same "
                      "token counts (cold, then warm, with a cache), so no measured run meets a new shape (0: none)",
                      2)
    max_new_tokens: int = opt("tokens generated per request (fixed: EOS ignored)", 128,
                              aliases=("--max_new_tokens",))
    fidelity: bool = opt("measure token_agree / kl_mean against the fp16 baseline for every variant", True)
    attention_kernels: str = opt("SDPA kernels: deterministic (no cuDNN attention for calls of fewer than 16 "
                                 "queries, such as decode steps: repeated requests give the same tokens) or auto "
                                 "(torch's choice everywhere: on the H200 cuDNN, whose decode kernel does not "
                                 "repeat its output)", "deterministic")
    decode_attention: str = opt("how the graph engine's compiled one-query decode steps attend (graph-exact keeps "
                                "transformers' attention): matmul (two "
                                "batched GEMMs around a softmax, in transformers' eager arithmetic), split-kv "
                                "(a Triton kernel reading the keys in splits at once, then combining them; "
                                "deterministic; fp32 scores; CUDA only) or auto (split-kv where it runs, with "
                                "--attention-kernels deterministic; else matmul, or SDPA under --attention-kernels "
                                "auto)", "auto")
    pdl: str = opt("programmatic dependent launch of the graph engine's compiled layers' Triton kernels, "
                   "the split-KV attention kernels and the triton-f16x2 int4 GEMV (static engine too): each may "
                   "start while the one before ends, waiting for its output; auto (on where the GPU, compute "
                   "capability 9+, and torch have it) or off (each kernel launched after the one before "
                   "has finished)", "auto")
    max_cv: float = opt("a summary is valid only if its coefficient of variation is at most this", 0.10)
    device: str = opt("cuda, cuda:N, cpu or auto", "auto")
    executor: str = opt("how the sweep's jobs (the variants sharing one loaded model) run: serial (this process), "
                         "local (a worker process per --gpus entry, or --workers processes on --device cpu) or ray "
                         "(a Ray task per job with a whole GPU; --ray-address) (default: local when --gpus or "
                         "--workers is given, else serial)", "")
    gpus: str | None = opt("local executor: GPUs to run workers on, one worker process per GPU (CUDA_VISIBLE_DEVICES "
                           "set per worker), e.g. 0,1,2,3 or all")
    workers: int = opt("local executor on --device cpu: worker processes; ray executor started here: logical GPUs "
                       "the local Ray instance offers (0: the GPUs it finds)", 0)
    ray_address: str | None = opt("ray executor: the cluster to join (auto: the one this machine belongs to, as under "
                                  "`ray job submit`; default: start a local Ray instance)")
    worker_timeout: float = opt("local and ray executors: a worker that sends nothing (no finished row) for this "
                                "many seconds after its last message is stopped, and its job's unfinished work "
                                "becomes failed rows; a local worker has at least 300 s to start (0: wait forever)",
                                3600.0)
    preprocess: str = opt("where the image processor runs: device (the request's device, for processors that can: "
                          "transformers' torchvision-backed ones; any other stays on the host and env.json says "
                          "why) or cpu", "device")
    cpu_threads: int = opt("torch CPU threads (0: 1 with a CUDA device, where the host only processes images and "
                           "launches kernels; every core, torch's own choice, when the model runs on the CPU)", 0)
    calibrate: bool = opt("CPU device: measure a fixed reference workload's CPU time next to every measured "
                          "request and record the request's CPU times relative to it (calib_ms, ttft_rel, "
                          "tpot_rel): comparable across load and machines (ci-bench gates on them)", False)
    dtype: str = opt("float16, bfloat16, float32 or auto (float16 on CUDA, float32 on CPU)", "auto")
    output_dir: str | None = opt("results directory (default: results/local/<time>-<model>); it must be new or "
                                 "empty unless --append or --resume", nonempty="a directory")
    append: bool = opt("add this run (a new run_id) to --output-dir's runs.csv; summaries keep runs apart", False)
    resume: bool = opt("finish --output-dir's interrupted run (same run_id, same configuration): groups "
                       "already complete are not run again", False)
    seed: int = opt("seed of preset weights and of the rows AWQ calibration keeps (decoding is greedy either "
                    "way)", 0)
    wide: bool = opt("console summary with every column at the terminal's width (otherwise the key columns "
                     "in 100 columns; the CSV files hold everything either way)", False)


class RunConfigBase:
    """What every composed run config does: validation and the variant list."""
    option_classes: tuple[type, ...] = ()  # the variant parts' options dataclasses composed in

    def __post_init__(self):
        if empty := empty_flag(self):  # every flag's, the variant parts' too
            raise UsageError(empty)
        if self.model_path and self.preset:
            raise UsageError("give either --model-path or --preset, not both")
        if self.append and self.resume:
            raise UsageError("give --append or --resume, not both")
        if (self.append or self.resume) and not self.output_dir:
            raise UsageError(f"--{'append' if self.append else 'resume'} needs --output-dir")
        if not self.model_path and not self.preset:
            self.preset = DEFAULT_PRESET
        for name in ("num_runs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.warmup < 0 or self.min_seconds < 0 or self.max_runs < 0:
            raise UsageError("--warmup, --min-seconds and --max-runs must not be negative")
        if self.warmup > MAX_WARMUP:
            raise UsageError(f"--warmup {self.warmup}: at most {MAX_WARMUP} warm-up runs per variant")
        check_seed(self.seed)
        if self.dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise UsageError(f"unknown --dtype {self.dtype!r}; choose auto, float16, bfloat16 or float32")
        if self.image_path is None:
            self.image_path = str(DEMO_IMAGE)
        for cls in self.option_classes:  # each options dataclass checks its own values
            self.part_options(cls)
        if self.video_path and self.frames_dir:
            raise UsageError("give --video-path or --frames-dir, not both")
        if self.num_frames is None:
            self.num_frames = DEFAULT_FRAMES
        if self.num_frames < 0:
            raise UsageError("--num-frames must not be negative")
        if self.max_tiles < 1:
            raise UsageError("--max-tiles must be at least 1")
        if self.max_tiles > MAX_TILES:
            raise UsageError(f"--max-tiles {self.max_tiles}: at most {MAX_TILES} tiles per image "
                             "(InternVL's processors use up to 12; 40 at most)")
        if self.num_frames > MAX_FRAMES:
            raise UsageError(f"--num-frames {self.num_frames}: at most {MAX_FRAMES} (0: every frame)")
        ValidityRule(self.num_runs, self.min_seconds, self.max_cv)  # --max-cv, --min-seconds: as summaries check them
        attention_kernels.check(self.attention_kernels)
        if self.decode_attention not in DECODE_ATTENTION:
            raise UsageError(f"unknown --decode-attention {self.decode_attention!r}; choose "
                             f"{' or '.join(DECODE_ATTENTION)}")
        if self.pdl not in PDL_MODES:
            raise UsageError(f"unknown --pdl {self.pdl!r}; choose {' or '.join(PDL_MODES)}")
        if self.preprocess not in PREPROCESS_PLACES:
            raise UsageError(f"unknown --preprocess {self.preprocess!r}; choose {' or '.join(PREPROCESS_PLACES)}")
        if not 0 <= self.cpu_threads <= MAX_CPU_THREADS:
            raise UsageError(f"--cpu-threads must be between 0 (auto) and {MAX_CPU_THREADS}, got {self.cpu_threads}")
        self._check_executor()
        video = bool(self.video_path or self.frames_dir)
        if self.video_mode is not None and self.video_mode not in VIDEO_MODES:
            raise UsageError(f"unknown --video-mode {self.video_mode!r}; choose {' or '.join(VIDEO_MODES)}")
        if self.video_mode is not None and not video:
            raise UsageError("--video-mode applies to video input (--video-path or --frames-dir); image requests "
                             "show their images")
        if video and self.video_mode is None:
            self.video_mode = "frames"
        loaders = name_list(self.loader or DEFAULT_LOADER, "--loader", LOADERS)
        if self.loader is not None and not (video and self.video_mode == "frames"):
            raise UsageError("--loader applies to --video-mode frames (how each request's next frame is read); "
                             + ("a clip request reads all its frames before it starts" if video else
                                "image requests read no frames"))
        images = int_list(self.num_images, "--num-images") if self.num_images is not None else []
        if video and images not in ([], [1]):
            raise UsageError("--num-images applies to image input; a video request shows its frames")
        self.points = workload_points(
            int_list(self.batch_size, "--batch-size"), int_list(self.prompt_lengths, "--prompt-lengths"),
            int_list(self.new_tokens, "--new-tokens") or [self.max_new_tokens], images,
            loaders if video and self.video_mode == "frames" else [])
        if self.max_runs == 0:
            self.max_runs = MAX_RUNS_PER_RUN * self.num_runs
        elif self.max_runs < self.num_runs:
            raise UsageError(f"--max-runs {self.max_runs} caps the runs below --num-runs {self.num_runs}; give "
                             f"--max-runs at least --num-runs (0: {MAX_RUNS_PER_RUN} x --num-runs)")

    def _check_executor(self) -> None:
        if not self.executor:
            self.executor = "local" if self.gpus or self.workers else "serial"
        if self.executor not in EXECUTORS:
            raise UsageError(f"unknown --executor {self.executor!r}; choose {', '.join(EXECUTORS)}")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise UsageError(f"--workers must be between 0 and {MAX_WORKERS} worker processes, got {self.workers}")
        if self.gpus is not None and not self.gpus.strip():
            raise UsageError("--gpus is empty; give GPU indices, e.g. 0,1, or all")
        if self.executor != "local" and self.gpus:
            raise UsageError(f"--gpus applies to --executor local (Ray gives each job a GPU), not {self.executor}")
        if self.workers and (self.executor == "serial" or self.ray_address):
            raise UsageError("--workers applies to --executor local (CPU worker processes) and to a Ray instance "
                             "started here (its logical GPUs), not to "
                             f"{'a cluster joined with --ray-address' if self.ray_address else '--executor serial'}")
        if self.executor == "local":
            if self.gpus and self.workers:
                raise UsageError("give --gpus (a worker per GPU) or --workers (CPU worker processes), not both")
            if not self.gpus and not self.workers:
                raise UsageError("--executor local needs --gpus (e.g. 0,1 or all) or --workers N with --device cpu")
            if self.gpus and self.gpus != "all":
                int_list(self.gpus, "--gpus", 0)
        if not self.worker_timeout >= 0:
            raise UsageError("--worker-timeout must be a number of seconds, 0 or more")
        if self.ray_address is not None and self.executor != "ray":
            raise UsageError("--ray-address applies to --executor ray")
        if self.ray_address is not None:
            ray_endpoint(self.ray_address)

    def engine_options(self) -> dict:
        """The EngineSpec fields this run sets for every engine (a variant's weights part may add more)."""
        return {"attention": self.attention_kernels, "decode_attention": self.decode_attention, "pdl": self.pdl}

    def part_options(self, cls: type):
        """The options dataclass `cls` filled from this config."""
        return options_from(cls, self)

    @property
    def variant_specs(self) -> list[str]:
        """--variants crossed with --engine (a spec that names an engine keeps it), each by its
        variant's name (variants.parse_variant: what its rows carry, however it was spelled)."""
        from variants import parse_variant, registry

        specs = [s.strip() for s in self.variants.split(",") if s.strip()]
        engines = [e.strip() for e in (self.engine or "").split(",") if e.strip()]
        if self.engine is not None and not engines:
            raise UsageError("--engine is empty; give engines to cross with the variants, e.g. static,graph")
        if not engines:
            return [parse_variant(s).name for s in specs]
        parts = registry()
        for e in engines:
            if e not in parts or parts[e].kind != "engine":
                choices = [n for n, p in parts.items() if p.kind == "engine"]
                raise UsageError(f"unknown --engine {e!r}; choose from: {', '.join(choices)}")
        out = []
        for spec in specs:
            named = [n.strip() for n in spec.split("+")]
            if any(n in parts and parts[n].kind == "engine" for n in named):
                out.append(spec)
            else:
                out += [spec if e == "hf" else f"{spec}+{e}" for e in engines]
        return [parse_variant(s).name for s in out]


def ray_endpoint(address: str) -> tuple[str, int] | None:
    """--ray-address as (host, port) to reach (None: auto, Ray's own discovery); a usage error for
    anything else than auto, HOST:PORT or ray://HOST:PORT."""
    text = address.strip()
    if text == "auto":
        return None
    host, _, port = text.removeprefix("ray://").rpartition(":")
    if host and port.isdigit() and 0 < int(port) < 65536 and "/" not in host:
        return host.strip("[]"), int(port)
    raise UsageError(f"--ray-address {address!r}: give HOST:PORT (the cluster's GCS, e.g. 10.0.0.1:6379), "
                     "ray://HOST:PORT (Ray Client) or auto")


def _copy(f):
    return field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)


def compose(option_classes) -> type:
    """A RunConfig dataclass: RunFields with the flag fields of `option_classes` after
    --max-new-tokens (the run facts the options read must be run fields)."""
    option_classes = tuple(option_classes)
    run = list(fields(RunFields))
    names = {f.name for f in run}
    missing = run_facts(option_classes) - names
    if missing:
        raise TypeError(f"variant options read run facts the run config lacks: {', '.join(sorted(missing))}")
    parts = flag_fields(option_classes)
    clash = [f.name for f in parts if f.name in names]
    if clash:
        raise TypeError(f"variant options {', '.join(clash)} clash with the run's own fields")
    at = [f.name for f in run].index(PART_OPTIONS_AFTER) + 1
    specs = [(f.name, f.type, _copy(f)) for f in run[:at] + parts + run[at:]]
    cls = make_dataclass("RunConfig", specs, bases=(RunConfigBase,),
                         namespace={"option_classes": option_classes, "__module__": __name__})
    cls.__doc__ = "The run's validated settings: its own fields and every variant part's options."
    return cls


_composed: dict[tuple, type] = {}


def config_class() -> type:
    """The RunConfig for the variant parts registered now (composed once per set of parts)."""
    from variants import option_classes

    key = tuple(option_classes())
    if key not in _composed:
        _composed[key] = compose(key)
    return _composed[key]


RunConfig = config_class()


# Settings that say where and how results are written, not what is measured: left out of the
# configuration fingerprint --resume compares.
NOT_FINGERPRINTED = ("output_dir", "append", "resume", "wide", "executor", "gpus", "workers", "ray_address",
                     "worker_timeout")
# Settings left unset (None) that mean a default: fingerprinted as that default, as the env.json of
# a directory written while the flag had it as its value recorded it (--loader; --video-mode, which
# image runs recorded as frames), or before the flag existed (--decode-attention: such runs
# attended by matmul; --pdl: launched without PDL; --int4-fold-norms: norms of their own).
FINGERPRINT_DEFAULTS = {"loader": DEFAULT_LOADER, "decode_attention": "matmul", "video_mode": "frames", "pdl": "off",
                        "int4_fold_norms": False}

EXIT_CODES = """exit codes:
  0    every variant and point measured
  1    some variant or point failed (others measured)
  2    usage error (bad flag, input or --output-dir); nothing written
  3    nothing measured (every variant skipped or failed)
  4    no space left on the device while writing; rows written before are kept (--resume), and
       a run that had written none leaves its directory as it was
  130  interrupted (Ctrl-C or SIGTERM); finished rows are kept in runs.csv"""


def _variant_parts() -> str:
    from variants import KINDS, registry

    parts = registry()
    return "parts: " + "; ".join(f"{kind} {', '.join(n for n, p in parts.items() if p.kind == kind)}"
                                 for kind in KINDS)


def _engines() -> str:
    from variants import registry

    return "one of: " + ", ".join(name for name, part in registry().items() if part.kind == "engine")


def _presets() -> str:
    from bench.models.presets import PRESETS

    return "one of: " + ", ".join(PRESETS)


def _templates() -> str:
    from bench.models.templates import TEMPLATES

    return "one of: " + ", ".join(TEMPLATES)


# The names a flag accepts, read from the registries when --help is built (`vlm-bench list` describes them).
VALID_VALUES = {"preset": _presets, "conv_mode": _templates, "variants": _variant_parts, "engine": _engines}


def flag_help(text: str, default, values: str = "") -> str:
    """A flag's help: its text, its default stated once (the text's own "(default: ...)" where it
    explains one, else the field's), then the valid values."""
    if "default" not in text.lower():
        text += f" (default: {'none' if default is None else repr(default) if default == '' else default})"
    return f"{text}; {values}" if values else text


def build_parser(cls=None, prog: str = "vila_prefix_benchmark.py",
                 description: str = "Measure variants of a vision-language model.",
                 leave_out: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The run's flags, one per config field (less the fields in `leave_out`, which keep their
    defaults: a command that has no use for them refuses them as unknown flags)."""
    cls = cls or config_class()
    parser = ArgumentParser(prog=prog, description=description, epilog=EXIT_CODES)
    for f in fields(cls):
        if f.name in leave_out:
            continue
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *f.metadata.get("aliases", ())]
        default = None if f.default is MISSING else f.default
        values = VALID_VALUES[f.name]() if f.name in VALID_VALUES else ""
        help_text = flag_help(f.metadata.get("help", ""), default, values).replace("%", "%%")
        if "bool" in str(f.type):
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        kind = str if "str" in str(f.type) else int if "int" in str(f.type) else float
        parser.add_argument(*names, dest=f.name, type=kind, default=default, help=help_text)
    return parser


def config_from_args(argv: list[str] | None, parser: argparse.ArgumentParser | None = None) -> RunConfig:
    """The run config of a command line (parsed by `parser`, default build_parser())."""
    cls = config_class()
    ns = (parser or build_parser(cls)).parse_args(argv)
    if ns.num_frames is not None and ns.video_path is None and ns.frames_dir is None:
        # a run's requests show the images; `serve` keeps --num-frames for its video_url requests
        raise UsageError("--num-frames applies to video input (--video-path or --frames-dir); image requests show "
                         "their images (--num-images)")
    return cls(**vars(ns))
