"""Keeping the slide pipeline's memory flat: the heap glibc holds back, and the model's batch.

Measured on ``benchmarks/bench_slide.py`` (ONNX Runtime, batch 32, one reading worker): the main
process grew by about 18 MB a batch, one float32 input batch (32 x 3 x 224 x 224 x 4 bytes), and
never gave it back. glibc raises its mmap threshold to the size of the largest block freed (up
to 32 MB), so after the first batch these 19 MB blocks come from the heap, where they fragment:
freed, but not reusable nor returned to the system. With the threshold pinned at 16 MB, or
``malloc_trim`` after the batches, the growth is gone; pinning the threshold slows torch eager
by a third (every activation buffer is then mapped and faulted in anew), so
:func:`release_free_heap` trims every :data:`TRIM_EVERY` batches instead (about 1% of a batch's
time). ONNX Runtime's arena is sized by the largest batch it has run: 860 MB for 32 tiles of
EfficientNet-Lite0 at 224 px, 210 MB for 8, and 8 at a time is no slower on a CPU, so the model
runs :data:`MODEL_CHUNK` tiles at a time (:func:`model_chunk`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["MODEL_CHUNK", "TRIM_EVERY", "model_chunk", "release_free_heap", "runs_on_cpu"]

MODEL_CHUNK = 8
TRIM_EVERY = 4


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return the heap's free pages to the system (glibc); False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def runs_on_cpu(predictor) -> bool:
    """Whether the predictor's model runs on the CPU (not on a GPU, nor an ONNX Runtime
    accelerator provider)."""
    runner = getattr(predictor, "runner", None)
    session = getattr(runner, "session", None)
    providers = session.get_providers() if hasattr(session, "get_providers") else []
    if any(p != "CPUExecutionProvider" for p in providers):
        return False
    device = getattr(predictor, "device", None)
    return device is None or getattr(device, "type", "cpu") == "cpu"


def model_chunk(predictor) -> int | None:
    """Tiles per forward pass: :data:`MODEL_CHUNK` where the model runs on the CPU, None (the
    whole batch) on an accelerator, where larger batches pay."""
    return MODEL_CHUNK if runs_on_cpu(predictor) else None
