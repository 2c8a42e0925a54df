"""An endpoint-mode run: for every workload point (new tokens x question length x images per
prompt, the in-process run's axes and columns) every (concurrency, request rate) point's requests,
warm-ups first, one runs.csv row per request (engine `endpoint`, variant `c<concurrency> r<rate>`),
then summary.csv and env.json, in the results directory layout in-process runs write. A server
that cannot be reached or does not serve the model at the start is a usage error before anything
is written; a request that fails later is a failed row (bench.serve.client)."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench.errors import UsageError
from bench.measure.results import (DirLock, DirState, check_output_dir, make_dir, new_run_id, read_runs, run_writer,
                                   utc_now, write_json, write_summary)
from bench.models.visual import load_image
from bench.run import envinfo
from bench.run.questions import warmup_questions
from bench.run.summary import ValidityRule, summarize_runs
from bench.run.workload import WorkloadPoint, questions_of_length
from bench.serve import client as cl

# A --duration point's summary needs as many requests as --num-prompts' default (the two flags
# exclude each other): what its invalid_reason names instead of --num-prompts
DURATION_RUNS = ("requests", "--duration's minimum of")


@dataclass
class EndpointConfig:
    endpoint: str  # base URL of the OpenAI API, e.g. http://127.0.0.1:8000/v1
    model: str
    points: list[cl.Point]
    num_prompts: int
    new_tokens: list[int]
    image_path: str
    questions: list[str]
    distinct_images: bool
    warmup: int
    seed: int
    output_dir: Path | None
    timeout_s: float
    max_cv: float
    api_key: str | None = None
    slo: dict | None = None  # metric column -> bound (ms): goodput counts requests within every bound
    duration_s: float | None = None  # a point sends requests for this long (instead of num_prompts)
    prompt_lengths: list[int] = field(default_factory=list)  # question lengths in tokens (empty: as written)
    num_images: list[int] = field(default_factory=lambda: [1])  # images per request
    tokenizer: str | None = None  # directory whose tokenizer counts --prompt-lengths' tokens


def point_questions(cfg: EndpointConfig) -> dict[int | None, tuple[list[str], list[str]]]:
    """Question length (None: as written) -> (measured questions, warm-up questions), stretched or
    cut to that many tokens of --tokenizer (the question alone, no special tokens) as in-process
    runs make them (bench.run.workload.questions_of_length)."""
    warm = warmup_questions(cfg.questions) or cfg.questions
    if not cfg.prompt_lengths:
        return {None: (cfg.questions, warm)}
    if cfg.tokenizer is None:
        raise UsageError("--prompt-lengths counts tokens with the served model's tokenizer: give --tokenizer DIR "
                         "(a directory with its tokenizer files)")
    from bench.models.native import local_tokenizer

    tokenizer = local_tokenizer(Path(cfg.tokenizer), f"--tokenizer {cfg.tokenizer}")

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    return {n: (questions_of_length(count, cfg.questions, n), questions_of_length(count, warm, n))
            for n in cfg.prompt_lengths}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped the run; `out` holds the `rows` rows written before it (a
    point's requests are written when the point ends), their summary and env.json, as an
    interrupted in-process run's directory does."""

    def __init__(self, out: Path, rows: int):
        super().__init__(str(out))
        self.out, self.rows = out, rows


