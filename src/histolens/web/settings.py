"""The web service's settings: token, upload limits, queue and micro-batching, device, the
runtime of an ONNX export, the feature engine of a checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from histolens.config import ENGINES
from histolens.data.imageio import MAX_PIXELS
from histolens.errors import ConfigError, check_choice
from histolens.web.schemas import Limits

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "ServiceSettings"]

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class ServiceSettings:
    """How the service runs; validated when made.

    Args:
        token: if set, every /v1/* request needs ``Authorization: Bearer <token>``.
        max_upload_bytes: largest single image upload; bigger ones get 413.
        max_queue: requests that may wait for the model; more get 503 with Retry-After.
        max_batch: images per model call when concurrent predicts are micro-batched; 1 = off.
        batch_wait_ms: how long a batch waits for more requests after its first.
        max_batch_files: files per /v1/predict/batch request.
        max_batch_bytes: body limit of /v1/predict/batch (default 8 x max_upload_bytes).
        max_pixels: images with more pixels are refused as possible decompression bombs.
        device: torch device for the model.
        onnx_runtime: what runs an ONNX export, onnxruntime or openvino (None:
            $HISTOLENS_ONNX_RUNTIME, else onnxruntime); a torch checkpoint refuses one given.
        engine: what computes a torch checkpoint's backbone features for predictions
            (histolens.models.engine: auto, torch, openvino, onnxruntime; None:
            $HISTOLENS_ENGINE, else auto). Heatmaps always use PyTorch.
    """

    token: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_queue: int = 64
    max_batch: int = 16
    batch_wait_ms: float = 2.0
    max_batch_files: int = 16
    max_batch_bytes: int | None = None
    max_pixels: int = MAX_PIXELS
    device: str = "cpu"
    onnx_runtime: str | None = None
    engine: str | None = None
    slides: Path | None = None
    slide_cache: Path | None = None
    slide_tile_mpp: float | None = None
    slide_workers: int = 0

    def __post_init__(self) -> None:
        sizes = (self.max_upload_bytes, self.max_batch_files, self.max_queue, self.max_batch)
        if min(sizes) < 1 or self.batch_wait_ms < 0:
            raise ConfigError(
                "max_upload_bytes, max_batch_files, max_queue and max_batch must be at least 1, "
                "and batch_wait_ms at least 0."
            )
        if self.engine is not None:
            object.__setattr__(self, "engine", check_choice("engine", self.engine.lower(), ENGINES))
        if not self.max_batch_bytes:
            object.__setattr__(self, "max_batch_bytes", 8 * self.max_upload_bytes)
        if self.slides is not None:
            object.__setattr__(self, "slides", Path(self.slides))
            if not self.slides.is_dir():
                raise ConfigError(f"--slides {self.slides} is not a folder.")
        if self.slide_cache is None:
            base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
            object.__setattr__(self, "slide_cache", Path(base) / "histolens" / "slides")
        else:
            object.__setattr__(self, "slide_cache", Path(self.slide_cache))
        if self.slide_tile_mpp is not None and self.slide_tile_mpp <= 0:
            raise ConfigError(f"slide_tile_mpp must be above 0, not {self.slide_tile_mpp}.")
        if self.slide_workers < 0:
            raise ConfigError("slide_workers must be at least 0.")

    @property
    def limits(self) -> Limits:
        """The limits a client may read from GET /v1/model."""
        return Limits.model_validate(self, from_attributes=True)

    def body_limit_for(self, path: str) -> int | None:
        """The request-body limit of ``path`` in bytes; None for paths that take no upload."""
        if path == "/v1/predict/batch":
            return self.max_batch_bytes
        return self.max_upload_bytes if path.startswith("/v1/") else None
