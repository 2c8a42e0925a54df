"""Endpoint mode: the run's workload sent to an OpenAI-compatible server, measured as its client.

Each request streams (`stream: true`, usage requested); per request: TTFT to the first chunk with
content, the gaps between content chunks (ITL), TPOT = (e2e - ttft) / (output tokens - 1), e2e,
output tokens (the server's usage, else content chunks counted); where the server reports them
(vlm-bench serve: the response's `timings`, OpenAI's usage.prompt_tokens_details), the server's own
TTFT, its engine's phases before the first token and the prompt tokens the prefix cache gave.
Requests of a point arrive as a
seeded Poisson process at --request-rate (inf: all at once) with at most --concurrency in flight
(asyncio, aiohttp: what vLLM's `bench serve` uses; a streamed request to a loopback echo server
took 0.75 ms median with it against 1.6 ms with httpx on a 2-core CPU machine, time that counts
in every TTFT measured here). A point's server prefix-cache hit rate comes from /metrics before and after it.

Before anything is written the server must answer GET /models as an OpenAI API listing --model
(check_server): one that cannot be reached, answers something else, or does not serve the model
is a usage error. Once the run is under way, a request that fails (the server went away, an
error status, a stream not in OpenAI's format) is a failed row and the run goes on.
"""
from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import math
import random
import statistics
import time
from dataclasses import dataclass

import aiohttp

from bench.errors import UsageError
from bench.measure.results import printable
from bench.measure.metrics import PHASES, percentile
from bench.models.visual import png_bytes
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
    return data_url(png_bytes(image))


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


class Api:
    """An OpenAI-compatible server's base URL (ending in /) and one aiohttp session to it: keep-alive
    connections, up to `connections` at once, every request at most `timeout_s`."""

    def __init__(self, base_url: str, headers: dict, timeout_s: float, connections: int = 8):
        self.base_url, self.headers, self.timeout_s = base_url.rstrip("/") + "/", headers, timeout_s
        self.connections = connections
        self.session: aiohttp.ClientSession | None = None

    def url(self, path: str) -> str:
        return self.base_url + path

    def server_url(self, path: str) -> str:
        """A path beside the API on its server (/metrics, /version): the base URL less its /v1."""
        return self.base_url.rstrip("/").removesuffix("/v1") + path

    async def __aenter__(self) -> Api:
        self.session = aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                             connector=aiohttp.TCPConnector(limit=self.connections))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()


HTTP_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
# a failed row's error when the server refused the connection (one_request's "Class: message")
CONNECTION_REFUSED = aiohttp.ClientConnectorError.__name__


def event_loop() -> str:
    """The event loop the client runs on: uvloop where it is installed (the serve extra), which
    took 0.2 ms off a streamed request's round trip to a loopback uvicorn server (0.98 -> 0.61 ms
    median on a 2-core CPU machine), time that counts in every TTFT measured here; else asyncio's."""
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def run_async(coro):
    """asyncio.run on event_loop()'s loop."""
    if event_loop() == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


# The columns of a served model's identity a server may state in its /v1/models entry (vlm-bench
# serve does, under "vlm_bench": bench.serve.app) that endpoint rows take (their engine stays
# "endpoint" and their variant names the point; what the server runs is in env.json's "served")
SERVED_COLUMNS = ("family", "weights", "device", "dtype")


def served_identity(entry: dict) -> dict:
    """What a server's /v1/models `entry` states about the model it runs (vlm-bench serve's
    "vlm_bench" object: model, family, weights, variant, engine, device, dtype), each a non-empty
    line of printable text (else left out: a row keeps its default, e.g. weights `served`); {} for
    any other server."""
    card = entry.get("vlm_bench")
    return {k: v for k, v in card.items() if isinstance(v, str) and v.strip() and v.isprintable()} \
        if isinstance(card, dict) else {}


