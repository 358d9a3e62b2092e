"""The server's Prometheus metrics, at GET /metrics. With several worker processes, prometheus-client's
multiprocess mode (the PROMETHEUS_MULTIPROC_DIR that `fmnist serve --workers` sets) adds up all of them on every
scrape."""

import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

REQUEST_SECONDS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
BATCH_IMAGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
QUEUE_SECONDS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1)


class Metrics:
    """Requests by route and status with their latency (each transport tells it), and what each onnxruntime
    run took (the batcher tells it)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()   # one per app: tests make many apps in one process
        self.requests = Counter("fmnist_requests", "HTTP requests by route and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("fmnist_request_seconds", "Time from request to response, by route.", ["endpoint"],
                                 registry=self.registry, buckets=REQUEST_SECONDS)
        self.images = Counter("fmnist_images", "Images classified.", registry=self.registry)
        self.batch = Histogram("fmnist_batch_images", "Images in each onnxruntime run.", registry=self.registry,
                               buckets=BATCH_IMAGES)
        self.queue = Histogram("fmnist_queue_seconds", "Time a request waited for its onnxruntime run.",
                               registry=self.registry, buckets=QUEUE_SECONDS)
        # Each (route, status)'s counter and histogram, looked up once: labels() checks and locks on every call,
        # a sizeable part of a single image's Python (routes and statuses are few, so this stays small).
        self._children: dict[tuple[str, int | str], tuple[Any, Any]] = {}

    def observe_request(self, endpoint: str, status: int | str, seconds: float) -> None:
        children = self._children.get((endpoint, status))
        if children is None:
            children = self._children[endpoint, status] = (self.requests.labels(endpoint, str(status)),
                                                            self.latency.labels(endpoint))
        children[0].inc()
        children[1].observe(seconds)

    def observe_run(self, size: int, waits: list[float]) -> None:
        self.images.inc(size)
        self.batch.observe(size)
        for wait in waits:
            self.queue.observe(wait)

    def exposition(self) -> tuple[bytes, str]:
        """The body of GET /metrics and its content type."""
        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
