"""Prometheus metrics of admission and the engines (`ModelMetrics`, their `EngineObserver`),
in vLLM's registry, with vLLM's two load gauges. Only `image_metrics()` needs vLLM."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vllm_omni_images.engine.base import EngineObserver

SECONDS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


@dataclass(frozen=True)
class ImageMetrics:
    """The metric families; one set per process, labelled per served model."""

    requests_running: Gauge
    requests_waiting: Gauge
    queue_images: Gauge
    running_images: Gauge
    queue_wait: Histogram
    engine_time: Histogram
    batch_size: Histogram
    step_time: Histogram
    batch_splits: Counter
    batch_isolations: Counter
    engine_hung: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ImageMetrics:
        model = ["model_name"]
        per_engine = ["model_name", "engine"]  # vLLM's labels for its scheduler gauges
        return cls(
            requests_running=Gauge(
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                per_engine,
                registry=registry,
                multiprocess_mode="mostrecent",
            ),
            requests_waiting=Gauge(
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                per_engine,
                registry=registry,
                multiprocess_mode="mostrecent",
            ),
            queue_images=Gauge(
                "vllm:image_queue_images",
                "Images waiting for the engine.",
                model,
                registry=registry,
                multiprocess_mode="mostrecent",
            ),
            running_images=Gauge(
                "vllm:image_running_images",
                "Images of unanswered requests that the engine started.",
                model,
                registry=registry,
                multiprocess_mode="mostrecent",
            ),
            queue_wait=Histogram(
                "vllm:image_queue_wait_seconds",
                "Time a request waited before its batch started.",
                model,
                registry=registry,
                buckets=SECONDS_BUCKETS,
            ),
            engine_time=Histogram(
                "vllm:image_engine_seconds",
                "Time of one pipeline call (a batch).",
                model,
                registry=registry,
                buckets=SECONDS_BUCKETS,
            ),
            batch_size=Histogram(
                "vllm:image_batch_size",
                "Images per pipeline call.",
                model,
                registry=registry,
                buckets=_BATCH_BUCKETS,
            ),
            step_time=Histogram(
                "vllm:image_denoise_step_seconds",
                "Time of one denoising step of a batch.",
                model,
                registry=registry,
                buckets=_STEP_BUCKETS,
            ),
            batch_splits=Counter(
                "vllm:image_batch_splits",
                "Engine calls that ran out of device memory and were retried as two halves.",
                model,
                registry=registry,
            ),
            batch_isolations=Counter(
                "vllm:image_batch_isolations",
                "Engine calls of several requests that failed (not out of memory) and were "
                "retried one request at a time.",
                model,
                registry=registry,
            ),
            engine_hung=Gauge(
                "vllm:image_engine_hung",
                "1 while the engine is taken as hung (a call did not stop when asked), else 0.",
                model,
                registry=registry,
                multiprocess_mode="mostrecent",
            ),
        )


@functools.cache
def image_metrics() -> ImageMetrics:
    """The process's metrics, registered once in vLLM's registry."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    return ImageMetrics.create(get_prometheus_registry())


class ModelMetrics(EngineObserver):
    """The engine metrics of one served model: admission and the engines report into it."""

    ENGINE_INDEX = "0"
    """vLLM's `engine` label: the index of the engine core behind the server (one here)."""

    def __init__(self, metrics: ImageMetrics, model_name: str) -> None:
        engine = {"model_name": model_name, "engine": self.ENGINE_INDEX}
        self._requests_running = metrics.requests_running.labels(**engine)
        self._requests_waiting = metrics.requests_waiting.labels(**engine)
        self._requests_running.set(0)
        self._requests_waiting.set(0)
        self._queue_images = metrics.queue_images.labels(model_name=model_name)
        self._running_images = metrics.running_images.labels(model_name=model_name)
        self._queue_wait = metrics.queue_wait.labels(model_name=model_name)
        self._engine_time = metrics.engine_time.labels(model_name=model_name)
        self._batch_size = metrics.batch_size.labels(model_name=model_name)
        self._step_time = metrics.step_time.labels(model_name=model_name)
        self._batch_splits = metrics.batch_splits.labels(model_name=model_name)
        self._batch_isolations = metrics.batch_isolations.labels(model_name=model_name)
        self._engine_hung = metrics.engine_hung.labels(model_name=model_name)
        self._engine_hung.set(0)

    def on_queue_depth(self, images: int) -> None:
        self._queue_images.set(images)

    def on_running_images(self, images: int) -> None:
        self._running_images.set(images)

    def on_requests(self, waiting: int, running: int) -> None:
        self._requests_waiting.set(waiting)
        self._requests_running.set(running)

    def on_queue_wait(self, wait_s: float) -> None:
        self._queue_wait.observe(wait_s)

    def on_batch_start(self, images: int) -> None:
        self._batch_size.observe(images)

    def on_step(self, step_s: float) -> None:
        self._step_time.observe(step_s)

    def on_batch_end(self, engine_s: float) -> None:
        self._engine_time.observe(engine_s)

    def on_batch_split(self, images: int) -> None:
        self._batch_splits.inc()

    def on_batch_isolated(self, requests: int) -> None:
        self._batch_isolations.inc()

    def on_engine_hung(self, hung: bool) -> None:
        self._engine_hung.set(1 if hung else 0)
