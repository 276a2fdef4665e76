"""The inference worker: one thread owns the model, fed by a bounded queue, micro-batching predicts.

Requests never run the model on the event loop. Each one becomes a job on a bounded queue; when
the queue is full the caller gets :class:`QueueFullError` at once (the app answers 503) instead of
waiting behind work it cannot finish in time. The worker takes one job, then keeps taking queued
predict jobs until it holds ``max_batch`` images or ``batch_wait_ms`` has passed, and runs them as
one ``Predictor.predict_images`` call. Explanations run one at a time on the same thread, so the
(not thread-safe) Explainer and the model are only ever touched by that thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["InferenceWorker", "QueueFullError", "ServiceClosedError"]


class QueueFullError(RuntimeError):
    """The job queue is full; the caller should retry later."""


class ServiceClosedError(RuntimeError):
    """The service is shutting down and takes no more work."""


@dataclass
class _Job:
    kind: str  # "predict" or "explain"
    images: Sequence[Any]
    method: str | None = None
    magnifications: Sequence[int | None] = ()  # one per image, None where unknown
    future: Future = field(default_factory=Future)

    @property
    def image_magnifications(self) -> list[int | None]:
        return list(self.magnifications) or [None] * len(self.images)


_STOP = object()


def _make_explainer(predictor: Any) -> Any:
    from histolens.explain import Explainer

    return Explainer(predictor)


class InferenceWorker:
    """Runs a Predictor (and, on demand, an Explainer) on one worker thread.

    Args:
        predictor: a loaded :class:`histolens.inference.predictor.Predictor`.
        max_queue: jobs that may wait; one more is refused with :class:`QueueFullError`.
        max_batch: images per ``predict_images`` call; 1 turns micro-batching off.
        batch_wait_ms: how long the worker waits for more jobs after the first one of a batch.
        explainer_factory: builds the Explainer on first use (on the worker thread); the
            default is :class:`histolens.explain.Explainer`.
    """

    def __init__(
        self,
        predictor: Any,
        max_queue: int = 64,
        max_batch: int = 16,
        batch_wait_ms: float = 2.0,
        explainer_factory: Callable[[Any], Any] = _make_explainer,
    ) -> None:
        if max_queue < 1 or max_batch < 1 or batch_wait_ms < 0:
            raise ValueError("max_queue and max_batch must be >= 1 and batch_wait_ms >= 0.")
        self.predictor = predictor
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._explainer_factory = explainer_factory
        self._explainer: Any = None
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._carry: deque[_Job] = deque()  # a job taken while batching that did not fit
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="histolens-inference", daemon=True)
        self.batches_run = 0
        self.images_run = 0

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> InferenceWorker:
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking work, finish what the worker holds, fail what is still queued."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(_STOP, timeout=timeout)
            self._thread.join(timeout)
        # popleft, not a copy: a worker still busy after the timeout must not run these too.
        leftovers = []
        with contextlib.suppress(IndexError):
            while True:
                leftovers.append(self._carry.popleft())
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                leftovers.append(item)
        for job in leftovers:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ServiceClosedError("The service is shutting down."))
        if self._thread.is_alive():  # still busy: it stops after its current batch
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_STOP)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + len(self._carry)

    # --- submitting work ------------------------------------------------------------------------
    def _submit(self, job: _Job) -> Future:
        if self._closed:
            raise ServiceClosedError("The service is shutting down.")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(
                f"The inference queue is full ({self.max_queue} requests waiting)."
            ) from None
        return job.future

    def submit_predict(
        self, images: Sequence[Any], magnifications: Sequence[int | None] = ()
    ) -> Future:
        """Queue PIL images (of ``magnifications``: one per image, None where unknown, or none
        at all) for prediction; the future resolves to a list of Predictions."""
        images, magnifications = list(images), list(magnifications)
        # Jobs are concatenated into one micro-batch: a job with the wrong number of
        # magnifications would shift those of the jobs batched after it.
        if len(magnifications) not in (0, len(images)):
            raise ValueError(
                f"{len(magnifications)} magnifications for {len(images)} images; give one per "
                "image, or none."
            )
        return self._submit(_Job("predict", images, magnifications=magnifications))

    def submit_explain(self, image: Any, method: str, magnification: int | None = None) -> Future:
        """Queue one explanation; the future resolves to the Explainer's result."""
        return self._submit(_Job("explain", [image], method, [magnification]))

    async def predict(
        self, images: Sequence[Any], magnifications: Sequence[int | None] = ()
    ) -> list[Any]:
        return await asyncio.wrap_future(self.submit_predict(images, magnifications))

    async def explain(self, image: Any, method: str, magnification: int | None = None) -> Any:
        return await asyncio.wrap_future(self.submit_explain(image, method, magnification))

    # --- the worker -----------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> Any:
        if self._carry:
            return self._carry.popleft()
        if timeout is None:
            return self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()
        return self._queue.get(timeout=timeout)

    def _run(self) -> None:
        try:
            while True:
                job = self._next(None)
                if job is _STOP:
                    return
                if job.kind == "explain":
                    self._run_explain(job)
                    continue
                batch, n_images = [job], len(job.images)
                deadline = time.monotonic() + self.batch_wait_s
                while n_images < self.max_batch:
                    try:
                        nxt = self._next(deadline - time.monotonic())
                    except queue.Empty:
                        break
                    if (
                        nxt is _STOP
                        or nxt.kind != "predict"
                        or n_images + len(nxt.images) > self.max_batch
                    ):
                        self._carry.append(nxt)
                        break
                    batch.append(nxt)
                    n_images += len(nxt.images)
                self._run_predict(batch)
        finally:
            if self._explainer is not None:
                self._explainer.close()
                self._explainer = None

    def _run_predict(self, batch: list[_Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        images = [img for job in live for img in job.images]
        mags = [m for job in live for m in job.image_magnifications]
        try:
            predictions = self.predictor.predict_images(
                images, batch_size=max(self.max_batch, 1), magnifications=mags
            )
        except Exception as exc:  # handed to every waiting request, which reports it
            for job in live:
                job.future.set_exception(exc)
            return
        self.batches_run += 1
        self.images_run += len(images)
        start = 0
        for job in live:
            job.future.set_result(predictions[start : start + len(job.images)])
            start += len(job.images)

    def _run_explain(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            if self._explainer is None:
                self._explainer = self._explainer_factory(self.predictor)
            result = self._explainer.explain(
                job.images[0], method=job.method, magnification=job.image_magnifications[0]
            )
            job.future.set_result(result)
        except Exception as exc:
            job.future.set_exception(exc)
