"""Prometheus metrics of the service (``GET /metrics``, text exposition format).

Each app has its own registry, so several apps in one process (tests) do not mix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """Requests, images, errors, batch sizes, latency."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "grmpiqa_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "grmpiqa_request_latency_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "grmpiqa_images",
            "images received by /v1/score, by checkpoint and outcome",
            ["checkpoint", "outcome"],
            registry=r,
        )
        self.image_errors = Counter(
            "grmpiqa_image_errors",
            "images that could not be scored, by reason",
            ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "grmpiqa_batch_size",
            "images per model forward pass",
            ["checkpoint"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "grmpiqa_batch_seconds",
            "time of one batched forward pass",
            ["checkpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Gauge(
            "grmpiqa_queue_images", "images waiting for a batch", ["checkpoint"], registry=r
        )
        self.model_info = Gauge(
            "grmpiqa_model_info",
            "loaded models (value 1)",
            ["checkpoint", "backbone", "random_weights"],
            registry=r,
        )

    def on_batch(self, checkpoint: str, size: int, seconds: float) -> None:
        self.batch_size.labels(checkpoint).observe(size)
        self.batch_seconds.labels(checkpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
