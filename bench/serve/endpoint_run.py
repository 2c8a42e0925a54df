"""An endpoint-mode run: every (concurrency, request rate) point's requests, warm-ups first, one
runs.csv row per request (engine `endpoint`, variant `c<concurrency> r<rate>`), then summary.csv
and env.json, in the results directory layout in-process runs write. A server that cannot be
reached or does not serve the model at the start is a usage error before anything is written; a
request that fails later is a failed row (bench.serve.client)."""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

from bench.measure.results import (DirLock, check_output_dir, new_run_id, run_writer, utc_now, write_json,
                                   write_summary)
from bench.models.visual import load_image
from bench.run import envinfo
from bench.run.questions import warmup_questions
from bench.run.summary import ValidityRule, summarize_runs
from bench.serve import client as cl


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
    slo: dict | None = None
    duration_s: float | None = None  # a point sends requests for this long (instead of num_prompts)  # metric column -> bound (ms): goodput counts requests within every bound


def run(cfg: EndpointConfig, command: str = "") -> tuple[Path, list[dict], list[dict]]:
    """(results directory, rows, summary rows)."""
    run_id = new_run_id()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = cfg.output_dir or Path(f"results/local/{stamp}-endpoint-{cfg.model.replace('/', '_')}")
    check_output_dir(out, "new")
    image_file = Path(cfg.image_path).read_bytes()
    image = load_image(cfg.image_path)
    cl.check_server(cfg.endpoint, cfg.model, _headers(cfg), cfg.timeout_s)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    lock = DirLock(out)
    try:
        writer = run_writer(out)
        try:
            rows, server = asyncio.run(_measure(cfg, image_file, image, run_id, writer))
        finally:
            writer.close()
        config = {k: str(v) for k, v in vars(cfg).items() if k != "api_key"}
        # what `summarize` rebuilds summary.csv with (a point's requests are its runs)
        config.update(num_runs=max(cfg.num_prompts, 1), min_seconds=0.0, max_cv=cfg.max_cv)
        env = envinfo.collect(command, {}, {"config": config, "run_id": run_id,
                                            "model": cfg.model, "engine": "endpoint", "server": server})
        write_json(out / "env.json", env)
        summary = summarize_runs(rows, ValidityRule(max(cfg.num_prompts, 1), 0.0, cfg.max_cv))
        write_summary(out, summary)
    finally:
        lock.release()
    return out, rows, summary


async def _measure(cfg: EndpointConfig, image_file: bytes, image, run_id: str, writer) -> tuple[list[dict], str]:
    base_url = cfg.endpoint.rstrip("/") + "/"
    headers = _headers(cfg)
    limits = httpx.Limits(max_connections=max(p.concurrency for p in cfg.points) + 2)
    rows: list[dict] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=cfg.timeout_s, limits=limits, headers=headers) as client:
        server = await cl.server_identity(client, base_url)
        metrics_url = base_url.removesuffix("/").removesuffix("/v1") + "/metrics"
        warm_qs = warmup_questions(cfg.questions) or cfg.questions
        shared = cl.data_url(image_file)
        k = 0  # --prefix distinct: every request of the run shows an image no other request showed
        for new_tokens in cfg.new_tokens:
            for point in cfg.points:
                base = {"run_id": run_id, "model": cfg.model, "family": "", "weights": "served",
                        "variant": point.label(), "engine": "endpoint", "device": "", "dtype": "",
                        "cache_state": "none", "batch_size": 1, "new_tokens": new_tokens, "num_images": 1,
                        "loader": "", "concurrency": point.concurrency,
                        "request_rate": "inf" if math.isinf(point.rate) else point.rate, "server": server}
                warm = [cl.payload(cfg.model, warm_qs[i % len(warm_qs)], shared, new_tokens)
                        for i in range(cfg.warmup)]
                for i, result in enumerate(await cl.run_point(client, warm.__getitem__, cl.Point(1, math.inf),
                                                              cfg.seed, len(warm))):
                    rows.append(_emit(writer, {**base, **result, "kind": "warmup", "run_index": i,
                                               "question": warm[i]["messages"][0]["content"][1]["text"]}))

                def body(i, start=k, new_tokens=new_tokens):
                    url = cl.distinct_image_url(image, start + i) if cfg.distinct_images else shared
                    return cl.payload(cfg.model, cfg.questions[i % len(cfg.questions)], url, new_tokens)

                before = await cl.prefix_counters(client, metrics_url)
                t0 = time.perf_counter()
                results = await cl.run_point(client, body, point, cfg.seed, cfg.num_prompts, cfg.duration_s)
                wall_s = time.perf_counter() - t0
                k += len(results)
                after = await cl.prefix_counters(client, metrics_url)
                if cfg.slo:
                    for r in results:
                        r["slo_met"] = r["status"] == "ok" and all(
                            r.get(name) is not None and r[name] <= bound for name, bound in cfg.slo.items())
                    goodput = sum(r["slo_met"] for r in results) / wall_s
                    for r in results:
                        r["goodput_rps"] = goodput
                hit_rate = None
                if before and after and after[1] > before[1]:
                    hit_rate = (after[0] - before[0]) / (after[1] - before[1])
                for i, result in enumerate(results):
                    rows.append(_emit(writer, {**base, **result, "kind": "measured", "run_index": i,
                                               "question": cfg.questions[i % len(cfg.questions)],
                                               "server_prefix_hit_rate": hit_rate}))
    return rows, server


def _headers(cfg: EndpointConfig) -> dict:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def _emit(writer, row: dict) -> dict:
    row = {"timestamp": utc_now(), **row}
    writer.write(row)
    return row
