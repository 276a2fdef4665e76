"""The process's one OpenVINO ``Core``: every OpenVINO compile goes through it.

OpenVINO's CPU plugin (seen with 2026.4) gives the thread that loads it a signal stack of its own
and, when the plugin is unloaded, gives the thread back the stack it found there. With two Cores
dropped in the order they were made (or one dropped in another thread), the thread is left with a
signal stack that is already unmapped, and the next signal it handles (SIGCHLD under PyTorch's
DataLoader handler, Ctrl-C, a server's SIGTERM) kills the process with SIGSEGV before any handler,
faulthandler's included, can run. One Core kept for the life of the process loads the plugin once
and never unloads it early (tests/test_openvino.py shows the failure in a child process).

:func:`infer_per_image` runs a batch one image per inference call: with the latency hint, the
CPU plugin runs EfficientNet-Lite0 faster that way than on the whole batch (294 x 448 inputs, 2
threads: 52-56 against 43-48 images/s on an Intel Xeon with AVX-512, features identical to the
bit there; 46.1 against 42.5 on an AMD EPYC with AVX2, ``bench_inference.py``), and an image's
outputs no longer depend on which batch it came in.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

_lock = threading.Lock()
_core: Any = None


def openvino_core() -> Any:
    """The shared ``openvino.Core``, made on first use (the caller has checked that OpenVINO is
    installed). ``Core.compile_model`` may be called from several threads at once."""
    global _core
    with _lock:
        if _core is None:
            import openvino

            _core = openvino.Core()
        return _core


def infer_per_image(request: Any, inputs: np.ndarray, outputs: Sequence[Any]) -> list[np.ndarray]:
    """``outputs`` of ``request`` (an OpenVINO infer request, reused) for each image of
    ``inputs`` (N, ...) run on its own, stacked along the batch again. ``infer`` returns copies
    of the request's output buffers (``share_outputs=False``), which its next call overwrites."""
    if len(inputs) == 0:  # OpenVINO would answer an empty batch with a batch of one
        return [np.zeros((0, *_trailing_shape(o)), np.float32) for o in outputs]
    parts: list[list[np.ndarray]] = [[] for _ in outputs]
    for i in range(len(inputs)):
        result = request.infer({0: inputs[i : i + 1]})
        for part, o in zip(parts, outputs, strict=True):
            part.append(result[o])
    return [np.concatenate(p) for p in parts]


def _trailing_shape(output: Any) -> tuple[int, ...]:
    """An output port's shape past the batch dimension (static in a histolens export)."""
    return tuple(int(d.get_length()) for d in list(output.get_partial_shape())[1:])
