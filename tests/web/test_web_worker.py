"""InferenceWorker on its own, with a stand-in predictor: batching, errors, shutdown."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from histolens.web.worker import InferenceWorker, QueueFullError, ServiceClosedError


class FakePredictor:
    """predict_images doubles each input; the first call can be held at a gate."""

    def __init__(self, hold_first: bool = False, fail: bool = False):
        self.calls: list[list[int]] = []
        self.magnifications: list[list[int | None]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not hold_first:
            self.gate.set()
        self.fail = fail

    def predict_images(self, images, batch_size=32, magnifications=None):
        self.calls.append(list(images))
        self.magnifications.append(list(magnifications or []))
        self.entered.set()
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("model exploded")
        return [2 * x for x in images]


def _held_worker(
    first: list[int], fail: bool = False, **options
) -> tuple[FakePredictor, InferenceWorker, Future]:
    """A started worker whose predictor holds its first job (``first``) at the gate."""
    predictor = FakePredictor(hold_first=True, fail=fail)
    service = InferenceWorker(predictor, **options).start()
    running = service.submit_predict(first)
    assert predictor.entered.wait(5)
    return predictor, service, running


class FakeExplainer:
    instances: list[FakeExplainer] = []

    def __init__(self, predictor):
        self.closed = False
        self.threads: set[str] = set()
        FakeExplainer.instances.append(self)

    def explain(self, image, method="gradcam", magnification=None):
        self.threads.add(threading.current_thread().name)
        return (image, method)

    def close(self):
        self.closed = True


def test_queued_jobs_are_batched_and_split_back_in_order():
    predictor, service, first = _held_worker([1], max_queue=8, max_batch=8, batch_wait_ms=0)
    futures = [service.submit_predict([10 * i, 10 * i + 1]) for i in range(1, 4)]
    predictor.gate.set()
    assert first.result(5) == [2]
    assert [f.result(5) for f in futures] == [[20, 22], [40, 42], [60, 62]]
    assert predictor.calls == [[1], [10, 11, 20, 21, 30, 31]]
    service.close()


def test_a_job_that_does_not_fit_waits_for_the_next_batch():
    predictor, service, _ = _held_worker([0], max_queue=8, max_batch=3, batch_wait_ms=0)
    a, b, c = (service.submit_predict(x) for x in ([1, 2], [3, 4], [5]))
    predictor.gate.set()
    assert (a.result(5), b.result(5), c.result(5)) == ([2, 4], [6, 8], [10])
    assert predictor.calls[1:] == [[1, 2], [3, 4, 5]]
    service.close()


def test_a_job_with_the_wrong_number_of_magnifications_is_refused():
    predictor, service, _ = _held_worker([0], max_queue=8, max_batch=8, batch_wait_ms=0)
    with pytest.raises(ValueError, match=r"^1 magnifications for 2 images; give one per image"):
        service.submit_predict([1, 2], [400])
    with pytest.raises(ValueError, match=r"^2 magnifications for 1 images"):
        service.submit_predict([3], [40, 100])
    good = [
        service.submit_predict([4, 5], [40, 100]),
        service.submit_predict([6]),
        service.submit_predict([7], [200]),
    ]
    predictor.gate.set()
    assert [f.result(5) for f in good] == [[8, 10], [12], [14]]
    # Each image of the micro-batch keeps its own job's magnification; none was queued for
    # the refused jobs.
    assert predictor.calls[1:] == [[4, 5, 6, 7]]
    assert predictor.magnifications[1:] == [[40, 100, None, 200]]
    service.close()


def test_queue_full_is_refused_at_once():
    predictor, service, _ = _held_worker([0], max_queue=2, max_batch=1)
    waiting = [service.submit_predict([1]), service.submit_predict([2])]
    with pytest.raises(QueueFullError, match=r"queue is full \(2 requests waiting\)"):
        service.submit_predict([3])
    predictor.gate.set()
    assert [f.result(5) for f in waiting] == [[2], [4]]
    service.close()


def test_model_errors_reach_every_request_of_the_batch():
    predictor, service, first = _held_worker([1], fail=True, max_batch=8, batch_wait_ms=0)
    batched = [service.submit_predict([2, 3]), service.submit_predict([4])]
    predictor.gate.set()
    for future in [first, *batched]:
        with pytest.raises(RuntimeError, match="model exploded"):
            future.result(5)
    assert predictor.calls == [[1], [2, 3, 4]]  # the last two jobs failed in one batch
    service.close()


def test_close_fails_waiting_jobs_and_refuses_new_ones():
    predictor, service, running = _held_worker([1], max_queue=4, max_batch=1)
    waiting = service.submit_predict([2])
    service.close(timeout=0.2)  # the worker is still held: close gives up waiting for it
    with pytest.raises(ServiceClosedError, match="shutting down"):
        waiting.result(0)
    with pytest.raises(ServiceClosedError):
        service.submit_predict([3])
    predictor.gate.set()
    assert running.result(5) == [2]  # the job it held finishes
    service._thread.join(5)
    assert not service._thread.is_alive()  # and then the worker stops
    assert predictor.calls == [[1]]  # the failed job never ran


def test_close_finishes_the_jobs_queued_before_it():
    predictor, service, running = _held_worker([1], max_queue=4, max_batch=1)
    waiting = service.submit_predict([2])
    closer = threading.Thread(target=service.close)
    closer.start()
    predictor.gate.set()
    closer.join(10)
    # The stop signal was queued after it, so the waiting job ran; none is left hanging.
    assert running.result(0) == [2] and waiting.result(0) == [4]
    assert predictor.calls == [[1], [2]]


def test_explanations_run_on_the_worker_and_the_explainer_is_closed():
    FakeExplainer.instances.clear()
    service = InferenceWorker(FakePredictor(), explainer_factory=FakeExplainer).start()
    assert service.submit_explain("img", "gradcam").result(5) == ("img", "gradcam")
    assert service.submit_explain("img2", "eigencam").result(5) == ("img2", "eigencam")
    service.close()
    [explainer] = FakeExplainer.instances  # made once, on first use
    assert explainer.threads == {"histolens-inference"} and explainer.closed


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="max_queue and max_batch"):
        InferenceWorker(FakePredictor(), max_batch=0)