def check_server(base_url: str, model: str, headers: dict, timeout_s: float) -> dict:
    """`model`'s entry in the server's model list; a usage error unless the server at `base_url`
    answers GET models as an OpenAI API that lists `model` (within `timeout_s`, 30 s at most)."""
    url = base_url.rstrip("/") + "/models"

    async def get() -> tuple[int, str]:
        async with Api(base_url, headers, min(timeout_s, 30.0)) as api, api.session.get(url) as r:
            return r.status, await r.text(errors="replace")

    try:
        status, text = run_async(get())
    except HTTP_ERRORS as e:
        detail = f"{e.__class__.__name__}: {' '.join(str(e).split()) or 'no answer'}"
        if isinstance(e, aiohttp.TooManyRedirects):
            raise UsageError(f"--endpoint {base_url}: the server's answers redirect again and again ({detail}); "
                             "give the API's own base URL") from None
        # ClientResponseError itself: something answered on the port, not in HTTP (its subclasses are other answers)
        if type(e) is aiohttp.ClientResponseError:
            raise UsageError(f"--endpoint {base_url}: the server's answer is not an HTTP response ({detail}); is "
                             "the URL's port the API server's?") from None
        raise UsageError(f"--endpoint {base_url}: cannot reach the server ({detail})") from None
    if status in (401, 403):
        raise UsageError(f"--endpoint {base_url}: the server refused the request (HTTP {status}); set "
                         "OPENAI_API_KEY to its API key")
    try:
        data = json.loads(text).get("data") if status == 200 else None
    except (ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested too deep
        data = None
    if not isinstance(data, list):
        raise UsageError(f"--endpoint {base_url}: not an OpenAI API (GET {url} answered HTTP {status} "
                         "without a model list); give the API's base URL, e.g. http://HOST:PORT/v1")
    entries = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
    entry = next((m for m in entries if m["id"] == model), None)
    if entry is None:
        served = ": " + ", ".join(m["id"] for m in entries) if entries else " no model by name"
        raise UsageError(f"--model {model!r} is not served at {base_url}; it serves{served}")
    return entry


class MalformedStream(Exception):
    """A stream chunk that is not OpenAI's chat.completion.chunk."""


# A response's `timings` (vlm-bench serve's, bench.serve.app) -> row columns: the server's TTFT and
# the engine's phases (bench.measure.metrics.PHASES). Other servers' keys (llama.cpp's) are not read.
SERVER_TIMINGS = {"ttft_ms": "server_ttft_ms", "intake_ms": "server_intake_ms", "queue_ms": "server_queue_ms",
                  "handoff_ms": "server_handoff_ms", **{f"{phase}_ms": f"{phase}_ms" for phase in PHASES}}


MAX_COUNT = 2**53  # a token count past it is no count (and past float's range, no number)


def _count(value) -> int | None:
    """A JSON value that is a token count (an int from 0 to MAX_COUNT, not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT else None


def _ms(value) -> float | None:
    """A JSON value that is a time in ms (a finite number, at least 0, not a bool), else None."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        ms = float(value)
    except OverflowError:  # an int past float's range
        return None
    return ms if math.isfinite(ms) and ms >= 0 else None


def _server_columns(timings) -> dict:
    """The row columns a response's `timings` object gives (numbers only; anything else ignored),
    and cache_hit where it says (vlm-bench serve: a hit on the image-embedding cache reuses work
    with no cached prompt tokens)."""
    if not isinstance(timings, dict):
        return {}
    columns = {column: _ms(timings.get(key)) for key, column in SERVER_TIMINGS.items()}
    if isinstance(timings.get("cache_hit"), bool):
        columns["cache_hit"] = timings["cache_hit"]
    return {k: v for k, v in columns.items() if v is not None}


def _cached_tokens(usage: dict | None) -> int | None:
    """OpenAI's usage.prompt_tokens_details.cached_tokens, where the server reports it."""
    details = (usage or {}).get("prompt_tokens_details")
    return _count(details.get("cached_tokens")) if isinstance(details, dict) else None


def _chunk_parts(data: str) -> tuple[dict | None, list[str], str | None, dict]:
    """(usage, content pieces, error message, server columns from `timings`) of one streamed chunk."""
    try:
        obj = json.loads(data)
    except RecursionError:
        raise MalformedStream("a chunk is JSON nested too deep") from None
    if not isinstance(obj, dict):
        raise MalformedStream(f"a chunk is a JSON {type(obj).__name__}, not an object")
    if obj.get("error"):
        error = obj["error"]
        return None, [], str(error.get("message", error) if isinstance(error, dict) else error)[:500], {}
    usage, choices = obj.get("usage"), obj.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices) or \
            (usage is not None and not isinstance(usage, dict)):
        raise MalformedStream("a chunk's choices or usage are not OpenAI's")
    pieces = []
    for choice in choices:
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if content:
            pieces.append(str(content))
    return usage, pieces, None, _server_columns(obj.get("timings"))


