"""The slide viewer's routes: the listing, Deep Zoom tiles, analyses and their heatmap.

Present only when the service was started with a slide folder (``serve --slides DIR``). Every
route names a slide by the id of ``GET /v1/slides``; an unknown id is 404, whatever it spells.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from histolens.web.errors import ERROR_RESPONSES
from histolens.web.pages import page_response
from histolens.web.slide_jobs import AnalysisCancelled, SlideAnalyses
from histolens.web.slide_library import SlideLibrary, UnknownSlide

__all__ = [
    "SlideItem",
    "SlideList",
    "SlideStatus",
    "install_slide_handlers",
    "slides_api",
    "slides_site",
]

slides_api = APIRouter(prefix="/v1/slides", responses=ERROR_RESPONSES, tags=["slides"])
slides_site = APIRouter()
_NOT_FOUND = {404: {"description": "No slide of that id, or no such tile."}}


class SlideItem(BaseModel):
    id: str = Field(description="The slide's opaque id (a hash of its path in the folder).")
    name: str = Field(description="The file name without its suffix.")
    relative_path: str = Field(description="Where the slide is inside the slide folder.")
    size_bytes: int
    analysis: str = Field(description="idle, queued, running, done or failed.")


class SlideList(BaseModel):
    slides: list[SlideItem]


class SlideStatus(BaseModel):
    slide_id: str
    state: str = Field(description="idle, queued, running, done or failed.")
    tiles_done: int
    tiles_total: int | None = None
    progress: float = Field(description="Share of the tiles scored, 0 to 1.")
    message: str | None = Field(None, description="Why the analysis failed.")
    summary: dict[str, Any] | None = Field(
        None, description="When done: the slide's scores (as in slides.csv)."
    )
    joined: bool | None = Field(
        None, description="POST only: true when the request joined a job already there."
    )


def _library(request: Request) -> SlideLibrary:
    library = getattr(request.app.state, "slides", None)
    if library is None:
        raise UnknownSlide("This service has no slide folder (start it with --slides DIR).")
    return library


def _analyses(request: Request) -> SlideAnalyses:
    _library(request)
    return request.app.state.slide_analyses


@slides_api.get("", response_model=SlideList, summary="The slides of the server's slide folder")
async def list_slides(request: Request) -> Any:
    library, analyses = _library(request), _analyses(request)
    entries = await run_in_threadpool(library.refresh)
    items = []
    for e in entries:
        state = (await run_in_threadpool(analyses.status, e.id)).state
        items.append(
            SlideItem(
                id=e.id, name=e.name, relative_path=e.relative, size_bytes=e.size, analysis=state
            )
        )
    return SlideList(slides=items)


@slides_api.get("/{slide_id}.dzi", responses=_NOT_FOUND, summary="Deep Zoom descriptor")
async def dzi(request: Request, slide_id: str) -> Response:
    xml = await run_in_threadpool(_library(request).dzi, slide_id)
    return Response(xml, media_type="application/xml")


@slides_api.get(
    "/{slide_id}_files/{level:int}/{col:int}_{row:int}.jpeg",
    responses={**_NOT_FOUND, 200: {"content": {"image/jpeg": {}}}},
    summary="One Deep Zoom tile",
)
async def tile(request: Request, slide_id: str, level: int, col: int, row: int) -> Response:
    data = await run_in_threadpool(_library(request).tile_jpeg, slide_id, level, col, row)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


# Starting an analysis (POST) and reading its state (GET) answer with the same status.
_ANALYSIS: dict[str, Any] = {
    "path": "/{slide_id}/analysis",
    "response_model": SlideStatus,
    "responses": _NOT_FOUND,
}


@slides_api.post(**_ANALYSIS, summary="Start analysing a slide (or join the analysis under way)")
async def start_analysis(request: Request, slide_id: str) -> Any:
    job, joined = await run_in_threadpool(_analyses(request).start, slide_id)
    return SlideStatus(**job.to_dict(), joined=joined)


@slides_api.get(**_ANALYSIS, summary="The slide's analysis: state and progress")
async def analysis(request: Request, slide_id: str) -> Any:
    job = await run_in_threadpool(_analyses(request).status, slide_id)
    return SlideStatus(**job.to_dict())


@slides_api.get(
    "/{slide_id}/heatmap.png",
    responses={**_NOT_FOUND, 200: {"content": {"image/png": {}}}},
    summary="The analysis' heatmap as a transparent overlay covering the whole slide",
)
async def heatmap(request: Request, slide_id: str) -> FileResponse:
    path = await run_in_threadpool(_analyses(request).overlay, slide_id)
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})


@slides_site.get("/slides", include_in_schema=False)
async def viewer_page() -> HTMLResponse:
    return page_response("slides.html")


async def _unknown(request: Request, exc: UnknownSlide) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, 404)


async def _cancelled(request: Request, exc: AnalysisCancelled) -> JSONResponse:
    return JSONResponse({"detail": str(exc) + " Retry shortly."}, 503, headers={"Retry-After": "5"})


def install_slide_handlers(app: FastAPI) -> None:
    """An unknown slide or tile is 404; an analysis refused while stopping is 503."""
    app.add_exception_handler(UnknownSlide, _unknown)
    app.add_exception_handler(AnalysisCancelled, _cancelled)