def run(cfg: EndpointConfig, command: str = "") -> tuple[Path, list[dict], list[dict]]:
    """(results directory, rows, summary rows); Interrupted when stopped part-way."""
    run_id = new_run_id()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = cfg.output_dir or Path(f"results/local/{stamp}-endpoint-{cfg.model.replace('/', '_')}")
    check_output_dir(out, "new")
    questions = point_questions(cfg)
    image_file = Path(cfg.image_path).read_bytes()
    image = load_image(cfg.image_path)
    # before anything is written
    served = cl.served_identity(cl.check_server(cfg.endpoint, cfg.model, _headers(cfg), cfg.timeout_s))
    config = {k: str(v) for k, v in vars(cfg).items() if k != "api_key"}
    # what `summarize` rebuilds summary.csv with (a point's requests are its runs)
    config.update(num_runs=max(cfg.num_prompts, 1), min_seconds=0.0, max_cv=cfg.max_cv,
                  runs_named=DURATION_RUNS if cfg.duration_s is not None else None)

    def env(server: str, interrupted: bool) -> dict:
        return envinfo.collect(command, {}, {"config": config, "run_id": run_id, "model": cfg.model,
                                             "engine": "endpoint", "server": server, "served": served,
                                             "interrupted": interrupted, "client_event_loop": cl.event_loop()})

    before = DirState(out)
    make_dir(out, "--output-dir")
    lock = DirLock(out)
    stopped = None  # NothingWritten: a full disk stopped the run before any row was written
    try:
        writer = None
        try:
            # first, as an in-process run writes it, so that a run killed part-way leaves rows that
            # `summarize` reads; "interrupted" until the run's end writes it again
            write_json(out / "env.json", env("", True))
            writer = run_writer(out)
            interrupted = False
            try:
                rows, server = cl.run_async(_measure(cfg, questions, image_file, image, run_id, writer, served))
            except (KeyboardInterrupt, asyncio.CancelledError):  # the rows written so far are the run's
                interrupted = True
            finally:
                writer.close()
        except Exception as e:  # (a full disk's OSError, or an error raised while handling one)
            stopped = before.nothing_written(e, writer.rows if writer is not None else 0)
            if stopped is None:
                raise
            cause = e
        if stopped is None:
            if interrupted:
                rows = read_runs(out / "runs.csv") if (out / "runs.csv").is_file() else []
                server = next((r.get("server") for r in rows if r.get("server")), "")
            write_json(out / "env.json", env(server, interrupted))
            summary = summarize_runs(rows, ValidityRule(max(cfg.num_prompts, 1), 0.0, cfg.max_cv,
                                                        config["runs_named"]))
            write_summary(out, summary)
    finally:
        lock.release()
    if stopped is not None:
        before.remove_created()
        raise stopped from cause
    if interrupted:
        raise Interrupted(out, len(rows))
    return out, rows, summary


@contextlib.contextmanager
def _signals_cancel(task: asyncio.Task, signals=(signal.SIGINT, signal.SIGTERM)):
    """Within (on the main thread, in the running loop): Ctrl-C and SIGTERM cancel `task`, once.
    The loop runs the handler between its steps, so no KeyboardInterrupt lands inside a request's
    task (asyncio prints those as never-retrieved task exceptions), and a second signal, such as
    `timeout` sends (to the command, then to its process group), cannot cut short the writing of
    the rows of the requests that finished. The handlers before come back after."""
    loop = asyncio.get_running_loop()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous, asked = {s: signal.getsignal(s) for s in signals}, []

    def stop():
        if not asked:
            asked.append(True)
            task.cancel()

    try:
        for s in signals:
            loop.add_signal_handler(s, stop)
    except NotImplementedError:  # (loops without signal handlers: Python's own handlers stay)
        yield
        return
    try:
        yield
    finally:
        for s in signals:
            loop.remove_signal_handler(s)
            signal.signal(s, previous[s])


async def _measure(cfg: EndpointConfig, questions: dict, image_file: bytes, image, run_id: str,
                   writer, served: dict) -> tuple[list[dict], str]:
    """`served`: what the server says it runs (bench.serve.client.served_identity)."""
    with _signals_cancel(asyncio.current_task()):
        return await _measure_points(cfg, questions, image_file, image, run_id, writer, served)


