"""What one running server holds: the engine, the model table, the adapter watcher, metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from trainserve.server.adapters_watch import AdapterWatcher
from trainserve.server.api_key import sendable_key
from trainserve.server.generation import TokenText
from trainserve.server.grammar_check import GrammarChecker
from trainserve.server.metrics import Metrics
from trainserve.server.models import ModelTable
from trainserve.server.sampling import max_chars_per_token

logger = logging.getLogger("trainserve.server")

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


@dataclass
class ServerConfig:
    """Settings of one server (the CLI flags and ``model.serve`` keywords)."""

    served_model_name: str
    api_key: str | None = None
    adapters_dir: str | None = None
    allow_any_adapter_path: bool = False
    adapter_poll_interval: float = 1.0
    max_lora_rank: int | None = None  # as the user asked; defaults to the engine's
    drain_timeout: float = 300.0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    trust_request_chat_template: bool = False  # let requests replace the chat template (still sandboxed)
    public_health: bool = False  # /health, /ping and /metrics answer without the API key (probes, scrapers)

    def __post_init__(self) -> None:
        # ``--api-key "$KEY"`` with KEY unset must not start a server without authentication.
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty: pass a non-empty key, or none to serve without one")
        if self.api_key is not None and not sendable_key(self.api_key):
            # HTTP drops a header's surrounding whitespace: no client could ever present this key
            raise ValueError("the API key holds whitespace or control characters, which no client can send in an "
                             "Authorization header; pass the key without them")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")


class ServerState:
    """Shared by every route of one app. The engine loop must be in background mode while serving."""

    def __init__(self, engine: Any, hf_config: Any, config: ServerConfig):
        self.engine = engine
        self.loop = engine.loop
        self.tokenizer = engine.tokenizer
        self.token_text = TokenText(self.tokenizer)
        self.hf_config = hf_config
        self.config = config
        self.max_model_len = int(engine.spec.max_model_len)
        # a text longer than this cannot fit the context: refused before tokenising (vLLM's bound)
        self.max_prompt_chars = self.max_model_len * max_chars_per_token(self.tokenizer)
        self.vocab_size = int(hf_config.vocab_size)
        # structured-output constraints are test-compiled with a time limit before they are queued
        self.grammars = GrammarChecker(self.tokenizer, self.vocab_size)
        self.metrics = Metrics()
        self.models = ModelTable(
            engine,
            hf_config,
            config.served_model_name,
            config.max_lora_rank or int(engine.spec.max_lora_rank),
            self.metrics,
        )
        self.watcher = AdapterWatcher(self.models, config.adapters_dir, config.adapter_poll_interval)
        self.metrics.bind(
            lambda: self.loop.num_unfinished, lambda: self.loop.steps, lambda: len(self.models.names())
        )
        self.draining = False
        self.in_flight = 0

    def start(self) -> None:
        """Load the adapters directory, start stepping the engine in the background, start watching."""
        self.watcher.load_initial()
        self.loop.start_background()
        self.watcher.start()

    def close(self) -> None:
        self.watcher.stop()
        self.models.reap()
        self.models.close()
        self.grammars.close()
