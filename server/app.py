"""The FastAPI app of one server: routes, OpenAI-shaped errors, API key, body limit, request accounting."""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from trainserve.server import routes_admin, routes_openai, routes_utility
from trainserve.server.errors import error_response, install_handlers
from trainserve.server.state import ServerState

logger = logging.getLogger("trainserve.server")

# what --public-health leaves open: probes and scrapers do not carry the API key (vLLM leaves them open)
PUBLIC_PATHS = frozenset({"/health", "/ping", "/metrics"})


async def _read_body(receive: Receive, limit: int) -> tuple[list[Message], bool]:
    """Read the whole body (FastAPI reads it into memory anyway), stopping past ``limit`` bytes:
    ``(messages, too_large)``. A chunked upload has no Content-Length to check up front."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, False
        size += len(message.get("body", b""))
        if size > limit:
            return messages, True
        if not message.get("more_body", False):
            return messages, False


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


class GateMiddleware:
    """Checks the API key on every route (with ``--public-health``: all but ``PUBLIC_PATHS``),
    refuses new requests while draining, refuses bodies over ``max_request_bytes`` (413, before
    anything parses them), counts requests, and answers an unexpected exception with an
    OpenAI-shaped JSON 500 instead of Starlette's plain-text one.

    A pure ASGI middleware: the in-flight count covers a streamed response until its last byte,
    which graceful shutdown waits for.
    """

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state
        key = state.config.api_key
        self._key = key.encode() if key else None
        self._public = PUBLIC_PATHS if state.config.public_health else frozenset()

    def _authorised(self, scope: Scope) -> bool:
        if self._key is None or scope.get("path") in self._public:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return hmac.compare_digest(value[7:].strip(), self._key)
        return False

    def _too_large(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    return int(value) > self.state.config.max_request_bytes
                except ValueError:
                    return False
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        route = state.metrics.route_label(scope.get("path", ""))
        if not self._authorised(scope):
            state.metrics.requests.labels(route, "401").inc()
            response = error_response(
                401,
                "Missing or invalid API key (send 'Authorization: Bearer <key>').",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        if state.draining:
            state.metrics.requests.labels(route, "503").inc()
            response = error_response(
                503, "the server is shutting down", code="shutting_down", headers={"Connection": "close"}
            )
            await response(scope, receive, send)
            return
        limit = state.config.max_request_bytes
        too_large = self._too_large(scope)
        if not too_large and scope.get("method") in ("POST", "PUT", "PATCH"):
            messages, too_large = await _read_body(receive, limit)
            receive = _replay(messages, receive)
        if too_large:
            state.metrics.requests.labels(route, "413").inc()
            response = error_response(
                413,
                f"The request body is larger than this server's limit of {limit} bytes.",
                code="request_too_large",
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        status = ["500"]
        started_response = [False]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
                started_response[0] = True
            await send(message)

        state.in_flight += 1
        state.metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:  # a bug, not the client's fault: still a JSON answer, the connection lives on
            logger.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if not started_response[0]:
                response = error_response(500, "internal server error", code="internal_error")
                await response(scope, receive, send_wrapper)
        finally:
            state.in_flight -= 1
            state.metrics.in_flight.dec()
            state.metrics.requests.labels(route, status[0]).inc()
            state.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)


def create_app(state: ServerState) -> FastAPI:
    """The app serving ``state`` (whose engine loop must run in background mode)."""
    app = FastAPI(
        title="trainserve",
        description="OpenAI-compatible endpoint of a trainserve engine",
        docs_url="/docs",  # Swagger UI and the schema, behind the API key like every route
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.server = state
    install_handlers(app)
    app.include_router(routes_openai.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_utility.router)
    app.add_middleware(GateMiddleware, state=state)
    return app
