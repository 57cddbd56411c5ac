"""``grmpiqa serve``: the service runs as a subprocess on a free loopback port.

Every bad-input rule of the issue has a test here: corrupt upload, non-image, too large
body (413), too many pixels (413), unknown checkpoint (404), none readable (400/415),
mixed (200 with per-image errors), results in request order, batching of concurrent
clients, graceful shutdown. Scores equal ``grmpiqa score`` on the same files to 1e-5.
"""

from __future__ import annotations

import base64
import csv
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, make_image
from PIL import Image, ImageFilter

import grmpiqa
from grmpiqa.checkpoint import save_checkpoint
from grmpiqa.cli import main
from grmpiqa.data import load_dataset
from grmpiqa.finetune import FinetuneConfig, finetune

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (dev extra)")
pytest.importorskip("fastapi", reason="grmpiqa[serve] is not installed")
pytest.importorskip("uvicorn", reason="grmpiqa[serve] is not installed")

START_TIMEOUT_S = 180.0


# -- a service subprocess ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``grmpiqa serve ARGS`` on a free 127.0.0.1 port, logs in ``log``."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "grmpiqa", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=os.environ)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(self.url + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"server did not start in {START_TIMEOUT_S} s:\n{self.read_log()}"
                )
            time.sleep(0.1)

    def read_log(self) -> str:
        if not self._fh.closed:
            self._fh.flush()
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()
        return int(self.proc.returncode)


def tiny_checkpoints(d: Path) -> tuple[Path, Path, object]:
    """A fine-tuned test-tiny checkpoint with a MOS scale, and one without."""
    rng = np.random.default_rng(3)
    rows = ["path,mos"]
    for i in range(10):
        arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).filter(ImageFilter.GaussianBlur(0.5 * i)).save(d / f"shot{i}.png")
        rows.append(f"shot{i}.png,{95 - 8 * i}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    shots = load_dataset(f"csv:{d / 'labels.csv'}?mos_range=0,100")
    torch.set_num_threads(1)
    model = grmpiqa.create_model("test-tiny", pretrained=None, config=TINY_CONFIG)
    ft = d / "ft.safetensors"
    config = FinetuneConfig(lr=0.05, max_epochs=4, eval_every=2, cache_augmentations=1)
    finetune(model, shots, config, out=ft, progress=False)
    plain = d / "plain.safetensors"
    save_checkpoint(
        grmpiqa.create_model("test-tiny", pretrained=None, config=TINY_CONFIG, seed=7), plain
    )
    return ft, plain, shots


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("serve_files")
    out = {
        f"img{i}": make_image(d / f"img{i}.png", size=(96 + 8 * i, 80), seed=i) for i in range(5)
    }
    out["jpg"] = make_image(d / "photo.jpg", size=(120, 90), seed=11)
    out["big"] = make_image(d / "big.png", size=(300, 300), seed=12)  # 90000 px > limit
    corrupt = d / "corrupt.png"
    corrupt.write_bytes(out["img0"].read_bytes()[:200])  # a truncated PNG
    out["corrupt"] = corrupt
    text = d / "notes.txt"
    text.write_text("not an image at all\n")
    out["text"] = text
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("serve_ckpt"))


