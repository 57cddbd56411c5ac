"""Load benchmark of ``grmpiqa serve`` against offline scoring on the same images.

Starts ``grmpiqa serve`` as a subprocess on a free 127.0.0.1 port, sends a bounded load
(default 8 clients x 25 requests, 1-4 images each, multipart) and reports throughput,
p50/p95/p99 request latency, images lost (sent but not scored; must be 0), the largest
|service - offline| score difference, and the ratio of the service's throughput to
offline ``grmpiqa score`` throughput (its engine, ``grmpiqa.scoring.iter_scores`` with
the CLI's batch size and worker default, timed without process start and model load)
on the same images in the same run, and images per CPU-second of both (robust to a
busy machine). The offline figure is measured before and after the service phase and
averaged.

Usage:
    python benchmarks/serve_load.py --backbone test-tiny
    python benchmarks/serve_load.py --backbone ViT-B-16-quickgelu --pretrained random
    python benchmarks/serve_load.py --images ../shared/data/clive-dev/ChallengeDB_release/Images

All traffic goes to 127.0.0.1 only. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import grmpiqa
from grmpiqa.images import is_image_file
from grmpiqa.scoring import iter_scores


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_images(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` smooth random JPEGs of 512x384 (about 30 KB each)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:384, 0:512]
        f = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(xx * f[c] + yy * f[(c + 1) % 3]) for c in range(3)], -1)
        arr = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        p = folder / f"load{i:03d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        out.append(p)
    return out


def plan(n_clients: int, n_requests: int, lo: int, hi: int, pool: int, seed: int):
    rng = np.random.default_rng(seed)
    return [
        [
            [int(j) for j in rng.integers(0, pool, int(rng.integers(lo, hi + 1)))]
            for _ in range(n_requests)
        ]
        for _ in range(n_clients)
    ]


def cpu_self_and_children() -> float:
    """CPU seconds (user + system) of this process and its reaped children."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def offline(
    model: grmpiqa.QualityModel, paths: list[Path], batch: int, workers: int, precision: str
):
    """images/s, images per CPU-second (DataLoader workers included), scores."""
    c0, t0 = cpu_self_and_children(), time.perf_counter()
    scores = np.full(len(paths), np.nan)
    for b in iter_scores(model, paths, batch, num_workers=workers, precision=precision):
        scores[b.indices] = b.scores.numpy()
    wall, cpu = time.perf_counter() - t0, cpu_self_and_children() - c0
    return len(paths) / wall, len(paths) / cpu, scores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="test-tiny")
    ap.add_argument("--pretrained", default="random")
    ap.add_argument("--images", default=None, help="folder of images (default: 32 generated)")
    ap.add_argument("--pool", type=int, default=32, help="distinct images used")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="requests per client")
    ap.add_argument("--min-images", type=int, default=1)
    ap.add_argument("--max-images", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--batch-size", type=int, default=32, help="offline batch size")
    ap.add_argument(
        "--offline-images",
        type=int,
        default=None,
        help="time offline scoring on the first N images of the same list (default: all; "
        "offline is a rate, so a prefix measures it at lower cost for big backbones)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--precision", default="fp32", help="of the service and offline alike (default fp32)"
    )
    args = ap.parse_args()

    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="grmpiqa-load-"))
    if args.images:
        found = sorted(p for p in Path(args.images).iterdir() if is_image_file(p))
        pool = found[: args.pool]
    else:
        pool = make_images(tmp, args.pool, args.seed)
    payload = [p.read_bytes() for p in pool]
    requests = plan(
        args.clients, args.requests, args.min_images, args.max_images, len(pool), args.seed
    )
    flat = [pool[j] for client in requests for req in client for j in req]
    n_images = len(flat)
    workers = max(0, min(4, (os.cpu_count() or 1) - 1))  # grmpiqa score's default

    pretrained = None if args.pretrained.lower() in ("random", "none") else args.pretrained
    model = grmpiqa.create_model(args.backbone, pretrained=pretrained)
    n_off = min(n_images, args.offline_images or n_images)
    off1, off1_cpu, off_scores = offline(
        model, flat[:n_off], args.batch_size, workers, args.precision
    )
    print(f"offline (before): {off1:.2f} img/s on {n_off} images", file=sys.stderr)
    del model

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "wb")  # noqa: SIM115
    cmd = [sys.executable, "-m", "grmpiqa", "serve", "--backbone", args.backbone, "--port",
           str(port), "--pretrained", args.pretrained, "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning",
           "--precision", args.precision]  # fmt: skip
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{(tmp / 'server.log').read_text()}")
            time.sleep(0.1)
        startup_s = time.perf_counter() - t_start

        latencies: list[float] = []
        scored: dict[tuple[int, int, int], float] = {}
        failures: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(args.clients + 1)

        def client(c: int) -> None:
            with httpx.Client(base_url=url, timeout=300) as http:
                barrier.wait()
                for r, req in enumerate(requests[c]):
                    files = [
                        ("image", (pool[j].name, io.BytesIO(payload[j]), "image/jpeg")) for j in req
                    ]
                    t0 = time.perf_counter()
                    try:
                        resp = http.post("/v1/score", files=files)
                        res = resp.json()["results"]
                    except Exception as err:  # noqa: BLE001 - counted as lost images
                        with lock:
                            failures.append(f"client {c} request {r}: {err}")
                        continue
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt)
                        for k, x in enumerate(res):
                            if x.get("score") is not None:
                                scored[(c, r, k)] = float(x["score"])

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        server_cpu0, client_cpu0 = cpu_of(proc.pid), time.process_time()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        server_cpu = cpu_of(proc.pid) - server_cpu0
        client_cpu = time.process_time() - client_cpu0
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    torch.manual_seed(0)
    model = grmpiqa.create_model(args.backbone, pretrained=pretrained)
    off2, off2_cpu, _ = offline(model, flat[:n_off], args.batch_size, workers, args.precision)
    print(f"offline (after): {off2:.2f} img/s", file=sys.stderr)

    service_tput = len(scored) / wall
    offline_tput = (off1 + off2) / 2
    lost = n_images - len(scored)
    i = 0
    diffs = []
    for c, client_reqs in enumerate(requests):
        for r, req in enumerate(client_reqs):
            for k in range(len(req)):
                if (c, r, k) in scored and i < n_off:
                    diffs.append(abs(scored[(c, r, k)] - off_scores[i]))
                i += 1
    lat = np.array(latencies) * 1000
    bs_count = bs_sum = float("nan")
    for line in metrics.splitlines():
        if line.startswith("grmpiqa_batch_size_count"):
            bs_count = float(line.split()[-1])
        elif line.startswith("grmpiqa_batch_size_sum"):
            bs_sum = float(line.split()[-1])
    result = {
        "backbone": args.backbone,
        "pretrained": args.pretrained,
        "clients": args.clients,
        "requests": args.clients * args.requests,
        "images": n_images,
        "images_lost": lost,
        "offline_images": n_off,
        "failed_requests": len(failures),
        "service_img_per_s": round(service_tput, 2),
        "offline_img_per_s": round(offline_tput, 2),
        "offline_before_img_per_s": round(off1, 2),
        "offline_after_img_per_s": round(off2, 2),
        "ratio_service_to_offline": round(service_tput / offline_tput, 3),
        "service_img_per_cpu_s": round(len(scored) / server_cpu, 2),
        "service_and_clients_img_per_cpu_s": round(len(scored) / (server_cpu + client_cpu), 2),
        "offline_img_per_cpu_s": round((off1_cpu + off2_cpu) / 2, 2),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1),
        "latency_ms_p95": round(float(np.percentile(lat, 95)), 1),
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 1),
        "mean_batch": round(bs_sum / bs_count, 2) if bs_count else None,
        "max_abs_score_diff": float(max(diffs)) if diffs else None,
        "startup_s": round(startup_s, 1),
        "wall_s": round(wall, 1),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg()[0],
    }
    print(f"{'backbone':28s} {args.backbone} ({args.pretrained})")
    for k in (
        "requests", "images", "images_lost", "service_img_per_s", "offline_img_per_s",
        "ratio_service_to_offline", "service_img_per_cpu_s",
        "service_and_clients_img_per_cpu_s", "offline_img_per_cpu_s", "latency_ms_p50",
        "latency_ms_p95", "latency_ms_p99",
        "mean_batch", "max_abs_score_diff", "startup_s", "wall_s",
    ):  # fmt: skip
        print(f"{k:28s} {result[k]}")
    for f in failures[:5]:
        print("failure:", f)
    print(json.dumps(result))
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
