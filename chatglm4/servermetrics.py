"""The model server's engine metrics under the names vLLM uses, with our prefix `chatglm4:` where
vLLM writes `vllm:`, so a dashboard built for vLLM works here after changing the prefix.

| ours | vLLM's | meaning |
| --- | --- | --- |
| `chatglm4:num_requests_running` | `vllm:num_requests_running` | requests being generated (prefill or decode) |
| `chatglm4:num_requests_waiting` | `vllm:num_requests_waiting` | requests queued for a batch slot |
| `chatglm4:kv_cache_usage_perc` | `vllm:kv_cache_usage_perc` | share of the KV cache in use, 0..1: running rows × their width over `KV_CACHE_TOKENS` |
| `chatglm4:kv_cache_bytes` | (none) | memory held by the batch cache's buffers (allocated as the batch first grows, then reused) |
| `chatglm4:prompt_tokens_total` | `vllm:prompt_tokens_total` | prompt tokens of admitted requests |
| `chatglm4:generation_tokens_total` | `vllm:generation_tokens_total` | tokens generated |
| `chatglm4:prefix_cache_queries_total` | `vllm:prefix_cache_queries_total` | prompt tokens looked up in the prefix cache |
| `chatglm4:prefix_cache_hits_total` | `vllm:prefix_cache_hits_total` | of those, tokens served from it |
| `chatglm4:time_to_first_token_seconds` | `vllm:time_to_first_token_seconds` | from arrival to the first token (histogram) |
| `chatglm4:inter_token_latency_seconds` | `vllm:inter_token_latency_seconds` | between a request's tokens after the first (histogram; each request adds its mean gap once per gap) |
| `chatglm4:e2e_request_latency_seconds` | `vllm:e2e_request_latency_seconds` | from arrival to the last token (histogram) |"""

from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "chatglm4:"

# vLLM's own bucket bounds, so the dashboards' quantiles read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector:
    """Reads the engine's stats at scrape time (nothing to keep in step)."""

    def __init__(self, stats: Callable[[], Any]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "requests being generated", value=s.running)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "requests waiting for a batch slot", value=s.waiting)
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_perc",
                                "share of the KV cache's token budget (KV_CACHE_TOKENS) the running rows occupy, 0..1",
                                value=s.kv_cache_usage)
        yield GaugeMetricFamily(PREFIX + "kv_cache_bytes", "memory held by the batch's KV cache buffers",
                                value=s.kv_cache_bytes)
        queried = s.prefill_tokens + s.prefix_hit_tokens
        for name, doc, value in (("prompt_tokens", "prompt tokens of admitted requests", queried),
                                 ("generation_tokens", "tokens generated", s.tokens_generated),
                                 ("prefix_cache_queries", "prompt tokens looked up in the prefix cache", queried),
                                 ("prefix_cache_hits", "prompt tokens served from the prefix cache", s.prefix_hit_tokens)):
            yield CounterMetricFamily(PREFIX + name, doc, value=value)


class EngineMetrics:
    """vLLM-named engine metrics in `registry`."""

    def __init__(self, registry: CollectorRegistry, stats: Callable[[], Any]):
        registry.register(_EngineCollector(stats))
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "time to first token",
                              registry=registry, buckets=TTFT_BUCKETS)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "time between generated tokens",
                             registry=registry, buckets=ITL_BUCKETS)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "request latency, arrival to last token",
                             registry=registry, buckets=E2E_BUCKETS)

    def finished(self, submitted_at: float, first_token_at: float | None, completion_tokens: int) -> None:
        """Records one request that has ended (time.monotonic() readings)."""
        end = time.monotonic()
        self.e2e.observe(end - submitted_at)
        if first_token_at is not None and completion_tokens > 1:
            gap = (end - first_token_at) / (completion_tokens - 1)
            for _ in range(completion_tokens - 1):
                self.itl.observe(gap)
