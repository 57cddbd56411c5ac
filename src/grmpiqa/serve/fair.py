"""Fair sharing of the service's workers between requests.

A request with 64 huge images must not hold back a request with one small image. Work
is queued per request (:class:`FairQueue`: one FIFO per key, served round-robin), so a
request that arrives behind a big one does not wait for the big request's whole queue.
:class:`FairDecodePool` runs decode jobs from such a queue on a few threads, plus one
*express* thread that takes only small images (decoded size at most
:data:`EXPRESS_BYTES`): a small image does not even wait for the huge images already
being decoded. The micro-batcher (:mod:`grmpiqa.serve.batcher`) takes the images of its
batches from a fair queue too.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: Images decoding to at most this many bytes (a 10-megapixel 8-bit RGB photo; a large
#: JPEG decodes reduced, far below it) may also take the express thread.
EXPRESS_BYTES = 32 * 2**20


class QueueClosed(Exception):
    """The queue was closed and holds nothing more."""


class FairQueue(Generic[T]):
    """A FIFO per key, served round-robin across keys; thread-safe.

    ``get`` takes the oldest item of the key that has waited longest since it was last
    served, so each key (a request) gets one item in turn.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: OrderedDict[Hashable, deque[T]] = OrderedDict()
        self._size = 0
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return self._size

    def put(self, key: Hashable, items: Sequence[T]) -> None:
        """Queue ``items`` under ``key`` (in order)."""
        with self._cond:
            if self._closed:
                raise QueueClosed("the queue is closed")
            q = self._queues.get(key)
            if q is None:
                q = self._queues[key] = deque()
            q.extend(items)
            self._size += len(items)
            self._cond.notify_all()

    def get(self, timeout: float | None = None, accept: Callable[[T], bool] | None = None) -> T:
        """The next item in round-robin order (with ``accept``: the next whose key's
        oldest item it accepts); ``queue.Empty`` after ``timeout`` seconds,
        :class:`QueueClosed` once closed and empty (with ``accept``: once closed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                key = self._pick(accept)
                if key is not None:
                    break
                if self._closed and (self._size == 0 or accept is not None):
                    raise QueueClosed("the queue is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                self._cond.wait(remaining)
            q = self._queues[key]
            item = q.popleft()
            self._size -= 1
            del self._queues[key]
            if q:
                self._queues[key] = q  # to the back of the round
            return item

    def _pick(self, accept: Callable[[T], bool] | None) -> Hashable | None:
        for key, q in self._queues.items():
            if accept is None or accept(q[0]):
                return key
        return None

    def drop(self, key: Hashable) -> list[T]:
        """Remove and return what is still queued under ``key``."""
        with self._cond:
            q = self._queues.pop(key, None)
            if not q:
                return []
            self._size -= len(q)
            return list(q)

    def close(self) -> None:
        """Take nothing more; ``get`` serves what is queued, then raises QueueClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


_Job = tuple[Callable[[], Any], "Future[Any]", int]


class FairDecodePool:
    """``workers`` daemon threads running jobs queued per request, round-robin, plus an
    express thread for jobs of cost at most ``express_bytes``.

    :meth:`submit` returns one future per job; :meth:`cancel` drops the jobs of a request
    that no one waits for any more (its deadline passed). Jobs already running finish
    (a decode cannot be interrupted; the per-image limits bound it).
    """

    def __init__(
        self, workers: int, name: str = "grmpiqa-decode", express_bytes: int = EXPRESS_BYTES
    ) -> None:
        self._queue: FairQueue[_Job] = FairQueue()
        self.express_bytes = express_bytes
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        self._threads.append(
            threading.Thread(target=self._work, args=(True,), name=f"{name}-express", daemon=True)
        )
        for t in self._threads:
            t.start()

    def submit(
        self, key: Hashable, jobs: Sequence[Callable[[], T]], costs: Sequence[int] | None = None
    ) -> list[Future[T]]:
        """Queue ``jobs`` of request ``key``; ``costs`` (decoded bytes; default: large)
        say which may take the express thread."""
        if costs is None:
            costs = [self.express_bytes + 1] * len(jobs)
        items: list[_Job] = [(job, Future(), c) for job, c in zip(jobs, costs, strict=True)]
        self._queue.put(key, items)
        return [f for _, f, _ in items]

    def cancel(self, key: Hashable) -> int:
        """Drop the queued jobs of ``key`` (their futures are cancelled); how many."""
        dropped = self._queue.drop(key)
        for _, fut, _ in dropped:
            fut.cancel()
        return len(dropped)

    def queued(self) -> int:
        return len(self._queue)

    def shutdown(self, wait: bool = False, timeout: float | None = None) -> None:
        """Take no new jobs; queued ones still run. ``wait``: join the threads, for at
        most ``timeout`` seconds in all (a thread still decoding is left to finish)."""
        self._queue.close()
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for t in self._threads:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _small(self, item: _Job) -> bool:
        return item[2] <= self.express_bytes

    def _work(self, express: bool = False) -> None:
        while True:
            try:
                job, fut, _ = self._queue.get(accept=self._small if express else None)
            except QueueClosed:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(job())
            except BaseException as err:  # noqa: BLE001 - delivered to the waiting request
                fut.set_exception(err)
