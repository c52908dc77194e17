"""The server's Prometheus metrics (GET /metrics, the text format): requests by endpoint and status, errors by
kind, latency, the texts of each model batch, the queue's depth, reloads, and which model is served. Each server
has its own registry, so that several in one process (tests) count apart."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ENDPOINTS = ("/v1/predict", "/v1/encode", "/v1/model", "/v1/reload", "/healthz", "/readyz", "/metrics")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        options = {"registry": self.registry}
        self.requests = Counter("astra_ds_requests", "HTTP requests answered", ["endpoint", "status"], **options)
        self.errors = Counter("astra_ds_request_errors", "Requests answered with an error, by kind",
                              ["endpoint", "kind"], **options)
        self.latency = Histogram("astra_ds_request_seconds", "Time from a request's arrival to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, **options)
        sizes = [2**i for i in range(max_batch.bit_length()) if 2**i < max_batch] + [max_batch]
        self.batch_texts = Histogram("astra_ds_batch_texts", "Texts a model batch (one encoder forward)",
                                     buckets=sizes, **options)
        self.queue_texts = Gauge("astra_ds_queue_texts", "Texts waiting for the model", **options)
        self.reloads = Counter("astra_ds_reloads", "Model reloads, by outcome", ["outcome"], **options)
        self.cut_off = Counter("astra_ds_requests_cut_off", "Requests in flight when the drain (--drain-s) ended",
                               **options)
        self.model = Gauge("astra_ds_model_info", "The model served (1)", ["run_dir", "version", "step"], **options)

    def answered(self, path: str, status: int, seconds: float, error_kind: str | None) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if error_kind:
            self.errors.labels(endpoint, error_kind).inc()

    def requests_cut_off(self) -> int:
        return int(self.registry.get_sample_value("astra_ds_requests_cut_off_total") or 0)

    def batched(self, texts: int) -> None:
        self.batch_texts.observe(texts)

    def serving(self, description: dict) -> None:
        self.model.clear()
        self.model.labels(description["run_dir"], description["version"], str(description["step"])).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
