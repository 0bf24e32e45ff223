"""Prometheus metrics of the server under vLLM's names, so dashboards and ``vllm bench`` tooling read them as is.

One :class:`Metrics` per app (its own registry: several apps in one process, as in the tests, do not collide).
Gauges are read from the engine at scrape time; histograms and counters are fed when a request finishes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 600.0)


class Metrics:
    """The server's metrics over ``engine`` (labels: ``model_name``).

    ``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` (requests in a slot / queued for one),
    ``vllm:kv_cache_usage_perc`` (also as vLLM's older ``vllm:gpu_cache_usage_perc``: the fraction of cache
    positions held by live requests, 1 = full), histograms ``vllm:time_to_first_token_seconds``,
    ``vllm:time_per_output_token_seconds`` (per request, (latency - TTFT) / (tokens - 1)),
    ``vllm:e2e_request_latency_seconds``, counters
    ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``, ``vllm:request_success_total``
    (label ``finished_reason``).
    """

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name}
        names = ["model_name"]
        r = self.registry

        def gauge(name, doc, fn):
            g = Gauge(name, doc, names, registry=r)
            g.labels(**self.labels).set_function(fn)

        gauge("vllm:num_requests_running", "Requests in an engine slot.", self.running)
        gauge("vllm:num_requests_waiting", "Requests waiting for a slot.", lambda: len(engine.waiting))
        gauge("vllm:kv_cache_usage_perc", "Fraction of latent-cache positions in use (1 = full).", self.cache_usage)
        gauge("vllm:gpu_cache_usage_perc", "Same as vllm:kv_cache_usage_perc (vLLM v0 name).", self.cache_usage)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", names, buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Time per output token after the first.",
            names,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", names, buckets=E2E_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", names, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", names, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests.", [*names, "finished_reason"], registry=r)

    def running(self) -> int:
        return sum(1 for s in list(self.engine.slots) if s is not None)

    def cache_usage(self) -> float:
        used = sum(len(s.prompt) + len(s.tokens) for s in list(self.engine.slots) if s is not None)
        return used / float(self.engine.max_slots * self.engine.max_context)

    def observe(self, *, prompt_tokens: int, generated: int, times: dict, finish_reason: str) -> None:
        """Record one finished request (``times``: ``submitted``, ``first_token``, ``finished`` perf counters)."""
        labels = self.labels
        self.prompt_tokens.labels(**labels).inc(prompt_tokens)
        self.generation_tokens.labels(**labels).inc(generated)
        self.success.labels(**labels, finished_reason=finish_reason).inc()
        start, first, end = times.get("submitted"), times.get("first_token"), times.get("finished")
        if start is not None and end is not None:
            self.e2e.labels(**labels).observe(end - start)
        if start is not None and first is not None:
            self.ttft.labels(**labels).observe(first - start)
            if end is not None and generated > 1:
                self.tpot.labels(**labels).observe((end - first) / (generated - 1))

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
