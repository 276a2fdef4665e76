"""The FastAPI app: ``create_app`` wires the routers to one :class:`ModelService`.

The pieces, each in its own module: ``settings`` (limits, validated), ``service`` (what the routes
call), ``worker`` (the thread that owns the model), ``routes`` (thin routes), ``errors`` (every
error as one sentence), ``guard`` (token and body size, checked before a body is read).
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Security
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from histolens.errors import ConfigError
from histolens.web.errors import install_error_handlers
from histolens.web.guard import RequestGuard
from histolens.web.model_info import NOTICE
from histolens.web.routes import STATIC_DIR, api, site
from histolens.web.service import ModelService
from histolens.web.settings import ServiceSettings
from histolens.web.slide_routes import install_slide_handlers, slides_api, slides_site

if TYPE_CHECKING:
    from histolens.inference.predictor import Predictor

__all__ = ["NOTICE", "ServiceSettings", "create_app"]

log = logging.getLogger(__name__)


def create_app(
    checkpoint: str | os.PathLike | Predictor,
    settings: ServiceSettings | None = None,
    **fields: Any,
) -> FastAPI:
    """Build the service. The model loads once, when the app starts (its lifespan).

    Args:
        checkpoint: a checkpoint file or run directory (or an already loaded Predictor).
        settings: how the service runs (:class:`ServiceSettings`: its limits, device and
            runtime); default ``ServiceSettings()``.
        fields: instead of ``settings``, its fields as keywords (``max_batch=4``).
    """
    if settings is None:
        settings = ServiceSettings(**fields)
    elif fields:
        raise ConfigError(
            f"Give create_app its settings or their fields ({', '.join(sorted(fields))}), not both."
        )
    app = FastAPI(
        title="histolens",
        summary="Breast-histopathology classification with calibrated probabilities and "
        "heatmaps. " + NOTICE,
        version=_version(),
        lifespan=_lifespan(checkpoint, settings),
    )
    app.add_middleware(
        RequestGuard,
        token=settings.token,
        protected_prefix="/v1/",
        body_limit_for=settings.body_limit_for,
    )
    install_error_handlers(app)
    install_slide_handlers(app)
    app.include_router(api, dependencies=_bearer(settings.token))
    app.include_router(slides_api, dependencies=_bearer(settings.token))
    app.include_router(site)
    app.include_router(slides_site)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _lifespan(checkpoint: str | os.PathLike | Predictor, settings: ServiceSettings):
    """The app's lifespan: the model loads (and its worker starts) when the app starts, and the
    worker finishes what it holds when the app stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = (await ModelService.load(checkpoint, settings)).start()
        app.state.service = service
        log.info(
            "Serving model %s (%s, on %s).",
            service.model_id,
            service.predictor.backbone_name,
            service.model_info.runtime,
        )
        app.state.slides = app.state.slide_analyses = None
        if settings.slides is not None:
            from histolens.web.slide_jobs import open_viewer

            viewer = await run_in_threadpool(open_viewer, service.predictor, settings)
            app.state.slides, app.state.slide_analyses = viewer
            log.info("Serving the slides of %s at /slides.", settings.slides)
        try:
            yield
        finally:
            if app.state.slide_analyses is not None:
                await run_in_threadpool(app.state.slide_analyses.close)
                app.state.slides.close()
            await run_in_threadpool(service.close)

    return lifespan


def _bearer(token: str | None) -> list:
    """The API docs' bearer-token scheme; the token itself is checked by :class:`RequestGuard`."""
    if not token:
        return []
    scheme = HTTPBearer(
        auto_error=False, description="The token given to 'histolens serve --token'."
    )
    return [Security(scheme)]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("histolens")
    except PackageNotFoundError:
        return "0+unknown"