async def one_request(api: Api, body: dict) -> dict:
    """One streamed completion's measurements (status failed with the reason on any error)."""
    t0 = time.perf_counter()
    times, text, usage, server, done = [], [], None, {}, False
    try:
        async with api.session.post(api.url("chat/completions"), json=body) as r:
            if r.status != 200:
                detail = (await r.read()).decode(errors="replace")[:300]
                return {"status": "failed", "error": f"HTTP {r.status}: {detail}"}
            async for raw in r.content:  # one line at a time, as it arrives
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk_usage, pieces, error, chunk_server = _chunk_parts(data)
                if error is not None:
                    return {"status": "failed", "error": error}
                usage, server = chunk_usage or usage, chunk_server or server
                for content in pieces:
                    times.append(time.perf_counter())
                    text.append(content)
    except (*HTTP_ERRORS, ValueError, MalformedStream) as e:  # ValueError: bad JSON, bad UTF-8, a line past 64 KiB
        return {"status": "failed", "error": f"{e.__class__.__name__}: {e}"[:500]}
    e2e = (time.perf_counter() - t0) * 1e3
    if not times:
        return {"status": "failed", "error": "the server sent no content"}
    if not done:  # OpenAI's stream ends with it: without it the answer may be cut short
        return {"status": "failed", "error": f"the stream ended before data: [DONE] (after {len(times)} content "
                                             "chunks): the answer may be cut short"}
    ttft = (times[0] - t0) * 1e3
    out_tokens = _count((usage or {}).get("completion_tokens"))
    asked = _count(body.get("max_tokens"))
    if out_tokens and asked is not None and out_tokens > asked:  # TPOT, tok/s: divided by tokens never made
        return {"status": "failed", "error": f"the server's usage says {out_tokens} completion tokens, more than "
                                             f"the {asked} max_tokens asked for"}
    if not out_tokens:
        out_tokens = len(times)  # the server's usage is missing or not a count: content chunks counted
    prompt_tokens = _count((usage or {}).get("prompt_tokens"))
    gaps = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    row = {"status": "ok", "ttft_ms": ttft, "e2e_ms": e2e, "output_tokens": out_tokens,
           "prompt_tokens": prompt_tokens, "output_text": printable("".join(text))[:80],
           "requests_per_s": 1e3 / e2e, "output_tok_s": out_tokens / (e2e / 1e3), **server}
    cached = _cached_tokens(usage)
    if cached is not None:
        row["cached_tokens"] = cached
        row.setdefault("cache_hit", cached > 0)  # the server's own word (timings) first
    if out_tokens > 1:
        row["tpot_ms"] = (e2e - ttft) / (out_tokens - 1)
        row["decode_ms"] = e2e - ttft
        row["decode_tok_s"] = (out_tokens - 1) / ((e2e - ttft) / 1e3) if e2e > ttft else None
    if gaps:
        row.update(itl_p50_ms=statistics.median(gaps), itl_p90_ms=percentile(gaps, 90),
                   itl_p99_ms=percentile(gaps, 99))
    return row


