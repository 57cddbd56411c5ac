"""Fuzz-style: the adversarial probes of issue 18 against ``grmpiqa serve``.

Each probe gets an answer with a clear status and a one-line error (never a 500 or a
traceback), runs no external program, stays within the request's budget and time, and
leaves other clients served. Most run in-process (the ASGI app with its lifespan); the
stalled-body and SIGTERM probes need a real server process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIG
from PIL import EpsImagePlugin, Image

pytest.importorskip("fastapi", reason="grmpiqa[serve] is not installed")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (dev extra)")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import Server  # noqa: E402

import grmpiqa  # noqa: E402
from grmpiqa.serve import app as app_module  # noqa: E402
from grmpiqa.serve.app import ServeConfig, create_app  # noqa: E402
from grmpiqa.serve.engine import ScoringEngine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def small_png(seed: int = 0) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), np.uint8))


def png16(megapixels: float) -> bytes:
    """A zero-filled 16-bit grayscale PNG: a few kB sent, 2 bytes a pixel decoded."""
    side = int((megapixels * 1e6) ** 0.5)
    return png(np.zeros((side, side), np.uint16))


@pytest.fixture(scope="module")
def engine() -> ScoringEngine:
    model = grmpiqa.create_model("test-tiny", pretrained=None, config=TINY_CONFIG)
    return ScoringEngine(model, "tiny")


@pytest.fixture
def client_for(engine):
    """``client_for(**ServeConfig fields)``: a TestClient of a fresh app (lifespan run)."""
    opened: list[TestClient] = []

    def make(**kw: object) -> TestClient:
        c = TestClient(create_app([engine], ServeConfig(**{"workers": 1, **kw})))
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (n, d, "application/octet-stream")) for n, d in items]


@pytest.fixture
def fake_gs(tmp_path, monkeypatch) -> Path:
    """A ``gs`` first on PATH that records being run; Pillow forgets any earlier lookup."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gs-was-run"
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> {marker}\nexit 0\n')
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


def test_S61_S08_postscript_uploads_never_run_an_external_program(client_for, fake_gs):
    c = client_for()
    r = c.post("/v1/score", files=files(("ps.jpg", PS), ("x.eps", PS)))
    assert r.status_code == 415, r.text
    for row in r.json()["results"]:
        assert "PostScript" in row["error"] and "accepted: JPEG, PNG" in row["error"]
    doc = {"images": [{"name": "a.png", "data": base64.b64encode(PS).decode()}]}
    assert c.post("/v1/score", json=doc).status_code == 415
    ok = c.post("/v1/score", files=files(("ps.jpg", PS), ("ok.png", small_png())))
    assert ok.status_code == 200 and ok.json()["results"][1]["score"] is not None
    assert not fake_gs.exists()  # gs was never run, not even `gs --version`


