"""What each answered Images API request counts in vLLM's registry (`/metrics`): its `Outcome`
(from the error table), its images and their encoding time."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram

from vllm_omni_images.engine.metrics import SECONDS_BUCKETS

Outcome = Literal[
    "ok",  # images returned
    "invalid",  # 4xx for the request itself (bad field, unknown model)
    "rejected",  # 429: the queue was full
    "timeout",  # waited and ran longer than --image-request-timeout
    "cancelled",  # the client went away
    "out_of_memory",
    "error",  # the engine failed
    "unavailable",  # 503: no engine, shutting down, a dead or hung engine, no image store
]


@dataclass(frozen=True)
class RequestMetricFamilies:
    """The metric families; one set per process, labelled per served model."""

    requests: Counter
    images: Counter
    encode_time: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> RequestMetricFamilies:
        model = ["model_name"]
        return cls(
            requests=Counter(
                "vllm:image_requests",
                "Image requests answered, by outcome.",
                [*model, "outcome"],
                registry=registry,
            ),
            images=Counter(
                "vllm:image_images_generated",
                "Images generated and returned.",
                model,
                registry=registry,
            ),
            encode_time=Histogram(
                "vllm:image_encode_seconds",
                "Time to encode one request's images (in parallel threads).",
                model,
                registry=registry,
                buckets=SECONDS_BUCKETS,
            ),
        )


@functools.cache
def request_metric_families() -> RequestMetricFamilies:
    """The process's families, registered once in vLLM's registry."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    return RequestMetricFamilies.create(get_prometheus_registry())


class RequestMetrics:
    """The answered requests of one served model."""

    def __init__(self, model_name: str, families: RequestMetricFamilies | None = None) -> None:
        families = families or request_metric_families()
        self._requests = {
            outcome: families.requests.labels(model_name=model_name, outcome=outcome)
            for outcome in get_args(Outcome)
        }
        self._images = families.images.labels(model_name=model_name)
        self._encode_time = families.encode_time.labels(model_name=model_name)

    def record_request(
        self, outcome: Outcome, images: int = 0, encode_s: float | None = None
    ) -> None:
        """Count one answered request (called once per request, whatever its outcome)."""
        self._requests[outcome].inc()
        if images:
            self._images.inc(images)
        if encode_s is not None:
            self._encode_time.observe(encode_s)