async def run_point(api: Api, body, point: Point, seed: int, count: int | None,
                    duration_s: float | None = None, finished: dict | None = None) -> list[dict]:
    """Requests body(0), body(1), ... sent as the point says: `count` of them, or as many as
    arrive within `duration_s` (at rate inf: a new one whenever one of the `concurrency` slots
    frees); rows in the order sent. Once the server refuses a connection (it has gone away) no
    more are sent: at rate inf each refusal would free its slot at once, a failed row each.
    `finished`: each request's row is put there under its index as it ends (what a point
    interrupted before its end has)."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(point.concurrency)
    # rate inf: a request goes out as a slot frees, its task made only then (never more tasks than
    # slots, however many requests the point sends)
    closed_loop = math.isinf(point.rate)

    refused = []  # a request the server refused to connect: no more are sent (it has gone away)

    async def send(b, held: bool, index: int):
        if not held:
            await gate.acquire()
        try:
            row = await one_request(api, b)
            if str(row.get("error", "")).startswith(CONNECTION_REFUSED):
                refused.append(row)
            if finished is not None:
                finished[index] = row
            return row
        finally:
            gate.release()

    tasks, t0, i = [], time.perf_counter(), 0
    while not refused and ((i < count) if duration_s is None else (time.perf_counter() - t0 < duration_s)):
        if i and not math.isinf(point.rate):
            gap = rng.expovariate(point.rate)
            if duration_s is not None:  # never past the point's end
                gap = min(gap, max(0.0, duration_s - (time.perf_counter() - t0)))
            await asyncio.sleep(gap)
            if duration_s is not None and time.perf_counter() - t0 >= duration_s:
                break
        if closed_loop:
            await gate.acquire()
            if refused or (duration_s is not None and time.perf_counter() - t0 >= duration_s):
                gate.release()
                break
        tasks.append(asyncio.create_task(send(body(i), closed_loop, i)))
        i += 1
    return list(await asyncio.gather(*tasks))


# Prefix-cache counters a server may expose: (hits, lookups or misses, whether the second counts lookups).
PREFIX_COUNTERS = (("vlm_prefix_cache_hits", "vlm_prefix_cache_misses", False),
                   ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries", True))
# Time-to-first-token histograms a server may expose (seconds): vlm-bench serve's, vLLM's.
TTFT_HISTOGRAMS = ("vlm_time_to_first_token_seconds", "vllm:time_to_first_token_seconds")


@dataclass(frozen=True)
class ServerCounters:
    """What a point reads from the server's /metrics before and after it."""
    prefix: tuple[float, float] | None  # (hits, lookups)
    ttft: tuple[float, float] | None  # (seconds summed, requests)

    def prefix_hit_rate(self, before: ServerCounters) -> float | None:
        if self.prefix and before.prefix and self.prefix[1] > before.prefix[1]:
            return (self.prefix[0] - before.prefix[0]) / (self.prefix[1] - before.prefix[1])
        return None

    def mean_ttft_ms(self, before: ServerCounters) -> float | None:
        if self.ttft and before.ttft and self.ttft[1] > before.ttft[1]:
            return (self.ttft[0] - before.ttft[0]) / (self.ttft[1] - before.ttft[1]) * 1e3
        return None


NO_COUNTERS = ServerCounters(None, None)


async def server_counters(api: Api) -> ServerCounters:
    """The prefix-cache counters (summed over labels) and the TTFT histogram's sum and count from the
    server's /metrics; a part the server does not expose (or no /metrics) is None."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with api.session.get(api.server_url("/metrics")) as r:
            if r.status != 200:
                return NO_COUNTERS
            body = await r.text(errors="replace")
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                name = sample.name.removesuffix("_total")
                totals[name] = totals.get(name, 0.0) + sample.value
    except (*HTTP_ERRORS, ValueError):
        return NO_COUNTERS
    prefix = next(((totals[hits], totals[other] if is_lookups else totals[hits] + totals[other])
                   for hits, other, is_lookups in PREFIX_COUNTERS if hits in totals and other in totals), None)
    ttft = next(((totals[f"{h}_sum"], totals[f"{h}_count"]) for h in TTFT_HISTOGRAMS
                 if f"{h}_sum" in totals and f"{h}_count" in totals), None)
    return ServerCounters(prefix, ttft)


async def server_identity(api: Api) -> str:
    """The URL, the server's `server` header and, where it answers, its /version."""
    parts = [api.base_url]
    try:
        async with api.session.get(api.url("models")) as r:
            if r.headers.get("server"):
                parts.append(r.headers["server"])
        async with api.session.get(api.server_url("/version")) as v:
            if v.status == 200:
                parts.append(f"version {(await v.text(errors='replace')).strip()[:80]}")
    except HTTP_ERRORS:
        pass
    return " ".join(parts)
