"""The micro-batcher (grmpiqa.serve.batcher) in-process, with a scripted engine."""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="grmpiqa[serve] is not installed")

from grmpiqa.serve.batcher import BatcherClosed, MicroBatcher  # noqa: E402


class FakeEngine:
    """score(x) = x[:, 0, 0, 0]; the first call blocks until ``release`` is set."""

    name = "fake"

    def __init__(self, fail_on: float | None = None) -> None:
        self.batches: list[list[float]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def score(self, pixels: torch.Tensor) -> torch.Tensor:
        values = pixels[:, 0, 0, 0].tolist()
        self.batches.append(values)
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(30)
        if self.fail_on is not None and self.fail_on in values:
            raise RuntimeError("scripted failure")
        return pixels[:, 0, 0, 0].clone()

    def maps(self, pixels: torch.Tensor) -> list:
        return [f"map{v:g}" for v in pixels[:, 0, 0, 0].tolist()]


def img(v: float) -> torch.Tensor:
    return torch.full((3, 2, 2), float(v))


def test_images_waiting_during_a_batch_form_the_next_one_round_robin():
    """Each request's images keep their order; requests take turns (issue 18: fair)."""
    eng = FakeEngine()
    b = MicroBatcher(eng, max_batch=8, max_wait_ms=0)  # type: ignore[arg-type]
    first = b.submit([img(1)])
    assert eng.entered.wait(30)  # the worker is busy with [1]
    later = [b.submit([img(10 * c + k) for k in range(2)]) for c in range(1, 4)]
    assert b.pending == 7
    eng.release.set()
    assert first[0].result(30).score == 1.0
    for c, futs in enumerate(later, start=1):
        assert [f.result(30).score for f in futs] == [10 * c, 10 * c + 1]
    assert eng.batches == [[1.0], [10.0, 20.0, 30.0, 11.0, 21.0, 31.0]]
    b.close()
    assert b.pending == 0


def test_max_batch_splits_and_maps_only_where_asked():
    eng = FakeEngine()
    eng.release.set()
    b = MicroBatcher(eng, max_batch=2, max_wait_ms=200)  # type: ignore[arg-type]
    futs = b.submit([img(v) for v in (1, 2, 3)], want_map=True)
    plain = b.submit([img(4)])
    got = [f.result(30) for f in futs + plain]
    assert [g.score for g in got] == [1, 2, 3, 4]
    assert [g.map for g in got] == ["map1", "map2", "map3", None]
    assert all(len(batch) <= 2 for batch in eng.batches)
    b.close()


def test_a_failing_batch_fails_only_its_images_and_the_worker_goes_on():
    eng = FakeEngine(fail_on=5.0)
    eng.release.set()
    b = MicroBatcher(eng, max_batch=1, max_wait_ms=0)  # type: ignore[arg-type]
    bad = b.submit([img(5)])[0]
    good = b.submit([img(6)])[0]
    with pytest.raises(RuntimeError, match="scripted failure"):
        bad.result(30)
    assert good.result(30).score == 6.0
    b.close()


def test_close_finishes_queued_images_then_refuses_new_ones():
    eng = FakeEngine()
    b = MicroBatcher(eng, max_batch=4, max_wait_ms=0)  # type: ignore[arg-type]
    futs = b.submit([img(1)])
    assert eng.entered.wait(30)
    futs += b.submit([img(2), img(3)])
    closer = threading.Thread(target=b.close)
    closer.start()
    deadline = time.monotonic() + 30
    while not b.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(BatcherClosed):
        b.submit([img(4)])
    eng.release.set()
    closer.join(30)
    assert not closer.is_alive()
    assert [f.result(0).score for f in futs] == [1.0, 2.0, 3.0]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(FakeEngine(), max_batch=0)  # type: ignore[arg-type]


def test_decode_pool_shutdown_joins_within_one_deadline():
    """shutdown(wait=True, timeout): idle threads are joined; a job still running holds
    the caller no longer than ``timeout`` in all (not per thread)."""
    from grmpiqa.serve.fair import FairDecodePool

    pool = FairDecodePool(3)
    release = threading.Event()
    started = threading.Semaphore(0)

    def job() -> str:
        started.release()
        release.wait(30)
        return "done"

    busy = [pool.submit(object(), [job])[0] for _ in range(3)]  # one per worker
    for _ in range(3):
        assert started.acquire(timeout=10)
    t0 = time.monotonic()
    pool.shutdown(wait=True, timeout=1.0)
    assert time.monotonic() - t0 < 2.5  # one deadline (1 s), not 1 s per busy thread (3 s)
    alive = [t for t in pool._threads if t.is_alive()]
    assert len(alive) == 3  # the busy workers; the idle express thread ended
    release.set()
    assert [f.result(timeout=10) for f in busy] == ["done"] * 3
    pool.shutdown(wait=True, timeout=10)
    assert not any(t.is_alive() for t in pool._threads)
