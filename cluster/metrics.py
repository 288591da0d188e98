"""The cluster's Prometheus metrics, in a registry of their own, served on HTTP `/metrics`.

Who records what: the gateway times requests as its clients see them (TTFT, inter-token gaps,
end-to-end, tokens, finish reasons, errors by gRPC status); the global scheduler reports queue
time and the running/waiting counts; whoever polls the replicas reports their engine figures.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Latency buckets in seconds: from a fast decode step on a GPU to a long CPU prefill.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class Metrics:
    """Every metric the head exports; one instance per process, never the global registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.time_to_first_token = Histogram(
            "afs_time_to_first_token_seconds",
            "Arrival of a request at the gateway to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "afs_inter_token_latency_seconds",
            "Gap before each token after the first of a completion (0 for tokens that arrive "
            "together in one event).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e_request_latency = Histogram(
            "afs_e2e_request_latency_seconds",
            "Arrival of a request at the gateway to the end of its stream, however it ended.",
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.request_queue_time = Histogram(
            "afs_request_queue_time_seconds",
            "Time a request waited in the global admission queue before dispatch.",
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.requests_running = Gauge(
            "afs_requests_running", "Requests running on replicas.", registry=registry
        )
        self.requests_waiting = Gauge(
            "afs_requests_waiting",
            "Requests waiting in the admission queue and the replicas' queues.",
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "afs_prompt_tokens_total", "Prompt tokens of admitted requests.", registry=registry
        )
        self.generation_tokens = Counter(
            "afs_generation_tokens_total", "Tokens streamed to clients.", registry=registry
        )
        self.requests = Counter(
            "afs_requests_total",
            "Completions that ended, by finish reason (a request with n > 1 counts n times).",
            ["finish_reason"],
            registry=registry,
        )
        self.request_errors = Counter(
            "afs_request_errors_total",
            "RPCs that ended with a status other than OK, by gRPC status name.",
            ["code"],
            registry=registry,
        )
        self.kv_cache_usage = self._replica_gauge(
            "afs_kv_cache_usage_ratio", "Fraction of KV blocks in use."
        )
        self.prefix_cache_hit_rate = self._replica_gauge(
            "afs_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache, fraction."
        )
        self.batch_size = self._replica_gauge(
            "afs_batch_size", "Requests in the replica's last step."
        )
        self.step_time = self._replica_gauge(
            "afs_step_time_seconds", "Duration of the replica's last step."
        )
        self.preemptions = self._replica_gauge(
            "afs_preemptions", "Preemptions since the replica started (cumulative)."
        )
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def _replica_gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(name, documentation, ["replica"], registry=self.registry)

    # -- what the gateway records --

    def observe_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def observe_token_gap(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def observe_finished(
        self,
        e2e_seconds: float,
        prompt_tokens: int,
        completion_tokens: int,
        finish_reasons: Iterable[str],
    ) -> None:
        """One admitted request's stream ended; one finish reason per completion."""
        self.e2e_request_latency.observe(e2e_seconds)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        for reason in finish_reasons:
            self.requests.labels(finish_reason=reason).inc()

    def observe_error(self, code_name: str) -> None:
        self.request_errors.labels(code=code_name).inc()

    # -- what the scheduler and the replica poller record --

    def observe_queue_time(self, seconds: float) -> None:
        self.request_queue_time.observe(seconds)

    def set_queue(self, running: int, waiting: int) -> None:
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)

    def set_replica(
        self,
        replica_id: str,
        kv_usage: float,
        prefix_hit_rate: float,
        batch_size: int,
        step_seconds: float,
        preemptions: int,
    ) -> None:
        for gauge, value in (
            (self.kv_cache_usage, kv_usage),
            (self.prefix_cache_hit_rate, prefix_hit_rate),
            (self.batch_size, batch_size),
            (self.step_time, step_seconds),
            (self.preemptions, preemptions),
        ):
            gauge.labels(replica=replica_id).set(value)

    def remove_replica(self, replica_id: str) -> None:
        """Drop a dead replica's series, so that it does not report stale figures."""
        for gauge in (
            self.kv_cache_usage,
            self.prefix_cache_hit_rate,
            self.batch_size,
            self.step_time,
            self.preemptions,
        ):
            try:
                gauge.remove(replica_id)
            except KeyError:
                continue

    # -- HTTP --

    def start_http_server(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve `/metrics` from a daemon thread; port 0 picks a free port. Returns the port."""
        if self._http is not None:
            raise RuntimeError("metrics: the HTTP server is already running")
        self._http, self._http_thread = start_http_server(port, host, registry=self.registry)
        return self._http.server_address[1]

    def stop(self) -> None:
        if self._http is None:
            return
        self._http.shutdown()
        self._http.server_close()
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
        self._http = self._http_thread = None
