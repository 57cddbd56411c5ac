"""The FastAPI application of ``grmpiqa serve``.

Endpoints: ``POST /v1/score``, ``GET /v1/health``, ``GET /v1/models``, ``GET /metrics``
(Prometheus text format) and the web page at ``/`` (static files shipped in the
package, no CDN). Every response carries ``X-Grmpiqa-Random-Weights`` and every JSON
answer about scores carries the model card, so a random backbone is always announced.

What one request may cost is bounded (docs/reliability.md, "Limits"): its body
(``--max-body-mb``) must arrive within ``--body-timeout-s``; the decoded size of its
images (width x height x channels x bytes per sample, read from the headers before any
pixel is decoded) must fit ``--max-decoded-mb`` (413 otherwise); its decoding must end
within ``--decode-timeout-s`` (503 otherwise). Decoding and batching serve requests in
turn (:mod:`grmpiqa.serve.fair`), so a small request does not wait behind a huge one.
On SIGTERM (:meth:`Service.begin_drain`) requests in flight get their real answers
until the grace period ends, then 503. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from grmpiqa._version import __version__
from grmpiqa.errors import ImageError
from grmpiqa.images import probe_image
from grmpiqa.log import get_logger
from grmpiqa.scale import SCALES
from grmpiqa.serve.batcher import BatcherClosed, MicroBatcher, Scored
from grmpiqa.serve.engine import ScoringEngine
from grmpiqa.serve.fair import FairDecodePool
from grmpiqa.serve.metrics import CONTENT_TYPE_LATEST, ServiceMetrics
from grmpiqa.serve.uploads import (
    RequestError,
    Upload,
    decode,
    read_uploads,
    reason_of,
    status_when_none_readable,
)

log = get_logger("serve")
STATIC_DIR = Path(__file__).parent / "static"
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_ENDPOINTS = ("/", "/v1/score", "/v1/health", "/v1/models", "/metrics")
#: how long stopping waits for the decode threads to end (idle ones end at once)
_POOL_JOIN_S = 5.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class ServeConfig:
    """Limits and batching of the service (``grmpiqa serve`` flags).

    Attributes:
        max_batch: images per forward pass at most.
        max_wait_ms: how long the first image of a batch waits for company.
        max_body_mb: larger request bodies get 413.
        max_pixels: larger images get a per-image error (413 when none is readable).
        max_images: images per request at most (413 beyond).
        workers: threads decoding and preprocessing uploads.
        max_decoded_mb: decoded size of a request's images together (width x height x
            channels x bytes per sample, from their headers); larger requests get 413.
        decode_timeout_s: a request whose images are not decoded by then gets 503.
        body_timeout_s: a request body not received by then gets 408.
        shutdown_timeout_s: on SIGTERM, requests in flight get their answers until then
            (a little before it: 503).
    """

    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_body_mb: float = 32.0
    max_pixels: int = 50_000_000
    max_images: int = 64
    workers: int = max(1, min(4, os.cpu_count() or 1))
    max_decoded_mb: float = 1024.0
    decode_timeout_s: float = 30.0
    body_timeout_s: float = 30.0
    shutdown_timeout_s: float = 30.0

    @property
    def max_decoded_bytes(self) -> int:
        return int(self.max_decoded_mb * 2**20)

    def validate(self) -> None:
        from grmpiqa.errors import GrmpiqaError

        for name in ("max_batch", "max_images", "workers", "max_pixels"):
            if getattr(self, name) < 1:
                raise GrmpiqaError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_wait_ms < 0:
            raise GrmpiqaError("--max-wait-ms must be >= 0")
        for name in (
            "max_body_mb",
            "max_decoded_mb",
            "decode_timeout_s",
            "body_timeout_s",
            "shutdown_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise GrmpiqaError(f"--{name.replace('_', '-')} must be > 0")


class Service:
    """What the endpoints share: engines, their batchers, metrics, the decode pool."""

    def __init__(self, engines: Sequence[ScoringEngine], config: ServeConfig) -> None:
        if not engines:
            raise ValueError("the service needs at least one model")
        names = [e.name for e in engines]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must differ: {names}")
        self.engines = {e.name: e for e in engines}
        self.default = engines[0].name
        self.config = config
        self.metrics = ServiceMetrics()
        self.batchers: dict[str, MicroBatcher] = {}
        self.pool: FairDecodePool | None = None
        self.probe_pool: ThreadPoolExecutor | None = None
        self.started = time.time()
        self.stopping = False
        #: monotonic time after which requests still in flight get 503 (set on SIGTERM)
        self.drain_deadline: float | None = None
        #: requests answered, and refused with 503, after the drain began
        self.drained = {"answered": 0, "refused": 0}
        for e in engines:
            self.metrics.model_info.labels(
                e.name, e.model.backbone_name, str(e.random_weights).lower()
            ).set(1)

    @property
    def random_weights(self) -> bool:
        return any(e.random_weights for e in self.engines.values())

    def start(self) -> None:
        self.pool = FairDecodePool(self.config.workers)
        self.probe_pool = ThreadPoolExecutor(
            self.config.workers, thread_name_prefix="grmpiqa-probe"
        )
        for name, e in self.engines.items():
            self.batchers[name] = MicroBatcher(
                e, self.config.max_batch, self.config.max_wait_ms, self.metrics.on_batch
            )

    def begin_drain(self, grace_s: float | None = None) -> None:
        """SIGTERM: take no new requests; those in flight have until a little before the
        grace period ends (uvicorn then cancels what is left) to get their answers, then
        they get 503."""
        if self.drain_deadline is not None:
            return
        grace = self.config.shutdown_timeout_s if grace_s is None else grace_s
        self.stopping = True
        self.drain_deadline = time.monotonic() + max(0.2, grace - min(2.0, grace / 4))

    def stop(self) -> None:
        self.stopping = True
        for b in self.batchers.values():
            b.close()
        if self.pool is not None:
            # idle workers end at once: join them, so that none is still ending (its
            # thread-local torch state released) while the interpreter finalizes, which
            # can abort the process ("terminate called without an active exception");
            # a decode still running after the drain is left behind (daemon threads)
            self.pool.shutdown(wait=True, timeout=_POOL_JOIN_S)
        if self.probe_pool is not None:
            self.probe_pool.shutdown(wait=False, cancel_futures=True)

    async def wait(self, futures: Sequence[Any], deadline: float | None) -> str | None:
        """Wait for concurrent ``futures``; None when all are done, ``"timeout"`` when
        ``deadline`` (monotonic) passes first, ``"shutdown"`` when the drain's does."""
        pending = {asyncio.wrap_future(f) for f in futures}
        while pending:
            now = time.monotonic()
            if self.drain_deadline is not None and now >= self.drain_deadline:
                return "shutdown"
            if deadline is not None and now >= deadline:
                return "timeout"
            limits = [d for d in (deadline, self.drain_deadline) if d is not None]
            step = min([0.25] + [d - now for d in limits])
            _, pending = await asyncio.wait(pending, timeout=max(step, 0.001))
        return None

    def queue_depth(self) -> int:
        n = 0
        for name, b in self.batchers.items():
            self.metrics.queue.labels(name).set(b.pending)
            n += b.pending
        return n


