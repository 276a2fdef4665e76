"""How the service answers errors: always ``{"detail": "<one sentence>"}`` with a fitting status.

The service object raises plain exceptions (:class:`UploadRefused`, a full or closing queue, a
:class:`~histolens.errors.HistolensError`); the handlers installed here turn each into its HTTP
answer, so no route translates errors itself.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from histolens.errors import HistolensError, ImageLoadError
from histolens.web.schemas import ErrorResponse
from histolens.web.worker import QueueFullError, ServiceClosedError

__all__ = ["ERROR_RESPONSES", "RETRY_AFTER_S", "UploadRefused", "install_error_handlers"]

RETRY_AFTER_S = 1

# The errors every /v1 route may answer, for the API docs.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "Missing or wrong API token (only when the service has one).",
        413: "Upload too large (bytes), or too many files.",
        415: "The upload is not an image.",
        422: "Corrupt or truncated image, decompression bomb, or an invalid parameter.",
        503: "The inference queue is full; retry after the Retry-After header's seconds.",
    }.items()
}


class UploadRefused(HistolensError):
    """An upload the service will not use, with the HTTP status it deserves (413, 415, 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @classmethod
    def unreadable(cls, exc: ImageLoadError) -> UploadRefused:
        """415 for data that is no image format at all, 422 for a broken or refused image."""
        if exc.kind == "not_image":
            return cls(
                415,
                f"'{exc.path}' is not an image this service can read (PNG, JPEG, TIFF, BMP, WebP).",
            )
        reason = exc.reason if exc.reason.endswith((".", ".)")) else exc.reason + "."
        return cls(422, f"Cannot use '{exc.path}': {reason}")


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "The request is not valid."
    first = errors[0]
    name = str(first.get("loc", ("", "request"))[-1])
    if first.get("type") == "missing":
        return f"Missing form field '{name}'."
    return f"Invalid value for '{name}': {first.get('msg', 'not valid')}."


def _retry_later(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"There is no {request.url.path} here; see /docs for the API."
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}; see /docs."
    return JSONResponse({"detail": detail}, exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": _validation_message(exc)}, 422)


async def _upload_refused(request: Request, exc: UploadRefused) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, exc.status)


async def _histolens_error(request: Request, exc: HistolensError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, 422)


async def _queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
    return _retry_later(f"{exc} Retry in a moment.")


async def _shutting_down(request: Request, exc: ServiceClosedError) -> JSONResponse:
    return _retry_later("The service is shutting down; retry shortly.")


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the traceback after this answer is sent.
    return JSONResponse(
        {"detail": f"Internal error ({type(exc).__name__}); see the server log."}, 500
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as one sentence; the most specific handler wins."""
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(UploadRefused, _upload_refused)
    app.add_exception_handler(HistolensError, _histolens_error)
    app.add_exception_handler(QueueFullError, _queue_full)
    app.add_exception_handler(ServiceClosedError, _shutting_down)
    app.add_exception_handler(Exception, _internal_error)
