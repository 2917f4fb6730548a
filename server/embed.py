"""``model.serve(...)``: serve the colocated engine of a training process over the OpenAI API.

The engine loop goes to background mode (a thread steps it; the trainer's ``fast_generate`` and
HTTP requests are batched together). The trainer's adapter is served as ``live``: a global torch
optimizer post-step hook publishes a snapshot after every optimizer step that updates the live
adapter's parameters, so ``live`` always answers with the latest step (requests already running
finish on the version they started with).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

from torch.optim.optimizer import register_optimizer_step_post_hook
from trainserve.server.runner import GracefulServer, make_server, url_of
from trainserve.server.state import DEFAULT_MAX_REQUEST_BYTES, ServerConfig, ServerState

logger = logging.getLogger("trainserve.server")


class LivePublisher:
    """Publishes the engine's live adapter after optimizer steps that touch its parameters."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.publishes = 0
        self._params: tuple[int, frozenset[int]] | None = None  # (id of LiveAdapter, parameter ids)
        self._holds: weakref.WeakKeyDictionary[Any, tuple[int, int, bool]] = weakref.WeakKeyDictionary()
        self._handle = register_optimizer_step_post_hook(self._after_step)

    def _param_ids(self, live: Any) -> frozenset[int]:
        if self._params is None or self._params[0] != id(live):
            ids = frozenset(
                id(p)
                for name, p in live.peft_model.named_parameters()
                if ("lora_A" in name or "lora_B" in name) and f".{live.adapter_name}." in f"{name}."
            )
            self._params = (id(live), ids)
        return self._params[1]

    def _holds_live(self, optimizer: Any, live: Any) -> bool:
        key = (id(live), len(optimizer.param_groups))
        cached = self._holds.get(optimizer)
        if cached is not None and cached[:2] == key:
            return cached[2]
        ids = self._param_ids(live)
        holds = any(id(p) in ids for group in optimizer.param_groups for p in group["params"])
        self._holds[optimizer] = (*key, holds)
        return holds

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        live = self.engine.live_owner
        if live is None:
            return
        try:
            if self._holds_live(optimizer, live):
                live.mark_stepped()  # whatever order the global hooks run in
                self.publish()
        except Exception:  # never break the training step
            logger.exception("publishing the live adapter failed")

    def publish(self) -> int | None:
        """Publish the live adapter now (training thread); returns its version."""
        live = self.engine.live_owner
        if live is None:
            return None
        from trainserve.engine.live_adapter import LiveAdapterRevoked

        try:
            version = live.publish()
        except LiveAdapterRevoked:
            return None
        self.publishes += 1
        return version

    def remove(self) -> None:
        self._handle.remove()


class ServerHandle:
    """A server running in a background thread of this process; ``stop()`` ends it."""

    def __init__(
        self,
        server: GracefulServer,
        state: ServerState,
        thread: threading.Thread | None,
        publisher: LivePublisher,
        host: str,
    ):
        self.server = server
        self.state = state
        self.thread = thread
        self.publisher = publisher
        self.host = host
        self.port = server.port if server.started else 0
        self.url = url_of(host, self.port)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Finish running requests (up to ``drain_timeout``), stop the server, remove the optimizer
        hook, and take the engine loop out of background mode."""
        self.server.begin_drain()
        if self.thread is not None:
            self.thread.join(timeout if timeout is not None else self.state.config.drain_timeout + 30)
        self.publisher.remove()
        self.state.close()
        self.state.loop.stop_background(drain=True)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve_model(
    model: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    background: bool = True,
    served_model_name: str | None = None,
    adapters_dir: str | None = None,
    allow_any_adapter_path: bool = False,
    loras: dict[str, str] | None = None,
    adapter_poll_interval: float = 1.0,
    log_level: str = "warning",
    startup_timeout: float = 60.0,
    drain_timeout: float = 60.0,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    trust_request_chat_template: bool = False,
    public_health: bool = False,
) -> ServerHandle:
    """Serve ``model``'s colocated engine: the base, ``loras`` (name → path), ``adapters_dir``, and
    ``live`` (the model's training adapter). ``background=False`` blocks until the server stops
    (SIGINT/SIGTERM in the main thread). ``port=0`` picks a free port (see ``handle.url``).
    ``api_key=""`` is refused (``ValueError``): an unset variable must not turn authentication off.
    ``public_health=True`` leaves ``/health``, ``/ping`` and ``/metrics`` open without the key."""
    from trainserve.model_api import state_of

    if api_key is not None and not api_key.strip():
        raise ValueError("model.serve(api_key=''): the API key is empty; pass a key, or None for no key")

    mstate = state_of(model)
    if mstate is None:
        raise RuntimeError("model.serve needs FastLanguageModel.from_pretrained(..., fast_inference=True)")
    engine = mstate.engine
    config = ServerConfig(
        served_model_name=served_model_name or engine.spec.model_path,
        api_key=api_key,
        adapters_dir=adapters_dir,
        allow_any_adapter_path=allow_any_adapter_path,
        adapter_poll_interval=adapter_poll_interval,
        max_lora_rank=mstate.max_lora_rank or None,
        drain_timeout=drain_timeout,
        max_request_bytes=max_request_bytes,
        trust_request_chat_template=trust_request_chat_template,
        public_health=public_health,
    )
    state = ServerState(engine, mstate.config, config)
    publisher = LivePublisher(engine)
    try:
        for name, path in (loras or {}).items():
            state.models.load(name, path, source="cli")
        publisher.publish()  # the adapter as it is now is live@v<N> until the next optimizer step
        state.start()
        server = make_server(state, host, port, log_level=log_level, threaded=background)
    except BaseException:
        publisher.remove()
        state.close()
        state.loop.stop_background(drain=True)
        raise
    if not background:
        try:
            server.run()
        finally:
            handle = ServerHandle(server, state, None, publisher, host)
            handle.stop()
        return handle
    thread = threading.Thread(target=server.run, name="trainserve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            publisher.remove()
            state.close()
            state.loop.stop_background(drain=True)
            raise RuntimeError(f"the server did not start on {host}:{port} (port in use?)")
        time.sleep(0.02)
    handle = ServerHandle(server, state, thread, publisher, host)
    logger.info(
        "serving on %s (models: %s)", handle.url, ", ".join([config.served_model_name, *state.models.names()])
    )
    return handle
