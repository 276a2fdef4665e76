"""The service's routes: thin functions over the app's :class:`ModelService`.

``api`` holds the REST API under /v1 (token-protected when the service has a token: the app
adds that dependency when it includes the router); ``site`` holds the page and /healthz.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, Response

from histolens.web.errors import ERROR_RESPONSES
from histolens.web.pages import STATIC_DIR, page_response
from histolens.web.schemas import (
    BatchResponse,
    ExplainResponse,
    Health,
    ModelInfo,
    PredictResponse,
)
from histolens.web.service import ModelService

__all__ = ["STATIC_DIR", "api", "site"]

_IMAGE = "An image: PNG, JPEG, TIFF, BMP or WebP."
# A form field arrives as text; 40/100/200/400 exactly, anything else is a 422 naming the choices.
Magnification = Literal["40", "100", "200", "400"]


def _service(request: Request) -> ModelService:
    return request.app.state.service


Service = Annotated[ModelService, Depends(_service)]


def _magnification_form(whose: str) -> Any:
    """The optional ``magnification`` form field; it overrides what the file names say."""
    return Form(
        None,
        description=f"Magnification {whose} taken at (40, 100, 200 or 400), for prediction sets "
        "calibrated per magnification. Default: read from the file name (a BreakHis name, or a "
        "folder like '100X' in it), else the most cautious calibration.",
    )


def _magnification(value: Magnification | None) -> int | None:
    return int(value) if value else None


api = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)
site = APIRouter()


@api.post("/predict", response_model=PredictResponse, summary="Classify one image")
async def predict(
    service: Service,
    file: UploadFile = File(..., description=_IMAGE),
    magnification: Magnification | None = _magnification_form("the image was"),
) -> Any:
    return await service.predict(file, _magnification(magnification))


@api.post(
    "/predict/batch",
    response_model=BatchResponse,
    summary="Classify several images; each file gets its result or its own error",
)
async def predict_batch(
    service: Service,
    files: list[UploadFile] = File(
        ..., description="Images; at most limits.max_batch_files of them (GET /v1/model)."
    ),
    magnification: Magnification | None = _magnification_form("every image was"),
) -> Any:
    return await service.predict_batch(files, _magnification(magnification))


@api.post(
    "/explain",
    response_model=ExplainResponse,
    responses={
        200: {
            "content": {"image/png": {}},
            "description": "The heatmap overlay (format=png) or JSON.",
        },
    },
    summary="Heatmap of the regions that drove the prediction",
)
async def explain(
    service: Service,
    file: UploadFile = File(..., description=_IMAGE),
    method: str = Form("gradcam", description="Explanation method; see GET /v1/model."),
    format: Literal["png", "json"] = Form(
        "png", description="png: the overlay image; json: heatmap values and prediction."
    ),
    alpha: float = Form(0.5, ge=0.0, le=1.0, description="Overlay opacity (format=png)."),
    encoding: Literal["base64", "list"] = Form(
        "base64", description="format=json: base64 float32 (compact) or nested lists."
    ),
    magnification: Magnification | None = _magnification_form("the image was"),
) -> Any:
    mag = _magnification(magnification)
    if format == "png":
        png, headers = await service.explain_png(file, method, alpha, mag)
        return Response(png, media_type="image/png", headers=headers)
    return await service.explain_json(file, method, encoding, mag)


@api.get("/model", response_model=ModelInfo, summary="The model, its checkpoint and metrics")
async def model_info(service: Service) -> Any:
    return service.model_info


@site.get("/healthz", response_model=Health, summary="Liveness and queue depth")
async def healthz(service: Service) -> Any:
    return service.health()


@site.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return page_response("index.html")