@pytest.fixture(scope="module")
def server(ckpts, tmp_path_factory):
    ft, plain, _ = ckpts
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    srv = Server(
        [
            "--checkpoint", str(ft),
            "--checkpoint", str(plain),
            "--max-body-mb", "1",
            "--max-pixels", "40000",
            "--max-images", "8",
            "--max-wait-ms", "20",
            "--workers", "2",
        ],
        log,
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0, srv.read_log()


def post_files(url: str, paths: list[Path], params: dict[str, str] | None = None) -> httpx.Response:
    fields = [("image", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    return httpx.post(url + "/v1/score", files=fields, params=params or {}, timeout=120)


def cli_scores(ckpt: Path, paths: list[Path], tmp: Path, *extra: str) -> list[float]:
    out = tmp / f"cli{len(list(tmp.iterdir()))}.csv"
    assert main(["score", "--checkpoint", str(ckpt), "--no-progress", "-o", str(out), *extra]
                + [str(p) for p in paths]) == 0  # fmt: skip
    column = "mos" if "mos" in extra else "score"  # --scale mos writes a mos column
    with open(out) as fh:
        return [float(r[column]) for r in csv.DictReader(fh)]


# -- health, models, metrics ---------------------------------------------------------


def test_health_models_and_random_weights_announced(server):
    r = httpx.get(server.url + "/v1/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["models"] == ["ft", "plain"] and h["default"] == "ft"
    assert h["random_weights"] is True
    assert r.headers["x-grmpiqa-random-weights"] == "true"
    doc = httpx.get(server.url + "/v1/models").json()
    cards = {c["name"]: c for c in doc["models"]}
    ft = cards["ft"]
    assert ft["backbone"] == "test-tiny" and ft["weights"] == {"kind": "random", "seed": 0}
    assert ft["random_weights"] is True and "RANDOM" in ft["description"]
    assert "RANDOM" in ft["warning"]
    assert ft["checkpoint"]["file"] == "ft.safetensors" and len(ft["checkpoint"]["sha256"]) == 64
    assert ft["scale"]["lo"] == 0 and ft["scale"]["hi"] == 100 and ft["scale"]["map"]["kind"]
    assert cards["plain"]["scale"] is None
    assert ft["preprocess"] == {"resize": 244, "crop": 224, "interpolation": "bicubic",
                                "stats": "imagenet"}  # fmt: skip
    assert ft["map_grid"] == [7, 7] and ft["version"] == grmpiqa.__version__
    assert doc["limits"]["max_images"] == 8


def test_page_and_static_files_are_served_without_a_cdn(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    assert '<label for="file"' in html and 'name="viewport"' in html
    for src in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        s = httpx.get(server.url + src)
        assert s.status_code == 200, src
        assert "http://" not in s.text and "https://" not in s.text, f"{src} loads remote code"
    assert re.search(r'(?:src|href)="https?://', html) is None


# -- scores -----------------------------------------------------------------------------


def test_scores_equal_grmpiqa_score_to_1e5_in_request_order(server, files, ckpts, tmp_path):
    ft, plain, _ = ckpts
    paths = [files["img3"], files["jpg"], files["img0"], files["img1"]]
    r = post_files(server.url, paths)
    assert r.status_code == 200
    doc = r.json()
    assert [x["name"] for x in doc["results"]] == [p.name for p in paths]
    assert all(x["error"] is None for x in doc["results"])
    assert doc["model"]["name"] == "ft" and doc["model"]["random_weights"] is True
    got = [x["score"] for x in doc["results"]]
    expected = cli_scores(ft, paths, tmp_path)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # the other checkpoint, through JSON with base64
    body = {
        "images": [
            {"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in paths
        ]
    }
    r = httpx.post(server.url + "/v1/score", json=body, params={"checkpoint": "plain"})
    assert r.status_code == 200 and r.json()["model"]["name"] == "plain"
    got_plain = [x["score"] for x in r.json()["results"]]
    np.testing.assert_allclose(got_plain, cli_scores(plain, paths, tmp_path), atol=1e-5, rtol=0)
    diff = max(abs(a - b) for a, b in zip(got, got_plain, strict=True))
    assert diff > 1e-4  # two different models


def test_mos_scale_matches_the_cli_and_is_refused_without_a_scale(server, files, ckpts, tmp_path):
    ft, _, _ = ckpts
    paths = [files["img2"], files["img4"]]
    r = post_files(server.url, paths, {"scale": "mos"})
    assert r.status_code == 200
    res = r.json()["results"]
    mos = [x["mos"] for x in res]
    np.testing.assert_allclose(mos, cli_scores(ft, paths, tmp_path, "--scale", "mos"), atol=1e-3)
    assert all(0 <= m <= 100 for m in mos)
    assert all(0 < x["score"] < 1 for x in res)  # p stays beside it
    r = post_files(server.url, paths, {"scale": "mos", "checkpoint": "plain"})
    assert r.status_code == 400 and "no MOS scale recorded" in r.json()["error"]
    r = post_files(server.url, paths, {"scale": "dmos"})
    assert r.status_code == 400 and "scale" in r.json()["error"]


def test_map_option_adds_a_small_map_per_image(server, files):
    r = post_files(server.url, [files["img1"], files["text"]], {"map": "true", "scale": "mos"})
    assert r.status_code == 200
    ok, bad = r.json()["results"]
    m = ok["map"]
    assert (m["rows"], m["cols"]) == (7, 7) and len(m["grid"]) == 7
    assert all(len(row) == 7 for row in m["grid"])
    g = np.array(m["grid"])
    assert 0 < g.min() <= m["mean"] <= g.max() < 1
    assert m["mean"] == pytest.approx(g.mean(), abs=1e-3)
    assert len(m["box"]) == 4 and 0 < m["box"][0] < m["box"][2] < 1
    assert "mos_grid" in m and "map" not in bad
    r = post_files(server.url, [files["img1"]], {"map": "maybe"})
    assert r.status_code == 400


# -- bad input --------------------------------------------------------------------------


def test_mixed_request_is_200_with_per_image_errors_in_order(server, files):
    paths = [files["img0"], files["corrupt"], files["text"], files["big"], files["img2"]]
    r = post_files(server.url, paths)
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["name"] for x in res] == [p.name for p in paths]
    assert res[0]["error"] is None and res[4]["error"] is None
    assert res[1]["score"] is None and "corrupt.png: cannot decode image" in res[1]["error"]
    assert res[2]["score"] is None and "notes.txt: not an image file" in res[2]["error"]
    assert res[3]["score"] is None and "too large" in res[3]["error"] and "40000" in res[3]["error"]
    # the service is still up and scores as before
    again = post_files(server.url, [files["img0"]]).json()["results"][0]["score"]
    assert again == pytest.approx(res[0]["score"], abs=1e-6)


@pytest.mark.parametrize(
    ("names", "status", "text"),
    [
        (["corrupt"], 400, "cannot decode image"),
        (["text"], 415, "not an image file"),
        (["text", "text"], 415, "not an image file"),
        (["big"], 413, "too large"),
        (["corrupt", "text"], 400, "cannot decode image"),
        (["big", "text"], 413, "too large"),
    ],
)
def test_no_readable_image_gets_400_415_or_413(server, files, names, status, text):
    r = post_files(server.url, [files[n] for n in names])
    assert r.status_code == status
    doc = r.json()
    assert doc["error"] == "no image in the request could be scored"
    assert text in doc["results"][0]["error"]
    assert doc["model"]["random_weights"] is True


def test_too_large_body_is_413(server):
    blob = os.urandom(1024 * 1024 + 10)  # > --max-body-mb 1
    r = httpx.post(server.url + "/v1/score", files=[("image", ("x.png", blob, "image/png"))])
    assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]
    assert r.headers["x-grmpiqa-random-weights"] == "true"

    def chunks():  # no content-length: the limit holds for chunked bodies too
        for _ in range(5):
            yield os.urandom(300 * 1024)

    r = httpx.post(
        server.url + "/v1/score",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413


def test_unknown_checkpoint_is_404(server, files):
    r = post_files(server.url, [files["img0"]], {"checkpoint": "nope"})
    assert r.status_code == 404
    assert "unknown checkpoint 'nope'" in r.json()["error"] and "ft, plain" in r.json()["error"]


def test_request_shape_errors(server, files):
    url = server.url + "/v1/score"
    r = httpx.post(url, content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "unsupported content type" in r.json()["error"]
    r = httpx.post(url, files=[("other", ("a.png", files["img0"].read_bytes(), "image/png"))])
    assert r.status_code == 400 and "named 'image'" in r.json()["error"]
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = httpx.post(url, json={"images": [{"name": "x.png", "data": "@@@not base64@@@"}]})
    assert r.status_code == 400 and "not valid base64" in r.json()["results"][0]["error"]
    r = post_files(server.url, [files["img0"]] * 9)  # --max-images 8
    assert r.status_code == 413 and "--max-images" in r.json()["error"]
    r = httpx.post(url, json={"images": []})
    assert r.status_code == 400


def test_server_paths_in_a_request_are_never_read(server, files):
    """A name or data field naming a server file is only a label / bad data."""
    secret = str(files["img0"].resolve())
    body = {"images": [{"name": secret, "data": base64.b64encode(secret.encode()).decode()}]}
    r = httpx.post(server.url + "/v1/score", json=body)
    assert r.status_code == 415  # the bytes of a path string are not an image
    res = r.json()["results"][0]
    assert res["name"] == files["img0"].name and res["score"] is None  # only the base name
    r = httpx.post(server.url + "/v1/score", json={"images": [{"name": "a", "path": secret}]})
    assert r.status_code == 400 and "base64" in r.json()["results"][0]["error"]


def test_metrics_are_prometheus_text(server, files):
    post_files(server.url, [files["img0"], files["text"]])
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "grmpiqa_requests_total",
        "grmpiqa_images_total",
        "grmpiqa_image_errors_total",
        "grmpiqa_batch_size_bucket",
        "grmpiqa_request_latency_seconds_bucket",
        "grmpiqa_model_info",
    ):
        assert f"# TYPE {name.removesuffix('_total').removesuffix('_bucket')}" in text, name
    assert re.search(r'grmpiqa_image_errors_total\{reason="not_an_image"\} [1-9]', text)
    assert re.search(r'grmpiqa_requests_total\{code="200",endpoint="/v1/score"\} [1-9]', text)
    assert 'random_weights="true"' in text


# -- batching of concurrent clients and graceful shutdown --------------------------------


@pytest.fixture(scope="module")
def slow_batch_server(ckpts, tmp_path_factory):
    """A server whose first image waits up to 1.5 s for company (batches are certain)."""
    ft, _, _ = ckpts
    log = tmp_path_factory.mktemp("serve_log2") / "server.log"
    srv = Server(["--checkpoint", str(ft), "--max-wait-ms", "1500", "--max-batch", "64"], log)
    yield srv
    srv.stop()


def _batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text
    count = float(re.search(r"grmpiqa_batch_size_count\{[^}]*\} (\S+)", text).group(1))
    total = float(re.search(r"grmpiqa_batch_size_sum\{[^}]*\} (\S+)", text).group(1))
    return count, total


def test_concurrent_clients_are_batched_together(slow_batch_server, files, ckpts, tmp_path):
    ft, _, _ = ckpts
    url = slow_batch_server.url
    names = ["img0", "img1", "img2", "img3", "img4", "jpg"]
    requests = [[files[names[i]], files[names[(i + 1) % 6]]] for i in range(6)]
    barrier = threading.Barrier(len(requests))

    def client(paths):
        barrier.wait()
        return post_files(url, paths)

    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(client, requests))
    assert all(r.status_code == 200 for r in responses)
    expected = dict(zip(names, cli_scores(ft, [files[n] for n in names], tmp_path), strict=True))
    by_name = {files[n].name: expected[n] for n in names}
    for paths, r in zip(requests, responses, strict=True):
        res = r.json()["results"]
        assert [x["name"] for x in res] == [p.name for p in paths]  # each client's own order
        for x in res:
            assert x["score"] == pytest.approx(by_name[x["name"]], abs=1e-5)
    count, total = _batch_stats(url)
    assert total == 12  # every image scored once
    assert count < 12  # and not one by one: images of several clients shared a batch


def test_graceful_shutdown_finishes_in_flight_requests(ckpts, files, tmp_path):
    """SIGTERM while requests wait in the batcher: they are answered, then the process
    exits 0."""
    ft, _, _ = ckpts
    # its own server: the first image waits up to 10 s for company, so all three requests
    # are surely held in the batcher when SIGTERM comes, however loaded the machine is
    server = Server(["--checkpoint", str(ft), "--max-wait-ms", "10000"], tmp_path / "log")
    url = server.url
    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(post_files, url, [files[f"img{i}"]]) for i in range(3)]
            deadline = time.monotonic() + 15
            queue = 0
            while queue < 3 and time.monotonic() < deadline:
                queue = httpx.get(url + "/v1/health").json()["queue"]
                time.sleep(0.02)
            assert queue == 3, "the three requests did not reach the batcher"
            code = server.stop(signal.SIGTERM)
            responses = [f.result(timeout=60) for f in futures]
    finally:
        server.stop(signal.SIGKILL)
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert all(r.json()["results"][0]["error"] is None for r in responses)
    assert code == 0, f"exit code {code}\n" + server.read_log()
    assert "Traceback" not in server.read_log()


# -- startup ----------------------------------------------------------------------------


def test_serve_refuses_bad_flags(capsys):
    assert main(["serve", "--backbone", "test-tiny", "--max-batch", "0"]) == 1
    assert "--max-batch must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "/nonexistent/x.safetensors"]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
