"""uvicorn with a graceful drain: on SIGTERM/SIGINT (or :meth:`GracefulServer.begin_drain`) stop
accepting connections, answer 503 to new requests on open connections, let every running request
finish (streams included), then exit. A second SIGINT/SIGTERM exits at once.

With ``exit_on_engine_death`` (``trainserve serve``) the server also stops when the engine loop has
failed: the loop has already failed every running request, nothing can be served any more, and a
process that stays up answering 503 is only restarted by supervisors that probe ``/health``
(``vllm serve`` exits too). A server inside a training process leaves that choice to the process.

uvicorn's own handler is not used: it makes sse-starlette cut open streams at the first signal,
and it re-raises the signal after shutdown, so the process would not exit with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn
from trainserve.server.app import create_app
from trainserve.server.state import ServerState

logger = logging.getLogger("trainserve.server")


class GracefulServer(uvicorn.Server):
    """A ``uvicorn.Server`` that drains running requests before it stops."""

    def __init__(
        self,
        config: uvicorn.Config,
        state: ServerState,
        on_started: Callable[[GracefulServer], None] | None = None,
        exit_on_engine_death: bool = False,
    ):
        super().__init__(config)
        self.state = state
        self.on_started = on_started
        self.exit_on_engine_death = exit_on_engine_death
        self._aio: asyncio.AbstractEventLoop | None = None
        self._drain_started = False
        self.drained_cleanly: bool | None = None
        self.engine_died = False

    async def startup(self, sockets: list[Any] | None = None) -> None:
        self._aio = asyncio.get_running_loop()
        # Routes hand blocking work (tokenising, submitting between engine steps) to threads:
        # the default pool (CPU count + 4) would queue concurrent clients behind a few workers.
        self._aio.set_default_executor(
            ThreadPoolExecutor(max_workers=64, thread_name_prefix="trainserve-http")
        )
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started(self)

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's 0.1 s tick: also stop once the engine loop has failed (``exit_on_engine_death``)."""
        fatal = self.state.loop.fatal
        if self.exit_on_engine_death and fatal is not None and not self.engine_died:
            logger.error("the engine stopped (%r): exiting, so that a supervisor can start the server again", fatal)
            self.engine_died = True
            self.should_exit = True
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: Any) -> None:
        if self._drain_started:
            logger.warning(
                "second %s: exiting without waiting for running requests", signal.Signals(sig).name
            )
            self.force_exit = True
            self.should_exit = True
            return
        logger.info(
            "%s: finishing %d running request(s), then exiting",
            signal.Signals(sig).name,
            self.state.in_flight,
        )
        self.begin_drain()

    def begin_drain(self) -> None:
        """Start the graceful shutdown (any thread)."""
        if self._drain_started:
            return
        self._drain_started = True
        self.state.draining = True
        aio = self._aio
        if aio is None or not self.started or aio.is_closed():
            self.should_exit = True
            return
        try:
            aio.call_soon_threadsafe(lambda: aio.create_task(self._drain()))
        except RuntimeError:  # the loop just closed
            self.should_exit = True

    async def _drain(self) -> None:
        for server in self.servers:  # stop accepting; open connections stay
            server.close()
        deadline = time.monotonic() + self.state.config.drain_timeout
        while self.state.in_flight > 0 and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        self.drained_cleanly = self.state.in_flight == 0
        if not self.drained_cleanly:
            logger.warning("drain timeout: %d request(s) still running are cut off", self.state.in_flight)
        self.should_exit = True

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self.servers[0].sockets[0].getsockname()[1])


def make_server(
    state: ServerState,
    host: str,
    port: int,
    log_level: str = "warning",
    threaded: bool = False,
    on_started: Callable[[GracefulServer], None] | None = None,
    exit_on_engine_death: bool = False,
) -> GracefulServer:
    """A server for ``state``'s app. ``threaded`` (run in a background thread) keeps the asyncio
    event-loop policy of the process untouched; ``exit_on_engine_death``: see the module docstring."""
    config = uvicorn.Config(
        create_app(state),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        loop="asyncio" if threaded else "auto",
        lifespan="off",
        timeout_graceful_shutdown=10,
        # Longer than clients keep idle connections (httpx, and so the openai client: 5 s; aiohttp:
        # 15 s). At uvicorn's 5 s, a client reusing a connection idle for ~5 s could send just as the
        # server closed it and get "Server disconnected without sending a response" (seen in CI).
        timeout_keep_alive=30,
    )
    return GracefulServer(config, state, on_started, exit_on_engine_death)


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
