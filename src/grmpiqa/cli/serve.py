"""``grmpiqa serve``: the HTTP scoring service and its web page (docs/serving.md)."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from grmpiqa.cli.common import (
    CHECKPOINT_HELP,
    add_backbone_args,
    add_precision_arg,
    add_prompt_args,
    model_from_args,
    resolve_run,
    scoring_config,
)
from grmpiqa.errors import GrmpiqaError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="HTTP scoring service (POST /v1/score) and a web page at /",
        description="Serve quality scores over HTTP: POST /v1/score (multipart 'image' files "
        "or JSON base64), GET /v1/health, /v1/models, /metrics (Prometheus), and a web page "
        "at /. Requests from many clients are scored together in micro-batches. Needs "
        "pip install 'grmpiqa[serve]'.",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="CKPT",
        help=CHECKPOINT_HELP.replace("trained model: ", "model to serve: ")
        + "; repeat for several (requests pick one with ?checkpoint=NAME, NAME = file name "
        "without .safetensors; the first is the default)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free)")
    p.add_argument("--max-batch", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long a batch waits for more images (default 10)",
    )
    add_precision_arg(p)
    add_prompt_args(p)
    add_backbone_args(p)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="threads decoding uploads (default: min(4, CPUs))",
    )
    p.add_argument(
        "--max-body-mb", type=float, default=32.0, help="larger request bodies get 413 (default 32)"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=50_000_000,
        help="larger images are refused (413 when no image of the request is readable)",
    )
    p.add_argument(
        "--max-images", type=int, default=64, help="images per request at most (default 64)"
    )
    p.add_argument(
        "--max-decoded-mb",
        type=float,
        default=1024.0,
        help="decoded-pixel budget of one request: its images' width x height x channels x "
        "bytes per sample, summed from their headers before any is decoded; larger requests "
        "get 413 (default 1024)",
    )
    p.add_argument(
        "--decode-timeout-s",
        type=float,
        default=30.0,
        help="a request whose images are not decoded within this many seconds gets 503 "
        "(default 30)",
    )
    p.add_argument(
        "--body-timeout-s",
        type=float,
        default=30.0,
        help="a request body not fully received within this many seconds gets 408 and the "
        "connection is closed (default 30)",
    )
    p.add_argument(
        "--shutdown-timeout-s",
        type=float,
        default=30.0,
        help="on SIGTERM, requests in flight get their answers for up to this many seconds, "
        "then 503 (default 30)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn log level (default info)",
    )
    p.set_defaults(func=run)


def _names(paths: list[str]) -> list[str]:
    names: list[str] = []
    for p in paths:
        stem = Path(p).name
        for suffix in (".safetensors", ".pt", ".pth", ".bin"):
            if stem.endswith(suffix) and len(stem) > len(suffix):
                stem = stem[: -len(suffix)]
        base, n = stem, 2
        while stem in names:
            stem, n = f"{base}-{n}", n + 1
        names.append(stem)
    return names


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from grmpiqa.serve.app import ServeConfig, create_app
        from grmpiqa.serve.engine import ScoringEngine
    except ImportError as err:
        from grmpiqa.serve import SERVE_EXTRA_HINT

        raise GrmpiqaError(f"{SERVE_EXTRA_HINT} ({err})") from None
    if not 0 <= args.port <= 65535:
        raise GrmpiqaError(f"--port {args.port}: must be 0..65535")
    workers = args.workers if args.workers is not None else max(1, min(4, os.cpu_count() or 1))
    config = ServeConfig(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_body_mb=args.max_body_mb,
        max_pixels=args.max_pixels,
        max_images=args.max_images,
        workers=workers,
        max_decoded_mb=args.max_decoded_mb,
        decode_timeout_s=args.decode_timeout_s,
        body_timeout_s=args.body_timeout_s,
        shutdown_timeout_s=args.shutdown_timeout_s,
    )
    config.validate()
    resolve_run(args)
    engines = []
    if args.checkpoint:
        for path, name in zip(args.checkpoint, _names(args.checkpoint), strict=True):
            model = model_from_args(args, checkpoint=path)
            engines.append(
                ScoringEngine(model, name, args.precision, checkpoint=model.checkpoint_file)
            )
    else:
        model = model_from_args(args, config=scoring_config(args, False))
        engines.append(ScoringEngine(model, model.backbone_name, args.precision))
    for e in engines:
        scale = f", scale {e.scale.label.describe()}" if e.scale is not None else ""
        print(f"grmpiqa: model {e.name!r}: {e.model.describe()}{scale}", file=sys.stderr)
    app = create_app(engines, config)
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        timeout_graceful_shutdown=max(1, math.ceil(config.shutdown_timeout_s)),
    )
    service = app.service

    class DrainingServer(uvicorn.Server):  # type: ignore[misc]
        """uvicorn's server, telling the service when SIGTERM/SIGINT starts the drain."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            service.begin_drain(config.shutdown_timeout_s)
            super().handle_exit(sig, frame)

    server = DrainingServer(uv_config)
    stopped_by: list[int] = []
    # uvicorn shuts down gracefully on SIGTERM (in-flight requests finish), then re-raises
    # the signal to the handler installed before it: record it and exit 0, not -15.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped_by.append(signum))
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped_by:
        n = service.drained
        print(
            f"grmpiqa: stopped (SIGTERM): {n['answered']} request(s) in flight answered, "
            f"{n['refused']} answered 503 (not finished within --shutdown-timeout-s "
            f"{config.shutdown_timeout_s:g})",
            file=sys.stderr,
        )
    return 0