async def _measure_points(cfg: EndpointConfig, questions: dict, image_file: bytes, image, run_id: str,
                          writer, served: dict) -> tuple[list[dict], str]:
    base_url = cfg.endpoint.rstrip("/") + "/"
    rows: list[dict] = []
    connections = max(p.concurrency for p in cfg.points) + 2
    async with cl.Api(base_url, _headers(cfg), cfg.timeout_s, connections) as client:
        server = await cl.server_identity(client)
        shared = {n: cl.shared_image_urls(image_file, image, n) for n in cfg.num_images}
        # the variant and engine a vlm-bench server states it runs (the row's variant is the point)
        served_detail = f"served {served['variant']} on the {served['engine']} engine" \
            if "variant" in served and "engine" in served else ""
        # --prefix distinct: no image of a request is shown by any other request of the run, warm-ups'
        # shared images included: requests take consecutive derived images from max(num_images) on
        k = max(cfg.num_images)
        for new_tokens, length, num_images in itertools.product(cfg.new_tokens, questions, cfg.num_images):
            measured_qs, warm_qs = questions[length]
            workload = WorkloadPoint(question_tokens=length, new_tokens=new_tokens, num_images=num_images)
            for point in cfg.points:
                base = {"run_id": run_id, "model": cfg.model, "family": "", "weights": "served", "device": "",
                        "dtype": "", **{k: served[k] for k in cl.SERVED_COLUMNS if k in served},
                        "variant": point.label(), "engine": "endpoint", "engine_detail": served_detail,
                        "cache_state": "none", **workload.columns(), "concurrency": point.concurrency,
                        "request_rate": "inf" if math.isinf(point.rate) else point.rate, "server": server}
                warm = [cl.payload(cfg.model, warm_qs[i % len(warm_qs)], shared[num_images], new_tokens)
                        for i in range(cfg.warmup)]
                for i, result in enumerate(await cl.run_point(client, warm.__getitem__, cl.Point(1, math.inf),
                                                              cfg.seed, len(warm))):
                    rows.append(_emit(writer, {**base, **result, "kind": "warmup", "run_index": i,
                                               "question": warm_qs[i % len(warm_qs)]}))

                def body(i, start=k, new_tokens=new_tokens, num_images=num_images, qs=measured_qs):
                    urls = (cl.distinct_image_urls(image, start + i * num_images, num_images)
                            if cfg.distinct_images else shared[num_images])
                    return cl.payload(cfg.model, qs[i % len(qs)], urls, new_tokens)

                if cfg.duration_s is None:  # made before the clock starts (distinct images: PNG encoding)
                    body = [body(i) for i in range(cfg.num_prompts)].__getitem__
                before = await cl.server_counters(client)
                t0 = time.perf_counter()
                finished: dict[int, dict] = {}
                written: set[int] = set()

                def write(i: int, row: dict, extra: dict) -> None:
                    rows.append(_emit(writer, {**base, **row, "kind": "measured", "run_index": i,
                                               "question": measured_qs[i % len(measured_qs)], **extra}))
                    written.add(i)

                try:
                    results = await cl.run_point(client, body, point, cfg.seed, cfg.num_prompts, cfg.duration_s,
                                                 finished)
                    wall_s = time.perf_counter() - t0
                    k += len(results) * num_images
                    after = await cl.server_counters(client)
                    done = [r for r in results if r["status"] == "ok"]
                    throughput = {"point_rps": len(done) / wall_s,
                                  "point_output_tok_s": sum(r["output_tokens"] for r in done) / wall_s}
                    for r in done:
                        r.update(throughput)
                    if cfg.slo:
                        for r in results:
                            r["slo_met"] = r["status"] == "ok" and all(
                                r.get(name) is not None and r[name] <= bound for name, bound in cfg.slo.items())
                        goodput = sum(r["slo_met"] for r in results) / wall_s
                        for r in results:
                            r["goodput_rps"] = goodput
                    server_side = {"server_prefix_hit_rate": after.prefix_hit_rate(before),
                                   "server_mean_ttft_ms": after.mean_ttft_ms(before)}
                    for i, result in enumerate(results):
                        write(i, result, server_side)
                # Ctrl-C and SIGTERM cancel this task (_signals_cancel): the point's finished requests
                # not written yet are kept, without the point's rates where it did not end
                except (asyncio.CancelledError, KeyboardInterrupt):
                    for i in sorted(set(finished) - written):
                        write(i, finished[i], {})
                    raise
    return rows, server


def _headers(cfg: EndpointConfig) -> dict:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def _emit(writer, row: dict) -> dict:
    row = {"timestamp": utc_now(), **row}
    writer.write(row)
    return row
