"""The FastAPI app: thin routes over one :class:`InferenceService`, built by ``create_app``."""

from __future__ import annotations

import base64
import importlib
import io
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from histolens.errors import ConfigError, HistolensError, ImageLoadError, check_choice
from histolens.imageio import MAX_PIXELS, load_rgb_bytes
from histolens.web.guard import RequestGuard, format_bytes
from histolens.web.schemas import (
    BatchItem,
    BatchResponse,
    DataSummary,
    ErrorResponse,
    ExplainResponse,
    Health,
    Heatmap,
    Limits,
    ModelInfo,
    PredictionOut,
    PredictResponse,
)
from histolens.web.service import InferenceService, QueueFullError, ServiceClosedError

__all__ = ["NOTICE", "create_app"]

log = logging.getLogger(__name__)

NOTICE = "Research and education use only; not for diagnosis."
STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
RETRY_AFTER_S = 1

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "Missing or wrong API token (only when the service has one).",
        413: "Upload too large (bytes), or too many files.",
        415: "The upload is not an image.",
        422: "Corrupt or truncated image, decompression bomb, or an invalid parameter.",
        503: "The inference queue is full; retry after the Retry-After header's seconds.",
    }.items()
}


def _load_explain_module() -> Any:
    """histolens.explain, or None when it is not installed (explanations then answer 501)."""
    try:
        return importlib.import_module("histolens.explain")
    except ImportError as exc:
        log.warning("Explanations are disabled: cannot import histolens.explain (%s).", exc)
        return None


def _upload_status(exc: ImageLoadError) -> int:
    """415 for data that is no image format at all, 422 for a broken or refused image."""
    return 415 if exc.kind == "not_image" else 422


def _upload_message(exc: ImageLoadError) -> str:
    if exc.kind == "not_image":
        return f"'{exc.path}' is not an image this service can read (PNG, JPEG, TIFF, BMP, WebP)."
    reason = exc.reason if exc.reason.endswith((".", ".)")) else exc.reason + "."
    return f"Cannot use '{exc.path}': {reason}"


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "The request is not valid."
    first = errors[0]
    name = str(first.get("loc", ("", "request"))[-1])
    if first.get("type") == "missing":
        return f"Missing form field '{name}'."
    return f"Invalid value for '{name}': {first.get('msg', 'not valid')}."


def _prediction_out(pred: Any, model_id: str) -> dict[str, Any]:
    return {
        "class": pred.label,
        "probability": pred.probability,
        "positive_probability": pred.positive_probability,
        "scores": pred.scores,
        "threshold": pred.threshold,
        "uncertain": pred.uncertain,
        "model_id": model_id,
    }


def _class_name(target: Any, class_names: tuple[str, ...]) -> str:
    if isinstance(target, (int, np.integer)) and 0 <= int(target) < len(class_names):
        return class_names[int(target)]
    return str(target)


