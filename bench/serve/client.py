"""Endpoint mode: the run's workload sent to an OpenAI-compatible server, measured as its client.

Each request streams (`stream: true`, usage requested); per request: TTFT to the first chunk with
content, the gaps between content chunks (ITL), TPOT = (e2e - ttft) / (output tokens - 1), e2e,
output tokens (the server's usage, else content chunks counted). Requests of a point arrive as a
seeded Poisson process at --request-rate (inf: all at once) with at most --concurrency in flight
(httpx, asyncio). A point's server prefix-cache hit rate comes from /metrics before and after it.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
import statistics
import time
from dataclasses import dataclass

import httpx

from bench.measure.metrics import percentile
from bench.run.workload import derived_image


@dataclass(frozen=True)
class Point:
    concurrency: int
    rate: float  # requests/s; math.inf: all at once

    def label(self) -> str:
        return f"c{self.concurrency} r{'inf' if math.isinf(self.rate) else f'{self.rate:g}'}"


def data_url(png: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"


def image_url(image) -> str:
    """A PIL image as a PNG data: URL."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return data_url(buf.getvalue())


def shared_image_urls(image_file: bytes, image, k: int) -> list[str]:
    """The `k` images every request of a point shows with --prefix shared, as an in-process run's
    (bench.run.workload.derived_images): the image file's own bytes, then derived images 1 .. k-1."""
    return [data_url(image_file)] + [image_url(derived_image(image, i)) for i in range(1, k)]


def distinct_image_urls(image, first: int, k: int) -> list[str]:
    """Derived images first .. first + k - 1: one request's images under --prefix distinct (the
    caller starts each request where the previous one stopped, past the shared images)."""
    return [image_url(derived_image(image, first + i)) for i in range(k)]


def payload(model: str, question: str, image_urls: list[str], max_tokens: int) -> dict:
    """A streamed chat completion showing the images (one image_url part each), then the question."""
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    return {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]}


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    """One streamed completion's measurements (status failed with the reason on any error)."""
    t0 = time.perf_counter()
    times, text, usage = [], [], None
    try:
        async with client.stream("POST", "chat/completions", json=body) as r:
            if r.status_code != 200:
                detail = (await r.aread()).decode(errors="replace")[:300]
                return {"status": "failed", "error": f"HTTP {r.status_code}: {detail}"}
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    return {"status": "failed", "error": str(obj["error"].get("message", obj["error"]))[:500]}
                usage = obj.get("usage") or usage
                for choice in obj.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        times.append(time.perf_counter())
                        text.append(content)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"status": "failed", "error": f"{e.__class__.__name__}: {e}"[:500]}
    e2e = (time.perf_counter() - t0) * 1e3
    if not times:
        return {"status": "failed", "error": "the server sent no content"}
    ttft = (times[0] - t0) * 1e3
    out_tokens = (usage or {}).get("completion_tokens") or len(times)
    gaps = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    row = {"status": "ok", "ttft_ms": ttft, "e2e_ms": e2e, "output_tokens": out_tokens,
           "prompt_tokens": (usage or {}).get("prompt_tokens"), "output_text": "".join(text)[:80],
           "requests_per_s": 1e3 / e2e, "output_tok_s": out_tokens / (e2e / 1e3)}
    if out_tokens > 1:
        row["tpot_ms"] = (e2e - ttft) / (out_tokens - 1)
        row["decode_ms"] = e2e - ttft
        row["decode_tok_s"] = (out_tokens - 1) / ((e2e - ttft) / 1e3) if e2e > ttft else None
    if gaps:
        row.update(itl_p50_ms=statistics.median(gaps), itl_p90_ms=percentile(gaps, 90),
                   itl_p99_ms=percentile(gaps, 99))
    return row


async def run_point(client: httpx.AsyncClient, body, point: Point, seed: int, count: int | None,
                    duration_s: float | None = None) -> list[dict]:
    """Requests body(0), body(1), ... sent as the point says: `count` of them, or as many as
    arrive within `duration_s` (at rate inf: a new one whenever one of the `concurrency` slots
    frees); rows in the order sent."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(point.concurrency)
    closed_loop = duration_s is not None and math.isinf(point.rate)

    async def send(b, held: bool):
        if not held:
            await gate.acquire()
        try:
            return await one_request(client, b)
        finally:
            gate.release()

    tasks, t0, i = [], time.perf_counter(), 0
    while (i < count) if duration_s is None else (time.perf_counter() - t0 < duration_s):
        if i and not math.isinf(point.rate):
            await asyncio.sleep(rng.expovariate(point.rate))
            if duration_s is not None and time.perf_counter() - t0 >= duration_s:
                break
        if closed_loop:
            await gate.acquire()
            if time.perf_counter() - t0 >= duration_s:
                gate.release()
                break
        tasks.append(asyncio.create_task(send(body(i), closed_loop)))
        i += 1
    return list(await asyncio.gather(*tasks))


# Prefix-cache counters a server may expose: (hits, lookups or misses, whether the second counts lookups).
PREFIX_COUNTERS = (("vlm_prefix_cache_hits", "vlm_prefix_cache_misses", False),
                   ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries", True))


async def prefix_counters(client: httpx.AsyncClient, metrics_url: str) -> tuple[float, float] | None:
    """(hits, lookups) summed over labels from the server's /metrics; None when it exposes none."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = await client.get(metrics_url)
        if r.status_code != 200:
            return None
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    name = sample.name.removesuffix("_total")
                    totals[name] = totals.get(name, 0.0) + sample.value
    except (httpx.HTTPError, ValueError):
        return None
    for hits, other, is_lookups in PREFIX_COUNTERS:
        if hits in totals and other in totals:
            return totals[hits], totals[other] if is_lookups else totals[hits] + totals[other]
    return None


async def server_identity(client: httpx.AsyncClient, base_url: str) -> str:
    """The URL, the server's `server` header and, where it answers, its /version."""
    parts = [base_url]
    try:
        r = await client.get("models")
        if r.headers.get("server"):
            parts.append(r.headers["server"])
        root = str(client.base_url).rstrip("/").removesuffix("/v1")
        v = await client.get(f"{root}/version")
        if v.status_code == 200:
            parts.append(f"version {v.text.strip()[:80]}")
    except httpx.HTTPError:
        pass
    return " ".join(parts)
