"""Checks that run before a request body is read: bearer token and upload size.

Both live in one small ASGI middleware, not in route dependencies, because FastAPI parses a
multipart body *before* it runs dependencies: a route-level check would let an unauthenticated or
oversized upload be read in full first. Here the token and the Content-Length header are checked
before any byte is read, and the bytes are counted as they arrive for clients that send no length
(chunked uploads). Starlette's own RequestBodyLimitMiddleware answers in plain text; ours answers
with the service's JSON error shape.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["MULTIPART_OVERHEAD", "RequestGuard", "UploadTooLarge", "format_bytes"]

# Room for multipart framing (boundaries, part headers, small form fields) on top of the limit.
MULTIPART_OVERHEAD = 64 * 1024


def format_bytes(n: int) -> str:
    """20971520 -> '20 MB' (binary megabytes, as upload limits are usually stated)."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


class UploadTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the limit.

    An HTTPException so that FastAPI, which turns other errors during form parsing into a
    generic 400, passes it on to the app's handler unchanged.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Upload is larger than the {format_bytes(limit)} limit.")


async def _send_json(
    send: Send, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    # The request body is not read: tell the client this connection will not be reused.
    raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Bearer-token check for protected paths and a body-size limit per path.

    Args:
        app: the ASGI app to protect.
        token: the expected bearer token, or None for an open service.
        protected_prefix: paths that need the token (others, like the page, stay open).
        body_limit_for: maps a request path to its upload limit in bytes (None: no limit); the
            body may exceed it by ``MULTIPART_OVERHEAD`` for the multipart framing.
    """

    def __init__(
        self,
        app: ASGIApp,
        token: str | None,
        protected_prefix: str,
        body_limit_for: Callable[[str], int | None],
    ) -> None:
        self.app = app
        self.token = token
        self.protected_prefix = protected_prefix
        self.body_limit_for = body_limit_for

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            credentials.strip().encode(), self.token.encode()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = Headers(scope=scope)
        if self.token and path.startswith(self.protected_prefix) and not self._authorized(headers):
            detail = (
                "This service needs an API token: send 'Authorization: Bearer <token>'."
                if "authorization" not in headers
                else "The API token is not valid."
            )
            await _send_json(send, 401, detail, {"WWW-Authenticate": "Bearer"})
            return
        stated_limit = self.body_limit_for(path)
        if stated_limit is None:
            await self.app(scope, receive, send)
            return
        limit = stated_limit + MULTIPART_OVERHEAD
        try:
            declared = int(headers.get("content-length", ""))
        except ValueError:
            declared = None
        if declared is not None and declared > limit:
            await _send_json(send, 413, UploadTooLarge(stated_limit).detail)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise UploadTooLarge(stated_limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except UploadTooLarge as exc:  # raised outside a route (no handler caught it)
            if started:
                raise
            await _send_json(send, 413, exc.detail)
