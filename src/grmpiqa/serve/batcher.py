"""Micro-batching: images from many concurrent requests scored together.

One worker thread per model owns it. Requests put their preprocessed images on a queue
(one FIFO per request, served round-robin: :class:`~grmpiqa.serve.fair.FairQueue`, so a
request's images do not wait behind all of a larger request's); the worker takes the
first waiting image, then keeps collecting until it has ``max_batch`` images or
``max_wait_ms`` have passed since that first image, scores the stack in one forward
pass, and resolves each image's future. A batch that fails fails only its own images;
the worker carries on. :meth:`MicroBatcher.close` lets every queued image finish before
the thread ends (graceful shutdown).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from grmpiqa.explain import QualityMap
from grmpiqa.log import get_logger
from grmpiqa.serve.engine import ScoringEngine
from grmpiqa.serve.fair import FairQueue, QueueClosed

log = get_logger("serve")


@dataclass
class Scored:
    """What the batcher returns for one image."""

    score: float
    map: QualityMap | None = None


@dataclass
class _Job:
    pixels: torch.Tensor
    want_map: bool
    future: Future[Scored] = field(default_factory=Future)


#: ``on_batch(engine_name, batch_size, seconds)``, called after every batch.
BatchHook = Callable[[str, int, float], None]


class BatcherClosed(RuntimeError):
    """The service is shutting down and takes no new images."""


class MicroBatcher:
    """Collects images into batches of up to ``max_batch`` within ``max_wait_ms``."""

    def __init__(
        self,
        engine: ScoringEngine,
        max_batch: int = 32,
        max_wait_ms: float = 10.0,
        on_batch: BatchHook | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: FairQueue[_Job] = FairQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._pending = 0
        self._thread = threading.Thread(
            target=self._run, name=f"grmpiqa-batcher-{engine.name}", daemon=True
        )
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Images submitted and not yet answered (queued or in the current batch)."""
        with self._lock:
            return self._pending

    def submit(
        self, pixels: list[torch.Tensor], want_map: bool = False, key: Hashable | None = None
    ) -> list[Future[Scored]]:
        """Queue preprocessed images; one future per image, in order. ``key`` names the
        request (default: this call) for round-robin service and :meth:`cancel`."""
        jobs = [_Job(p, want_map) for p in pixels]
        with self._lock:
            if self._closed:
                raise BatcherClosed("the service is shutting down")
            self._pending += len(jobs)
            self._queue.put(object() if key is None else key, jobs)
        return [j.future for j in jobs]

    def cancel(self, key: Hashable) -> int:
        """Drop the images of request ``key`` still waiting for a batch; how many."""
        dropped = self._queue.drop(key)
        with self._lock:
            self._pending -= len(dropped)
        for j in dropped:
            j.future.cancel()
        return len(dropped)

    def close(self, timeout: float | None = None) -> None:
        """Take no new images, finish every queued one, stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.close()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get()
            except QueueClosed:  # closed, and every accepted image is answered
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except (queue.Empty, QueueClosed):
                    break
            self._process(batch)

    def _process(self, batch: list[_Job]) -> None:
        try:
            self._score(batch)
        finally:
            with self._lock:
                self._pending -= len(batch)

    def _score(self, batch: list[_Job]) -> None:
        t0 = time.perf_counter()
        try:
            pixels = torch.stack([j.pixels for j in batch])
            scores = self.engine.score(pixels).tolist()
            maps: dict[int, QualityMap] = {}
            want = [i for i, j in enumerate(batch) if j.want_map]
            if want:
                for i, qm in zip(want, self.engine.maps(pixels[want]), strict=True):
                    maps[i] = qm
        except Exception as err:  # noqa: BLE001 - a failed batch fails its images only
            log.error("scoring a batch of %d images failed: %s", len(batch), err)
            for j in batch:
                j.future.set_exception(err)
            return
        for i, (j, s) in enumerate(zip(batch, scores, strict=True)):
            j.future.set_result(Scored(float(s), maps.get(i)))
        if self.on_batch is not None:
            self.on_batch(self.engine.name, len(batch), time.perf_counter() - t0)
