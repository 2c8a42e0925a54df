"""The server's limit on the size of a request body (ASGI middleware, `serve --max-request-mb`).

A body past the limit is refused with HTTP 413 and an OpenAI-style error body, never held whole in
memory: a request whose Content-Length is past it is answered before any of its body is read, and a
body without one (chunked) is counted as the application reads it and refused at the first piece
that takes it past the limit. The refusal closes the connection (`Connection: close`), so the server
stops receiving the rest of the body rather than reading it to throw it away.

Written here because neither Starlette nor uvicorn limits a request body's size.
"""
from __future__ import annotations

from typing import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from bench.serve.protocol import ApiError

MIB = 1 << 20
MAX_REQUEST_MB = 64  # a few images as base64 data: URLs (a third larger than their files)


class _PastLimit(Exception):
    """Raised from `receive` to the middleware when the body read so far is past the limit."""


class RequestBodyLimit:
    """Refuses an HTTP request whose body is over `max_bytes` (413); `refused()` is called for each."""

    def __init__(self, app, max_bytes: int, refused: Callable[[], None]):
        self.app, self.max_bytes, self.refused = app, max_bytes, refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, f"({int(declared):,} bytes) ")
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _PastLimit
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _PastLimit:
            if started:  # a response that reads its body after it has begun: it can only be cut off
                raise
            await self._refuse(scope, receive, send, "")

    async def _refuse(self, scope, receive, send, size: str):
        self.refused()
        error = ApiError(f"the request body {size}is past this server's limit of {self.max_bytes:,} bytes "
                         f"({self.max_bytes / MIB:g} MiB, serve --max-request-mb)", status=413)
        response = JSONResponse(error.body(), status_code=error.status, headers={"connection": "close"})
        await response(scope, receive, send)
