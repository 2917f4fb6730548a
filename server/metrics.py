"""Prometheus metrics of one server (its own ``CollectorRegistry``, so several apps never collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

ROUTES = frozenset(
    {
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/health",
        "/metrics",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
        "/version",
        "/ping",
        "/docs",
        "/openapi.json",
    }
)


class Metrics:
    """Requests, tokens, adapter swaps and engine queue length of one server."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "trainserve_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "trainserve_request_duration_seconds",
            "Time from request to the end of its response",
            ["route"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.first_token_seconds = Histogram(
            "trainserve_time_to_first_token_seconds",
            "Time from request to the first streamed token",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.prompt_tokens = Counter(
            "trainserve_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "trainserve_generation_tokens", "Tokens generated", ["model"], registry=r
        )
        self.adapter_swaps = Counter(
            "trainserve_adapter_swaps",
            "Adapter versions put into service or retired "
            "(load: new name, reload: new version of a name, unload, live: new live version served)",
            ["kind"],
            registry=r,
        )
        self.adapter_failures = Counter(
            "trainserve_adapter_load_failures",
            "Adapters rejected before reaching the engine",
            ["source"],
            registry=r,
        )
        self.aborted = Counter(
            "trainserve_requests_aborted",
            "Requests whose unfinished engine work was aborted (client went away, or an error)",
            registry=r,
        )
        self.in_flight = Gauge(
            "trainserve_http_requests_in_flight", "HTTP requests being answered", registry=r
        )
        self.queue_length = Gauge(
            "trainserve_engine_queue_length", "Engine requests not finished (running or waiting)", registry=r
        )
        self.engine_steps = Gauge("trainserve_engine_steps", "Engine steps taken by this process", registry=r)
        self.adapters_loaded = Gauge("trainserve_adapters_loaded", "Saved adapters being served", registry=r)

    def bind(
        self, queue_length: Callable[[], float], steps: Callable[[], float], adapters: Callable[[], float]
    ) -> None:
        """Read gauges from the engine loop and the model table at scrape time."""
        self.queue_length.set_function(queue_length)
        self.engine_steps.set_function(steps)
        self.adapters_loaded.set_function(adapters)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    @staticmethod
    def route_label(path: str) -> str:
        if path.startswith("/v1/models/"):
            return "/v1/models/{model}"
        return path if path in ROUTES else "other"