def _prepare(
    engine: ScoringEngine, up: Upload, max_pixels: int, max_bytes: int | None = None
) -> tuple[Any, str | None, str]:
    """Decode + eval transform of one upload: ``(tensor, None, "")`` or
    ``(None, error, reason)``."""
    if up.error is not None:
        return None, up.error, up.reason or "bad_data"
    try:
        img = decode(up, max_pixels, engine.model.preprocess.decode_min_side, max_bytes)
        with torch.inference_mode():
            return engine.preprocess(img), None, ""
    except ImageError as err:
        return None, str(err), reason_of(err)


def decoded_costs(uploads: Sequence[Upload], max_pixels: int, min_side: int | None) -> list[int]:
    """What decoding each image of a request costs in bytes, from its header alone
    (:func:`grmpiqa.images.probe_image`); unreadable ones count 0 (decoding says why)."""
    costs = []
    for up in uploads:
        cost = 0
        if up.data:
            try:
                cost = probe_image(up.data, up.name, max_pixels, min_side=min_side).decoded_bytes
            except ImageError:
                pass
        costs.append(cost)
    return costs


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**20:.2f} MB"


def _parse_bool(value: str, key: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise RequestError(400, f"query option {key}={value!r}: use true or false")


def create_app(engines: Sequence[ScoringEngine], config: ServeConfig | None = None) -> Any:
    """The ASGI app: FastAPI routes inside a guard that limits bodies, counts requests,
    times them and announces random weights on every response."""
    config = config or ServeConfig()
    config.validate()
    service = Service(engines, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        log.info("ready: %s", ", ".join(e.card()["description"] for e in engines))
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="grmpiqa",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service

    def error(status: int, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message, model=service.engines[service.default].card())

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": _CSP})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def shutting_down(card: dict[str, Any]) -> JSONResponse:
        service.drained["refused"] += 1
        return error(
            503,
            "the service is shutting down (SIGTERM) and could not finish this request in "
            f"its grace period (--shutdown-timeout-s {config.shutdown_timeout_s:g}); retry it",
            model=card,
        )

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "stopping" if service.stopping else "ok",
            "models": list(service.engines),
            "default": service.default,
            "random_weights": service.random_weights,
            "queue": service.queue_depth(),
            "uptime_s": round(time.time() - service.started, 3),
            "version": __version__,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "default": service.default,
            "random_weights": service.random_weights,
            "models": [e.card() for e in service.engines.values()],
            "limits": {
                "max_batch": config.max_batch,
                "max_wait_ms": config.max_wait_ms,
                "max_body_mb": config.max_body_mb,
                "max_pixels": config.max_pixels,
                "max_images": config.max_images,
                "max_decoded_mb": config.max_decoded_mb,
                "decode_timeout_s": config.decode_timeout_s,
                "body_timeout_s": config.body_timeout_s,
            },
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        service.queue_depth()
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/score")
    async def score(request: Request) -> JSONResponse:
        draining = service.stopping
        response = await _score(request)
        if draining or service.stopping:
            if response.status_code != 503:
                service.drained["answered"] += 1
        return response

    async def _score(request: Request) -> JSONResponse:
        # During a drain a request already received is still served if it can finish in
        # time (uvicorn accepts no new connections and closes idle ones).
        q = request.query_params
        scale = q.get("scale", "prob").strip().lower()
        if scale not in SCALES:
            raise RequestError(400, f"query option scale={scale!r}: use one of {', '.join(SCALES)}")
        want_map = _parse_bool(q.get("map", "false"), "map")
        name = q.get("checkpoint") or service.default
        engine = service.engines.get(name)
        if engine is None:
            return error(
                404,
                f"unknown checkpoint {name!r}; loaded: {', '.join(service.engines)}",
                model=service.engines[service.default].card(),
            )
        card = engine.card()
        if scale == "mos" and engine.scale is None:
            return error(
                400,
                f"checkpoint {name!r} has no MOS scale recorded (only checkpoints written by "
                "`grmpiqa finetune` carry one); use scale=prob",
                model=card,
            )
        t0 = time.monotonic()
        uploads = await read_uploads(request, config.max_images)
        loop = asyncio.get_running_loop()
        min_side = engine.model.preprocess.decode_min_side
        budget = config.max_decoded_bytes
        costs = await loop.run_in_executor(
            service.probe_pool, decoded_costs, uploads, config.max_pixels, min_side
        )
        cost = sum(costs)
        if cost > budget:
            service.metrics.image_errors.labels("over_budget").inc(len(uploads))
            return error(
                413,
                f"the {len(uploads)} image(s) of this request would decode to {_mb(cost)} "
                "(width x height x channels x bytes per sample, from their headers), over "
                f"the per-request budget of {_mb(budget)} (--max-decoded-mb); send fewer "
                "or smaller images per request",
                model=card,
            )
        assert service.pool is not None
        key = object()  # this request, for fair turns and cancelling
        jobs = [
            functools.partial(_prepare, engine, up, config.max_pixels, budget) for up in uploads
        ]
        decoding = service.pool.submit(key, jobs, costs)
        stopped = await service.wait(decoding, t0 + config.decode_timeout_s)
        if stopped is not None:
            service.pool.cancel(key)
            if stopped == "shutdown":
                return shutting_down(card)
            service.metrics.image_errors.labels("timeout").inc(len(uploads))
            return error(
                503,
                f"decoding the images of this request took longer than "
                f"{config.decode_timeout_s:g} s (--decode-timeout-s); it was stopped",
                model=card,
            )
        prepared = [f.result() for f in decoding]
        ok = [i for i, (t, _, _) in enumerate(prepared) if t is not None]
        scored: list[Scored | BaseException] = []
        if ok:
            batcher = service.batchers[name]
            try:
                futures = batcher.submit([prepared[i][0] for i in ok], want_map=want_map, key=key)
            except BatcherClosed:
                return shutting_down(card)
            if await service.wait(futures, None) is not None:
                batcher.cancel(key)
                return shutting_down(card)
            scored = [
                f.exception() if f.exception() is not None else f.result()  # type: ignore[misc]
                for f in futures
            ]
        by_index = dict(zip(ok, scored, strict=True))
        results: list[dict[str, Any]] = []
        reasons: list[str] = []
        n_ok = 0
        for i, (up, (_, message, reason)) in enumerate(zip(uploads, prepared, strict=True)):
            row: dict[str, Any] = {"name": up.name, "score": None}
            if scale == "mos":
                row["mos"] = None
            res = by_index.get(i)
            if isinstance(res, Scored):
                n_ok += 1
                row["score"] = res.score
                if scale == "mos":
                    row["mos"] = engine.to_mos([res.score])[0]
                row["error"] = None
                if want_map:
                    row["map"] = res.map.to_dict() if res.map is not None else None
            else:
                if isinstance(res, BaseException):
                    message, reason = f"{up.name}: scoring failed ({res})", "internal"
                row["error"] = message
                reasons.append(reason)
                service.metrics.image_errors.labels(reason).inc()
            results.append(row)
        service.metrics.images.labels(name, "scored").inc(n_ok)
        service.metrics.images.labels(name, "error").inc(len(uploads) - n_ok)
        body = {"model": card, "results": results}
        if n_ok == 0:
            status = status_when_none_readable(reasons)
            if "internal" in reasons:
                status = 500
            return JSONResponse(
                {"error": "no image in the request could be scored", **body}, status_code=status
            )
        return JSONResponse(body)

    return _Guard(app, service)


class _Guard:
    """Pure ASGI wrapper: body-size limit (413), body-read timeout (408), request metrics,
    random-weights header."""

    def __init__(self, app: FastAPI, service: Service) -> None:
        self.app = app
        self.service = service
        self.max_bytes = int(service.config.max_body_mb * 1024 * 1024)
        self.body_timeout = float(service.config.body_timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = (
            path if path in _ENDPOINTS else ("/static" if path.startswith("/static/") else "other")
        )
        t0 = time.perf_counter()
        status = {"code": 500}
        flag = b"true" if self.service.random_weights else b"false"

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((b"x-grmpiqa-random-weights", flag))
                message["headers"] = headers
            await send(message)

        try:
            try:
                body_receive = await self._limited_body(scope, receive)
            except TimeoutError:
                await _send_json(
                    send_wrapped,
                    408,
                    {
                        "error": "the request body did not arrive within "
                        f"{self.body_timeout:g} s (--body-timeout-s)"
                    },
                )
                return
            if body_receive is None:
                await _send_json(
                    send_wrapped,
                    413,
                    {
                        "error": f"request body larger than {self.service.config.max_body_mb:g} MB "
                        "(--max-body-mb)"
                    },
                )
                return
            await self.app(scope, body_receive, send_wrapped)
        finally:
            m = self.service.metrics
            m.requests.labels(endpoint, str(status["code"])).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - t0)

    async def _limited_body(self, scope: Scope, receive: Receive) -> Receive | None:
        """Read the whole body (at most ``max_bytes``, within ``body_timeout`` seconds)
        and replay it; None when too large, ``TimeoutError`` when too slow."""
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return receive
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > self.max_bytes:
                        return None
                except ValueError:
                    pass
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.body_timeout
        while True:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


async def _send_json(send: Send, status: int, doc: dict[str, Any]) -> None:
    import json

    data = json.dumps(doc).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": data})
