"""Prometheus metrics of the HTTP service: requests, latency and the Recommender's own counters.

Each app gets its own :class:`prometheus_client.CollectorRegistry`, so several servers in one
process (tests, benchmarks) never share or clash on counters. The Recommender's :meth:`stats`
(batches, batch sizes, queue, ...) is read at scrape time by a custom collector, so there is one
source of truth for them and nothing to keep in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

PREFIX = "moe_rec"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _numeric_leaves(stats: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(flattened_name, value)`` for every number in a nested stats dict (bools and text skipped)."""
    for key, value in stats.items():
        name = f"{prefix}_{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from _numeric_leaves(value, name)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield name, float(value)


def _metric_name(raw: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in raw).strip("_").lower()


class _StatsCollector(Collector):
    """Exposes ``stats()`` of the Recommender as ``moe_rec_recommender_<key>`` gauges."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        for name, value in _numeric_leaves(self._stats()):
            metric = f"{PREFIX}_recommender_{_metric_name(name)}"
            yield GaugeMetricFamily(metric, f"Recommender.stats()['{name}']", value=value)


class ServeMetrics:
    """Request counts by endpoint and status, request latency, and the Recommender's stats."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by endpoint (route template), method and status code",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from request start to the last response byte, by endpoint (route template)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StatsCollector(stats))

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything above."""
        return generate_latest(self.registry)
