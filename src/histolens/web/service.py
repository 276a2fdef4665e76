"""The one object the web routes call: uploads in, typed answers out.

:class:`ModelService` holds the loaded model and its :class:`~histolens.web.worker.InferenceWorker`.
It decodes uploads within the service's limits, queues them for the worker and shapes the
results into the response schemas. It raises plain exceptions (:class:`UploadRefused`, a full or
closing queue, a :class:`~histolens.errors.ConfigError` for an unknown method); the handlers in
:mod:`histolens.web.errors` turn them into HTTP answers.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from histolens.data.imageio import load_rgb_bytes
from histolens.data.records import magnification_from_path
from histolens.errors import ImageLoadError, check_choice
from histolens.inference.shown import ShownPrediction
from histolens.web.errors import UploadRefused
from histolens.web.guard import format_bytes
from histolens.web.model_info import describe_model
from histolens.web.schemas import (
    BatchItem,
    BatchResponse,
    ExplainResponse,
    Health,
    Heatmap,
    PredictionOut,
    PredictResponse,
)
from histolens.web.settings import ServiceSettings
from histolens.web.worker import InferenceWorker

if TYPE_CHECKING:
    from fastapi import UploadFile
    from PIL import Image

    from histolens.explain import Explanation
    from histolens.inference.predictor import Prediction, Predictor

__all__ = ["ModelService", "load_predictor"]


def load_predictor(checkpoint: str | os.PathLike, settings: ServiceSettings) -> Predictor:
    """The Predictor of ``checkpoint`` as the service runs it: a torch checkpoint's backbone
    forward passes on the feature engine ``settings.engine`` chooses (as ``predict`` does);
    an ONNX export on its runtime. Heatmaps still take their gradients from PyTorch."""
    from histolens.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, settings.device, settings.onnx_runtime)
    predictor.use_engine(settings.engine)
    return predictor


class ModelService:
    """A loaded model served to the routes: predict, predict a batch, explain, describe.

    Args:
        predictor: the loaded model.
        settings: the service's limits.
        worker: the thread that runs the model (default: one made from ``settings``).
    """

    def __init__(
        self,
        predictor: Predictor,
        settings: ServiceSettings,
        worker: InferenceWorker | None = None,
    ) -> None:
        from histolens.explain import METHODS

        self.predictor = predictor
        self.settings = settings
        self.worker = worker or InferenceWorker(
            predictor, settings.max_queue, settings.max_batch, settings.batch_wait_ms
        )
        self.explain_methods: tuple[str, ...] = tuple(METHODS)
        self.model_info = describe_model(predictor, settings, self.explain_methods)

    @classmethod
    async def load(
        cls, checkpoint: str | os.PathLike | Predictor, settings: ServiceSettings
    ) -> ModelService:
        """Load ``checkpoint`` (a file or run folder; or use a loaded Predictor) off the loop."""
        if isinstance(checkpoint, (str, os.PathLike)):
            checkpoint = await run_in_threadpool(load_predictor, checkpoint, settings)
        return cls(checkpoint, settings)

    def start(self) -> ModelService:
        self.worker.start()
        return self

    def close(self) -> None:
        """Finish what the worker holds and refuse the rest (blocks; call off the loop)."""
        self.worker.close()

    @property
    def model_id(self) -> str:
        return self.predictor.model_id

    @property
    def queue_depth(self) -> int:
        return self.worker.queue_depth

    def health(self) -> Health:
        return Health(
            status="ok",
            model_id=self.model_id,
            queue_depth=self.worker.queue_depth,
            queue_capacity=self.worker.max_queue,
        )

    # --- uploads --------------------------------------------------------------------------------
    async def read_image(self, upload: UploadFile) -> Image.Image:
        """Uploaded bytes -> PIL RGB, or :class:`UploadRefused` with the status it deserves."""
        data = await upload.read()
        name = upload.filename or "upload"
        limit = self.settings.max_upload_bytes
        if len(data) > limit:
            raise UploadRefused(
                413, f"'{name}' is larger than the {format_bytes(limit)} upload limit."
            )
        try:
            return await run_in_threadpool(load_rgb_bytes, data, name, self.settings.max_pixels)
        except ImageLoadError as exc:
            raise UploadRefused.unreadable(exc) from None

    def _prediction_out(self, pred: Prediction) -> PredictionOut:
        # The schema's fields are the shown prediction's of the same names.
        shown = ShownPrediction.from_prediction(pred).to_dict()
        return PredictionOut.model_validate({**shown, "model_id": self.model_id})

    # --- predictions ----------------------------------------------------------------------------
    async def predict(
        self, upload: UploadFile, magnification: int | None = None
    ) -> PredictResponse:
        """``magnification``: the image's (default: what its file name says, else unknown)."""
        image = await self.read_image(upload)
        [pred] = await self.worker.predict([image], [_magnification_of(upload, magnification)])
        return PredictResponse(**self._prediction_out(pred).model_dump(), filename=upload.filename)

    async def predict_batch(
        self, uploads: Sequence[UploadFile], magnification: int | None = None
    ) -> BatchResponse:
        """Each file gets its prediction or its own error; the readable ones run as one batch.
        ``magnification`` is every file's (default: what each file name says)."""
        limit = self.settings.max_batch_files
        if len(uploads) > limit:
            raise UploadRefused(
                413, f"Send at most {limit} files per batch request (got {len(uploads)})."
            )
        refused: dict[int, UploadRefused] = {}
        images, mags = [], []
        for i, upload in enumerate(uploads):
            try:
                images.append(await self.read_image(upload))
                mags.append(_magnification_of(upload, magnification))
            except UploadRefused as exc:
                refused[i] = exc
        predictions = iter(await self.worker.predict(images, mags) if images else [])
        results = [
            BatchItem(filename=upload.filename, status=refused[i].status, error=str(refused[i]))
            if i in refused
            else BatchItem(
                filename=upload.filename,
                status=200,
                prediction=self._prediction_out(next(predictions)),
            )
            for i, upload in enumerate(uploads)
        ]
        n_ok = sum(r.status == 200 for r in results)
        return BatchResponse(
            model_id=self.model_id, n_ok=n_ok, n_failed=len(results) - n_ok, results=results
        )

    # --- explanations ---------------------------------------------------------------------------
    async def explain(
        self, upload: UploadFile, method: str, magnification: int | None = None
    ) -> Explanation:
        """``magnification``: the image's (default: what its file name says, else unknown)."""
        check_choice("explanation method", method, self.explain_methods)
        image = await self.read_image(upload)
        return await self.worker.explain(image, method, _magnification_of(upload, magnification))

    async def explain_png(
        self, upload: UploadFile, method: str, alpha: float, magnification: int | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """The overlay as PNG bytes, and headers with the prediction behind it."""
        result = await self.explain(upload, method, magnification)
        pred = result.prediction
        png = await run_in_threadpool(_overlay_png, result, alpha)
        return png, {
            "X-Histolens-Class": str(pred.label),
            "X-Histolens-Probability": f"{pred.probability:.6f}",
            "X-Histolens-Uncertain": str(pred.uncertain).lower(),
            "X-Histolens-Method": str(result.method),
        }

    async def explain_json(
        self, upload: UploadFile, method: str, encoding: str, magnification: int | None = None
    ) -> ExplainResponse:
        """The heatmap's values (base64 float32 or nested lists) and the prediction."""
        result = await self.explain(upload, method, magnification)
        heatmap = await run_in_threadpool(_encode_heatmap, result.heatmap, encoding)
        return ExplainResponse(
            method=str(result.method),
            target_class=_class_name(result.target_class, tuple(self.predictor.class_names)),
            prediction=self._prediction_out(result.prediction),
            heatmap=heatmap,
        )


def _magnification_of(upload: UploadFile, given: int | None) -> int | None:
    """The magnification the request gave, else what the upload's file name says."""
    return given if given is not None else magnification_from_path(upload.filename)


def _class_name(target: Any, class_names: tuple[str, ...]) -> str:
    if isinstance(target, (int, np.integer)) and 0 <= int(target) < len(class_names):
        return class_names[int(target)]
    return str(target)


def _overlay_png(result: Explanation, alpha: float) -> bytes:
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
