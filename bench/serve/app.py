"""`vlm-bench serve`'s HTTP application: OpenAI-compatible chat completions over one loaded engine.

Framework: FastAPI on uvicorn. The engine runs on its own thread (bench.serve.worker), so the
server's job is many concurrent connections that mostly wait: an asyncio server does that on one
thread, Server-Sent Events are a StreamingResponse, and a client that disconnects cancels its
response generator (which cancels its job). FastAPI + uvicorn is also what vLLM and SGLang serve
their OpenAI APIs with, so the HTTP layer measured here is the one those servers add.

Streaming sends each token's text as the engine generates it (the engines' per-token hook), so a
client's time to the first content chunk is the engine's time to its first token plus HTTP. A
streamed response starts (status and headers) when the request's batch starts, so the first token
has only its chunk to send: sent with the first token, the response's start cost about 0.5 ms of
every TTFT (HTTP + client part of a served TTFT, tiny-llava on a 2-core CPU machine: 1.7 -> 1.2
ms). A request refused before its batch runs (a prompt and max_tokens past the model's positions:
400) gets an HTTP status and an OpenAI error body; a streamed request whose batch then fails gets
OpenAI's in-stream error event, as vLLM sends, an unstreamed one a 500. A request body past the
server's limit (--max-request-mb) is refused with 413 before it is read whole
(bench.serve.body_limit).

A completed response reports, beside OpenAI's fields, where its time went on the server: `usage`
carries `prompt_tokens_details.cached_tokens` (OpenAI's field: prompt tokens whose KV came from the
prefix cache) and the response (streamed: its last chunk with choices) a `timings` object, as
llama.cpp's server does: `ttft_ms` (request read -> first token handed to HTTP), its parts
`intake_ms` (read -> queued: parsing, images), `queue_ms` (queued -> its batch closes: other
batches, the batching window) and `handoff_ms` (the engine thread had the first token -> handed to
HTTP), the engine's phases before the first token (`preprocess_ms` ... `store_ms`, bench.measure.schema's
columns) and `cache_hit` (the request reused cached work: a prefix, or image embeddings, which
leave cached_tokens 0). Endpoint mode files them in the request's row, so a served row shows the
same phase breakdown as an in-process one, `ttft_ms - server_ttft_ms` is what HTTP and the client
add, and the server's own part is told apart (lab/served_overhead.py).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from bench.serve.body_limit import MAX_REQUEST_MB, MIB, RequestBodyLimit
from bench.serve.metrics import CONTENT_TYPE, ServerMetrics
from bench.serve.image_cache import DEFAULT_MB as DEFAULT_IMAGE_CACHE_MB, DecodedImages
from bench.serve.protocol import ApiError, WouldBlock, parse_chat
from bench.serve.worker import EngineThread, Job, Worker

# A request body up to this size whose images are decoded already is checked on the event loop:
# json.loads and base64-decoding it hold the loop for about 0.1 ms at most
INLINE_PARSE_BYTES = 256 * 1024


class TextStream:
    """Token ids -> text deltas whose concatenation is the decoded whole. A delta is held back
    while the text decoded so far ends in U+FFFD (a character whose UTF-8 bytes are split over
    byte-fallback tokens, not whole yet: sent as it is, the next token's decode would no longer
    extend what was sent) or is not an extension of what was sent. (Hand-written: transformers'
    TextStreamer holds text back to word boundaries, which would hold back the first token's
    chunk too.)"""

    def __init__(self, decode):
        self.decode, self.tokens, self.sent = decode, [], ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def rest(self) -> str:
        """At the end: whatever the whole text adds to what was sent (replacing nothing; a
        character cut off by max_tokens goes out as U+FFFD, as an unstreamed response has it)."""
        text = self.decode(self.tokens)
        return text[len(self.sent):] if text.startswith(self.sent) else ""


def create_app(engine, model_name: str, default_max_tokens: int, max_batch: int = 1, window_s: float = 0.005,
               num_frames: int = 8, max_tokens_limit: int = 4096, max_request_mb: float = MAX_REQUEST_MB,
               image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB, engine_thread: EngineThread | None = None,
               identity: dict | None = None) -> FastAPI:
    """`engine_thread`: the thread the engine was loaded on, which serves it (bench.serve.worker);
    `identity`: what it runs in the result key's columns (bench.serve.loading.served_identity),
    stated in the model's /v1/models entry under "vlm_bench" for endpoint mode's rows."""
    from bench.run.limits import loaded_max_pos

    metrics = ServerMetrics()
    images = None if not image_cache_mb else DecodedImages(
        image_cache_mb, lambda hit: (metrics.image_hits if hit else metrics.image_misses).inc())
    worker = Worker(engine, metrics, max_batch, window_s, loaded_max_pos(engine.adapter.model), engine_thread)
    decode = engine.adapter.decode
    created = int(time.time())

    def checked(body, blocking: bool = True):
        # (whether the model can take it is checked on the engine thread, which owns the
        # tokenizer: Worker._fits; a refusal arrives as the job's first event)
        return parse_chat(body, default_max_tokens, max_tokens_limit, num_frames, images, blocking)

    async def parsed(body, size: int):
        """The request checked on the event loop where that is quick (a body of at most
        INLINE_PARSE_BYTES whose images were decoded before), else on a thread: images to decode,
        files to read and videos would hold up every other connection; the hop to a thread and
        back is what a prefix-cache hit (the same image again) would otherwise wait for (0.2 ms
        on a 2-core CPU machine)."""
        if size <= INLINE_PARSE_BYTES:
            try:
                return checked(body, blocking=False)
            except WouldBlock:
                pass
        return await asyncio.to_thread(checked, body)

    async def lifespan(app):
        worker.start(asyncio.get_running_loop().call_soon_threadsafe)
        yield
        worker.stop()

    app = FastAPI(title="vlm-bench", lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(RequestBodyLimit, max_bytes=int(max_request_mb * MIB),
                       refused=lambda: metrics.requests.labels("invalid").inc())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        if e.status < 500:
            metrics.requests.labels("invalid").inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "vlm-bench"}
        return {"object": "list", "data": [{**card, "vlm_bench": identity} if identity else card]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        arrived = time.perf_counter()
        try:
            raw = await request.body()
        except ClientDisconnect:  # the client left before its body was read whole: no one to answer
            return _gone()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, an int past Python's digits, nested too deep
            raise ApiError("the request body is not valid JSON") from None
        if isinstance(body, dict) and body.get("model") not in (None, model_name):
            raise ApiError(f"model {body.get('model')!r} is not served here; this server serves {model_name!r}",
                           status=404, param="model", kind="not_found_error")
        chat_request = await parsed(body, len(raw))
        events: asyncio.Queue = asyncio.Queue()
        job = Job(chat_request, lambda kind, value: events.put_nowait((kind, value)))
        worker.submit(job)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": model_name}
        watch = asyncio.ensure_future(_watch_client(request, job, events))
        try:
            first = await events.get()  # a request refused before its batch runs gets a status
            if first[0] == "invalid":
                raise ApiError(first[1], param="messages")
            if first[0] == "error":  # failed before its batch ran: a status, streamed or not
                raise ApiError(first[1], status=500, kind="server_error")
            if first[0] == "gone":
                return _gone()
            if chat_request.stream:  # the response starts now, while the engine works on the first token
                # from here the response sees a client leave: uvicorn states ASGI spec 2.3, for which
                # Starlette's StreamingResponse reads receive() for http.disconnect beside the stream
                # (and cancels it, which cancels the job: _stream). Two readers of receive() would
                # race for its messages; a disconnect the watcher let pass stays for that reader
                # (uvicorn answers every receive() after one with http.disconnect)
                watch.cancel()
                return StreamingResponse(_stream(job, events, head, decode, chat_request.include_usage, first,
                                                 lambda: first_token(arrived, job)),
                                         media_type="text/event-stream")
            tokens, stamp = [], None  # decoded once, at the end (no deltas to send)
            kind, value = first
            while True:
                if kind == "token":
                    stamp = stamp or first_token(arrived, job)
                    tokens.append(value)
                elif kind == "error":
                    raise ApiError(value, status=500, kind="server_error")
                elif kind == "gone":
                    return _gone()
                elif kind == "done":
                    break
                kind, value = await events.get()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        finally:
            watch.cancel()
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": decode(tokens)},
                             "finish_reason": "length"}],
                "usage": _usage(value), "timings": _timings(value, stamp)}

    def first_token(arrived: float, job: Job) -> dict:
        """The server's TTFT of a request (read at `arrived`) whose first token is being handed to
        HTTP now (counted), and two of its parts, ms: `intake_ms` (the request read to queued:
        parsing, images) and `handoff_ms` (the engine thread had the token to now: the hop to the
        event loop and the response's own task)."""
        now = time.perf_counter()
        metrics.ttft.observe(now - arrived)
        return {"ttft_ms": (now - arrived) * 1e3, "intake_ms": (job.queued - arrived) * 1e3,
                "handoff_ms": (now - job.first_token_at) * 1e3}

    return app


def _gone() -> Response:
    """The answer to a request whose client left: nginx's "client closed request" (no one reads it)."""
    return Response(status_code=499)


async def _watch_client(request: Request, job: Job, events: asyncio.Queue) -> None:
    """Until cancelled: when the client disconnects, its job is cancelled (the worker drops it if
    it is queued; a batch of it alone stops at its next token) and ("gone", None) is queued for
    the handler. uvicorn does not cancel a handler whose client left, so without this a queued
    request would run its prefill for no one and an unstreamed one would generate to the end."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()
    events.put_nowait(("gone", None))


def _usage(done: dict) -> dict:
    """OpenAI's usage of a completed job (its "done" event), prompt_tokens_details included."""
    return {**done["usage"], "prompt_tokens_details": {"cached_tokens": done["cached_tokens"]}}


def _timings(done: dict, stamp: dict) -> dict:
    """Where a completed request's time went on the server, ms (the module docstring): `stamp`
    from its first token (first_token), the rest from its "done" event."""
    return {**stamp, **done["timings"]}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(job: Job, events: asyncio.Queue, head: dict, decode, include_usage: bool, first: tuple,
                  first_token):
    """The chunks of a streamed completion (OpenAI's format), then [DONE]; cancelling the job
    when the client goes away (the generator is closed or cancelled). `first`: the job's first
    event, already taken from `events`; `first_token()`: the server's TTFT and its parts (ms),
    called as the first token is handed to HTTP."""
    text = TextStream(decode)
    pending, stamp = [first], None

    def chunk(delta: dict, finish=None, **extra) -> str:
        return _sse({**head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    # the role's chunk goes out in one write with the first token's (one send less before a
    # client sees its first content)
    lead = chunk({"role": "assistant", "content": ""})
    try:
        while True:
            kind, value = pending.pop() if pending else await events.get()
            if kind == "token":
                stamp = stamp or first_token()
                delta = text.add(value)
                if delta:
                    yield lead + chunk({"content": delta})
                    lead = ""
            elif kind == "error":  # the batch failed after the response started: an error event, as vLLM sends
                yield lead + _sse({"error": {"message": value, "type": "server_error", "param": None,
                                             "code": None}}) + _sse("[DONE]")
                return
            elif kind == "gone":  # the client left just as the response started
                return
            elif kind == "done":
                rest = text.rest()
                out = lead + (chunk({"content": rest}) if rest else "") + \
                    chunk({}, "length", timings=_timings(value, stamp))
                if include_usage:
                    out += _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(value)})
                yield out + _sse("[DONE]")
                return
    finally:
        job.cancelled.set()  # a no-op once the job is done; frees its slot when the client left early
