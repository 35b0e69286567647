"""Prometheus metrics for a Flask app: requests by route and status, and their latency."""

from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """One registry per app, so several apps (tests, replicas in one process) don't collide."""

    def __init__(self, prefix: str):
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{prefix}_requests_total", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram(f"{prefix}_request_seconds", "HTTP request latency until the response starts",
                                 ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

    def gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(name, doc, registry=self.registry)

    def histogram(self, name: str, doc: str) -> Histogram:
        return Histogram(name, doc, registry=self.registry,
                         buckets=(0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5, 10, 30))

    def install(self, app: Flask) -> None:
        """Counts every request (the app serves `response()` at its /metrics route)."""

        @app.before_request
        def _start():
            g.metrics_start = time.perf_counter()

        @app.after_request
        def _count(resp):
            # url_rule keeps the label set small: /api/books/<int:book_id>, not one label per id.
            route = request.url_rule.rule if request.url_rule else "unmatched"
            self.requests.labels(route, request.method, str(resp.status_code)).inc()
            if "metrics_start" in g:
                self.latency.labels(route).observe(time.perf_counter() - g.metrics_start)
            return resp

    def response(self) -> Response:
        """The Prometheus text exposition of this registry."""
        return Response(generate_latest(self.registry), mimetype=CONTENT_TYPE_LATEST)
