"""What one running server holds: the engine, the model table, the adapter watcher, metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from trainserve.server.adapters_watch import AdapterWatcher
from trainserve.server.generation import TokenText
from trainserve.server.metrics import Metrics
from trainserve.server.models import ModelTable

logger = logging.getLogger("trainserve.server")


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
        self.vocab_size = int(hf_config.vocab_size)
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
