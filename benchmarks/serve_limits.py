"""What one costly or stalled client does to ``grmpiqa serve`` (issue 18's limits).

Starts ``grmpiqa serve`` as a subprocess on a free 127.0.0.1 port and measures:

1. fairness: the latency of a small request (one 512x384 JPEG) alone, and sent 0.5 s
   after a big request of ``--big`` zero-filled 49-megapixel 16-bit PNGs (under the
   per-request budget) started decoding; and the big request's own latency;
2. the per-request budget: a request of 16 such PNGs (1.5 GB decoded, 1.5 MB sent):
   its status and how long the answer took;
3. stalled bodies: ``--stalled`` connections that send headers and 10 bytes of a
   100 kB body, then nothing; how many the service still holds open after
   ``--body-timeout-s`` + 3 s, and the small request's latency meanwhile;
4. the service's peak resident memory (VmHWM).

``--legacy`` leaves out the flags older builds lack, to measure them the same way
(``PYTHONPATH=/path/to/old/src python benchmarks/serve_limits.py --legacy``).
Bounded: a fixed number of requests and sockets, everything on 127.0.0.1; the server
is stopped at the end. The last stdout line is one JSON object.

Usage:
    python benchmarks/serve_limits.py
    python benchmarks/serve_limits.py --big 8 --stalled 300 --body-timeout-s 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png16(megapixels: float) -> bytes:
    side = int((megapixels * 1e6) ** 0.5)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint16)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def small_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (384, 512, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "grmpiqa-bench-boundary"
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post(port: int, files: list[tuple[str, bytes]], timeout: float = 300) -> tuple[int, float]:
    """(status, seconds) of one POST /v1/score over a raw socket (no client library)."""
    body, ctype = multipart(files)
    head = (
        f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else -1
    return status, time.perf_counter() - t0


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="test-tiny")
    ap.add_argument("--pretrained", default="random")
    ap.add_argument("--workers", type=int, default=2, help="decode threads (default 2)")
    ap.add_argument("--big", type=int, default=8, help="49-MP PNGs in the big request")
    ap.add_argument("--stalled", type=int, default=300, help="stalled connections")
    ap.add_argument("--body-timeout-s", type=float, default=5.0)
    ap.add_argument("--legacy", action="store_true", help="no flags older builds lack")
    args = ap.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "grmpiqa", "serve", "--port", str(port), "--backbone",
           args.backbone, "--pretrained", args.pretrained, "--workers", str(args.workers),
           "--max-pixels", "60000000", "--log-level", "warning"]  # fmt: skip
    if not args.legacy:
        cmd += ["--body-timeout-s", str(args.body_timeout_s)]
    log = tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False)  # noqa: SIM115
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print(Path(log.name).read_text(errors="replace")[-2000:], file=sys.stderr)
                    return 1
                time.sleep(0.2)
        small = [("small.jpg", small_jpeg())]
        big_png = png16(49)
        big = [(f"big{i}.png", big_png) for i in range(args.big)]
        post(port, small)  # warm up
        alone = sorted(post(port, small)[1] for _ in range(5))[2]

        res: dict[str, tuple[int, float]] = {}

        def send_big() -> None:
            res["big"] = post(port, big)

        t = threading.Thread(target=send_big)
        t.start()
        time.sleep(0.5)
        res["small"] = post(port, small)
        t.join()

        over = post(port, [(f"b{i}.png", big_png) for i in range(16)])

        socks = []
        body_head = (
            b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        for _ in range(args.stalled):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(body_head + b'{"images":')
            socks.append(s)
        t_stall = time.monotonic()
        during = post(port, small)
        wait = args.body_timeout_s + 3.0
        time.sleep(max(0.0, wait - (time.monotonic() - t_stall)))
        still_open = 0
        answered_408 = 0
        for s in socks:
            s.setblocking(False)
            try:
                data = s.recv(4096)
                if data.startswith(b"HTTP/1.1 408"):
                    answered_408 += 1
            except BlockingIOError:
                still_open += 1  # nothing sent, not closed
            except OSError:
                pass
            s.close()
        peak = vm_hwm_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        os.unlink(log.name)

    result = {
        "backbone": args.backbone,
        "legacy_flags": args.legacy,
        "workers": args.workers,
        "big_images": args.big,
        "small_alone_s": round(alone, 3),
        "small_behind_big_s": round(res["small"][1], 3),
        "small_behind_big_status": res["small"][0],
        "big_s": round(res["big"][1], 3),
        "big_status": res["big"][0],
        "small_wait_ratio_to_big": round(res["small"][1] / res["big"][1], 3),
        "over_budget_status": over[0],
        "over_budget_s": round(over[1], 3),
        "stalled": args.stalled,
        "stalled_open_after_s": wait,
        "stalled_still_open": still_open,
        "stalled_answered_408": answered_408,
        "small_during_stall_s": round(during[1], 3),
        "small_during_stall_status": during[0],
        "server_peak_rss_mb": round(peak, 1),
        "cpus": os.cpu_count(),
        "load_avg": round(os.getloadavg()[0], 2),
    }
    for k, v in result.items():
        print(f"{k:28s} {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