def test_S16_deeply_nested_json_body_is_400(client_for):
    c = client_for()
    for body in ("[" * 100_000 + "]" * 100_000, '{"images": ' + "[" * 5000 + "]" * 5000 + "}"):
        r = c.post("/v1/score", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text[:300]
        assert "nested" in r.json()["error"] and "\n" not in r.json()["error"]


def test_D18_more_files_than_max_images_is_413_however_many(client_for):
    c = client_for(max_images=4)
    for n in (5, 6, 7, 40):
        r = c.post("/v1/score", files=files(*[(f"{i}.png", small_png(i)) for i in range(n)]))
        assert r.status_code == 413, (n, r.text)
        assert "--max-images" in r.json()["error"]


def test_S51_request_over_the_decoded_budget_is_413_before_any_decode(client_for, monkeypatch):
    """7-megapixel 16-bit PNGs (14 kB sent, 13.3 MB each decoded: bit depth counts)."""
    calls: list[str] = []
    real = app_module._prepare
    monkeypatch.setattr(
        app_module, "_prepare", lambda e, up, *a: calls.append(up.name) or real(e, up, *a)
    )
    c = client_for(max_decoded_mb=30)
    big = png16(7)
    r = c.post("/v1/score", files=files(*[(f"b{i}.png", big) for i in range(3)]))
    assert r.status_code == 413, r.text
    assert "--max-decoded-mb" in r.json()["error"] and "40 MB" in r.json()["error"]
    assert calls == []  # refused from the headers alone
    r = c.post("/v1/score", files=files(("b0.png", big), ("b1.png", big)))
    assert r.status_code == 200 and calls == ["b0.png", "b1.png"]


def _slow_prepare(monkeypatch, seconds: float) -> list[float]:
    """Uploads named ``slow*`` take ``seconds`` to decode (a huge image, simulated);
    returns the list their decodes' start times are appended to."""
    real = app_module._prepare
    starts: list[float] = []

    def prepare(engine, up, *a):
        if up.name.startswith("slow"):
            starts.append(time.monotonic())
            time.sleep(seconds)
        return real(engine, up, *a)

    monkeypatch.setattr(app_module, "_prepare", prepare)
    return starts


def test_decode_timeout_answers_503_and_drops_the_rest(client_for, monkeypatch):
    _slow_prepare(monkeypatch, 1.0)
    c = client_for(decode_timeout_s=0.3)
    t0 = time.monotonic()
    r = c.post("/v1/score", files=files(*[(f"slow{i}.png", small_png(i)) for i in range(6)]))
    took = time.monotonic() - t0
    assert r.status_code == 503 and "--decode-timeout-s" in r.json()["error"], r.text
    assert took < 3.0  # answered at the deadline, not after the six decodes
    time.sleep(1.2)  # the two decodes that had started end; the four queued were dropped
    assert c.post("/v1/score", files=files(("ok.png", small_png()))).status_code == 200


def test_S55_a_small_request_is_not_stuck_behind_a_huge_one(client_for, monkeypatch):
    """A request of four images decoding to 38 MB each (slow), then one small image from
    another client: the small one is answered before the big one's last image even
    starts decoding (first come, first served, it would wait for all four)."""
    starts = _slow_prepare(monkeypatch, 1.0)
    c = client_for(workers=1)
    big = png16(20)  # 38 MB decoded: not an express image
    done: dict[str, float] = {}

    def big_client() -> None:
        r = c.post("/v1/score", files=files(*[(f"slow{i}.png", big) for i in range(4)]))
        assert r.status_code == 200
        done["big"] = time.monotonic()

    t = threading.Thread(target=big_client)
    t.start()
    time.sleep(0.3)
    r = c.post("/v1/score", files=files(("small.png", small_png())))
    done["small"] = time.monotonic()
    t.join(60)
    assert r.status_code == 200 and r.json()["results"][0]["score"] is not None
    assert len(starts) == 4 and done["small"] < starts[-1] < done["big"]


def test_stopping_the_service_ends_its_decode_threads(engine):
    """Shutdown joins the decode pool's idle threads: none is still ending while the
    interpreter finalizes (a thread releasing its torch state then can abort the process)."""
    before = set(threading.enumerate())
    with TestClient(create_app([engine], ServeConfig(workers=2))) as c:
        assert c.post("/v1/score", files=files(("a.png", small_png()))).status_code == 200
        threads = [
            t
            for t in threading.enumerate()
            if t not in before and t.name.startswith("grmpiqa-decode")
        ]
        assert len(threads) >= 2 and all(t.is_alive() for t in threads)
    assert not any(t.is_alive() for t in threads)


# -- with a real server process -------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("fuzz_serve") / "server.log"
    srv = Server(
        ["--backbone", "test-tiny", "--pretrained", "random", "--workers", "1",
         "--body-timeout-s", "2", "--shutdown-timeout-s", "4"],
        log,
    )  # fmt: skip
    yield srv
    srv.stop()


def test_S58_stalled_request_bodies_are_answered_408_and_closed(limited_server):
    head = (
        b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    socks = []
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", limited_server.port), timeout=10)
        s.sendall(head + b'{"images": [')
        socks.append(s)
    ok = httpx.post(
        limited_server.url + "/v1/score", files=files(("a.png", small_png())), timeout=60
    )
    assert ok.status_code == 200  # other clients are served meanwhile
    answers = []
    for s in socks:  # each is answered by the deadline, then closed by the server
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        answers.append(data)
        s.close()
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0][:200]
    assert b"--body-timeout-s" in answers[0]


def test_S60_sigterm_drains_with_real_answers_or_503(tmp_path):
    """On SIGTERM a small request in flight is answered; a request whose decoding outlasts
    the grace period gets 503 (not 500); one queued beside it gets either its real answer
    or 503 (the decode pool is fair, so which depends on the CPU); the process exits 0."""
    server = Server(
        ["--backbone", "test-tiny", "--pretrained", "random", "--workers", "1",
         "--shutdown-timeout-s", "4", "--max-decoded-mb", "8192"],
        tmp_path / "server.log",
    )  # fmt: skip
    url = server.url + "/v1/score"
    huge = png16(49)  # 93 MB decoded each: 48 of them take far longer than the 4 s grace
    results: dict[str, httpx.Response] = {}

    def send(name: str, body: list) -> None:
        results[name] = httpx.post(url, files=body, timeout=120)

    bodies = {
        "huge": files(*[(f"h{i}.png", huge) for i in range(48)]),
        "queued": files(*[(f"q{i}.png", huge) for i in range(2)]),
        "small": files(("s.png", small_png())),
    }
    threads = [threading.Thread(target=send, args=item) for item in bodies.items()]
    try:
        for t in threads:
            t.start()
            time.sleep(1.0)  # each connected before the next (and before SIGTERM), even under load
        t0 = time.monotonic()
        code = server.stop(signal.SIGTERM, timeout=60)
        stopped_in = time.monotonic() - t0
    finally:
        server.stop(signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert results["small"].status_code == 200
    assert len(results["small"].json()["results"]) == 1
    for name, r in results.items():
        assert r.status_code in (200, 503), (name, r.status_code, r.text[:300])
        if r.status_code == 503:
            assert "shutting down" in r.json()["error"]
        else:  # a real answer: one score per image
            rows = r.json()["results"]
            assert len(rows) == len(bodies[name])
            assert all(row["error"] is None and isinstance(row["score"], float) for row in rows)
    assert results["huge"].status_code == 503
    assert code == 0, server.read_log()
    log = server.read_log()
    assert "Traceback" not in log
    assert "answered 503" in log
    assert stopped_in < 30  # within the grace period (4 s) plus start-up of the drain


def test_max_request_json_depth_keeps_legitimate_bodies(client_for):
    c = client_for()
    doc = {"images": [{"name": "a.png", "data": base64.b64encode(small_png()).decode()}]}
    r = c.post("/v1/score", content=json.dumps(doc), headers={"content-type": "application/json"})
    assert r.status_code == 200