def create_app(
    checkpoint: str | os.PathLike | Any,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_queue: int = 64,
    max_batch: int = 16,
    batch_wait_ms: float = 2.0,
    max_batch_files: int = 16,
    max_batch_bytes: int | None = None,
    max_pixels: int = MAX_PIXELS,
    device: str = "cpu",
) -> FastAPI:
    """Build the service. The model loads once, when the app starts (its lifespan).

    Args:
        checkpoint: a checkpoint file or run directory (or an already loaded Predictor).
        token: if set, every /v1/* request needs ``Authorization: Bearer <token>``.
        max_upload_bytes: largest single image upload; bigger ones get 413.
        max_queue: requests that may wait for the model; more get 503 with Retry-After.
        max_batch: images per model call when concurrent predicts are micro-batched; 1 = off.
        batch_wait_ms: how long a batch waits for more requests after its first.
        max_batch_files: files per /v1/predict/batch request.
        max_batch_bytes: body limit of /v1/predict/batch (default 8 x max_upload_bytes).
        max_pixels: images with more pixels are refused as possible decompression bombs.
        device: torch device for the model.
    """
    if min(max_upload_bytes, max_batch_files, max_queue, max_batch) < 1 or batch_wait_ms < 0:
        raise ConfigError(
            "max_upload_bytes, max_batch_files, max_queue and max_batch must be at least 1, "
            "and batch_wait_ms at least 0."
        )
    max_batch_bytes = max_batch_bytes or 8 * max_upload_bytes
    limits = Limits(
        max_upload_bytes=max_upload_bytes,
        max_batch_files=max_batch_files,
        max_pixels=max_pixels,
        max_queue=max_queue,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if isinstance(checkpoint, (str, os.PathLike)):
            from histolens.predictor import Predictor

            predictor = await run_in_threadpool(Predictor.from_checkpoint, checkpoint, device)
        else:
            predictor = checkpoint
        explain = _load_explain_module()
        service = InferenceService(
            predictor, max_queue, max_batch, batch_wait_ms, explain.Explainer if explain else None
        ).start()
        app.state.predictor = predictor
        app.state.explain = explain
        app.state.service = service
        app.state.model_info = _model_info(predictor, explain)
        log.info("Serving model %s (%s).", predictor.model_id, predictor.backbone_name)
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    def _model_info(predictor: Any, explain: Any) -> ModelInfo:
        from histolens.performance import estimate_from_metrics

        meta = predictor.metadata
        estimate = meta.get("estimate") if isinstance(meta.get("estimate"), dict) else None
        stored = estimate_from_metrics(
            meta.get("metrics"), list(predictor.class_names), predictor.task
        )
        return ModelInfo(
            model_id=predictor.model_id,
            backbone=predictor.backbone_name,
            task=predictor.task,
            class_names=list(predictor.class_names),
            threshold=predictor.threshold if len(predictor.class_names) == 2 else None,
            temperature=predictor.temperature,
            magnification=None if meta.get("magnification") is None else str(meta["magnification"]),
            saved_at=meta.get("saved_at"),
            data=_data_summary(meta.get("data")),
            estimate=estimate,
            metrics=meta.get("metrics") or {},
            metrics_description=stored["description"] if stored else None,
            metrics_warnings=(estimate or stored or {}).get("warnings", []),
            versions=meta.get("versions") or {},
            explain_methods=list(explain.METHODS) if explain else [],
            auth_required=bool(token),
            limits=limits,
            notice=NOTICE,
        )

    app = FastAPI(
        title="histolens",
        summary="Breast-histopathology classification with calibrated probabilities and "
        "heatmaps. " + NOTICE,
        version=_version(),
        lifespan=lifespan,
    )

    def body_limit_for(path: str) -> int | None:
        if path == "/v1/predict/batch":
            return max_batch_bytes
        return max_upload_bytes if path.startswith("/v1/") else None

    app.add_middleware(
        RequestGuard, token=token, protected_prefix="/v1/", body_limit_for=body_limit_for
    )

    # --- errors: always {"detail": "<one sentence>"} ---------------------------------------------
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"There is no {request.url.path} here; see /docs for the API."
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs."
        return JSONResponse({"detail": detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, 422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer is sent.
        return JSONResponse(
            {"detail": f"Internal error ({type(exc).__name__}); see the server log."}, 500
        )

    @app.exception_handler(HistolensError)
    async def histolens_error(request: Request, exc: HistolensError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 422)

    # --- helpers the routes share --------------------------------------------------------------
    def service_of(request: Request) -> InferenceService:
        return request.app.state.service

    async def read_image(upload: UploadFile) -> Any:
        """Uploaded bytes -> PIL RGB, or an HTTPException with the status the problem deserves."""
        data = await upload.read()
        name = upload.filename or "upload"
        if len(data) > max_upload_bytes:
            raise HTTPException(
                413, f"'{name}' is larger than the {format_bytes(max_upload_bytes)} upload limit."
            )
        try:
            return await run_in_threadpool(load_rgb_bytes, data, name, max_pixels)
        except ImageLoadError as exc:
            raise HTTPException(_upload_status(exc), _upload_message(exc)) from None

    async def queued(awaitable_factory, *args) -> Any:
        try:
            return await awaitable_factory(*args)
        except QueueFullError as exc:
            raise HTTPException(
                503, f"{exc} Retry in a moment.", headers={"Retry-After": str(RETRY_AFTER_S)}
            ) from None
        except ServiceClosedError:
            raise HTTPException(
                503,
                "The service is shutting down; retry shortly.",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None

    # --- routes --------------------------------------------------------------------------------
    bearer = (
        [
            Security(
                HTTPBearer(
                    auto_error=False, description="The token given to 'histolens serve --token'."
                )
            )
        ]
        if token
        else []
    )
    v1 = APIRouter(prefix="/v1", dependencies=bearer, responses=_ERRORS)

    @v1.post("/predict", response_model=PredictResponse, summary="Classify one image")
    async def predict(
        request: Request,
        file: UploadFile = File(..., description="An image: PNG, JPEG, TIFF, BMP or WebP."),
    ) -> Any:
        image = await read_image(file)
        [pred] = await queued(service_of(request).predict, [image])
        return {
            **_prediction_out(pred, request.app.state.predictor.model_id),
            "filename": file.filename,
        }

    @v1.post(
        "/predict/batch",
        response_model=BatchResponse,
        summary="Classify several images; each file gets its result or its own error",
    )
    async def predict_batch(
        request: Request,
        files: list[UploadFile] = File(..., description=f"Up to {max_batch_files} images."),
    ) -> Any:
        if len(files) > max_batch_files:
            raise HTTPException(
                413, f"Send at most {max_batch_files} files per batch request (got {len(files)})."
            )
        items: list[BatchItem | None] = []
        images = []
        for upload in files:
            try:
                images.append(await read_image(upload))
                items.append(None)
            except HTTPException as exc:
                items.append(
                    BatchItem(filename=upload.filename, status=exc.status_code, error=exc.detail)
                )
        predictions = iter(await queued(service_of(request).predict, images) if images else [])
        model_id = request.app.state.predictor.model_id
        results = [
            item
            or BatchItem(
                filename=upload.filename,
                status=200,
                prediction=PredictionOut(**_prediction_out(next(predictions), model_id)),
            )
            for item, upload in zip(items, files, strict=True)
        ]
        n_ok = sum(r.status == 200 for r in results)
        return BatchResponse(
            model_id=model_id, n_ok=n_ok, n_failed=len(results) - n_ok, results=results
        )

    @v1.post(
        "/explain",
        response_model=ExplainResponse,
        responses={
            200: {
                "content": {"image/png": {}},
                "description": "The heatmap overlay (format=png) or JSON.",
            },
            501: {"model": ErrorResponse, "description": "Explanations are not installed."},
        },
        summary="Heatmap of the regions that drove the prediction",
    )
    async def explain(
        request: Request,
        file: UploadFile = File(..., description="An image: PNG, JPEG, TIFF, BMP or WebP."),
        method: str = Form("gradcam", description="Explanation method; see GET /v1/model."),
        format: Literal["png", "json"] = Form(
            "png", description="png: the overlay image; json: heatmap values and prediction."
        ),
        alpha: float = Form(0.5, ge=0.0, le=1.0, description="Overlay opacity (format=png)."),
        encoding: Literal["base64", "list"] = Form(
            "base64", description="format=json: base64 float32 (compact) or nested lists."
        ),
    ) -> Any:
        module = request.app.state.explain
        if module is None:
            raise HTTPException(
                501,
                "Explanations are not available in this installation "
                "(histolens.explain cannot be imported).",
            )
        check_choice("explanation method", method, module.METHODS)
        image = await read_image(file)
        result = await queued(service_of(request).explain, image, method)
        predictor = request.app.state.predictor
        pred = _prediction_out(result.prediction, predictor.model_id)
        target = _class_name(result.target_class, predictor.class_names)
        if format == "png":
            png = await run_in_threadpool(_overlay_png, result, alpha)
            return Response(
                png,
                media_type="image/png",
                headers={
                    "X-Histolens-Class": str(pred["class"]),
                    "X-Histolens-Probability": f"{pred['probability']:.6f}",
                    "X-Histolens-Uncertain": str(pred["uncertain"]).lower(),
                    "X-Histolens-Method": str(result.method),
                },
            )
        heatmap = await run_in_threadpool(_encode_heatmap, result.heatmap, encoding)
        return ExplainResponse(
            method=str(result.method),
            target_class=target,
            prediction=PredictionOut(**pred),
            heatmap=heatmap,
        )

    @v1.get("/model", response_model=ModelInfo, summary="The model, its checkpoint and metrics")
    async def model_info(request: Request) -> Any:
        return request.app.state.model_info

    app.include_router(v1)

    @app.get("/healthz", response_model=Health, summary="Liveness and queue depth")
    async def healthz(request: Request) -> Any:
        service = service_of(request)
        return Health(
            status="ok",
            model_id=request.app.state.predictor.model_id,
            queue_depth=service.queue_depth,
            queue_capacity=service.max_queue,
        )

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _overlay_png(result: Any, alpha: float) -> bytes:
    buf = io.BytesIO()
    result.overlay(alpha).save(buf, format="PNG")
    return buf.getvalue()


def _encode_heatmap(heatmap: Any, encoding: str) -> Heatmap:
    arr = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    height, width = arr.shape
    if encoding == "list":
        return Heatmap(encoding="list", height=height, width=width, data=np.round(arr, 4).tolist())
    data = base64.b64encode(arr.astype("<f4").tobytes()).decode("ascii")
    return Heatmap(encoding="base64-float32-le", height=height, width=width, data=data)


def _data_summary(data: Any) -> DataSummary:
    """The training data's layout and counts; its path stays on the server."""
    if not isinstance(data, dict):
        return DataSummary()
    # The last part of the path only (written on Windows or POSIX): never the folders above it.
    name = str(data.get("path") or "").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    split = data.get("split")
    return DataSummary(
        name=name or None,
        layout=None if data.get("layout") is None else str(data["layout"]),
        patient_level_split=data.get("patient_level_split"),
        split={k: v for k, v in split.items() if isinstance(v, dict)}
        if isinstance(split, dict)
        else {},
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("histolens")
    except PackageNotFoundError:
        return "0+unknown"
