"""Chat templates supplied by a request (``chat_template``, ``chat_template_kwargs.chat_template``).

A client-chosen Jinja template is code run by the server. Jinja's sandbox stops attribute
tricks but not work: a nested ``range`` loop runs for hours holding the GIL (stalling every other
client, and it keeps running after its client disconnects), and ``"x" * 10**10`` exhausts memory.
So such templates are refused unless the operator trusts the clients
(``--trust-request-chat-template``, as ``vllm serve`` asks), and even then they are rendered by
transformers' renderer (jinja2's ``ImmutableSandboxedEnvironment``) in a separate process
(``_template_worker.py``) with a memory cap, an output cap and a wall-clock limit, after which the
process is killed and replaced. The model's own template is the operator's and renders in-process.
"""

from __future__ import annotations

import atexit
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

from trainserve.server.errors import APIError, bad_request
from trainserve.server.worker_process import exchange, kill_worker, start_worker

TIMEOUT_S = 5.0  # a real chat template renders in milliseconds
MEMORY_BYTES = 512 * 1024 * 1024
STARTUP_TIMEOUT_S = 120.0
WORKER = Path(__file__).with_name("_template_worker.py")


def requested_template(req: Any) -> tuple[str | None, str | None]:
    """``(template, param)`` a chat request asks for, if any."""
    kwargs = req.chat_template_kwargs or {}
    if req.chat_template is not None:
        return req.chat_template, "chat_template"
    if kwargs.get("chat_template") is not None:
        template = kwargs["chat_template"]
        if not isinstance(template, str):
            raise bad_request("chat_template must be a string", param="chat_template_kwargs.chat_template")
        return template, "chat_template_kwargs.chat_template"
    return None, None


def refuse_untrusted(param: str) -> APIError:
    return APIError(
        400,
        f"{param}: this server does not accept chat templates from requests (the operator can allow "
        "them with --trust-request-chat-template)",
        param=param,
        code="chat_template_not_allowed",
    )


class TemplateRenderer:
    """One worker process, one render at a time; killed and restarted when a render overruns."""

    def __init__(self, timeout: float = TIMEOUT_S, memory: int = MEMORY_BYTES):
        self.timeout = timeout
        self.memory = memory
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        atexit.register(self.close)

    def _start(self) -> subprocess.Popen:
        proc = start_worker(WORKER, self.memory, STARTUP_TIMEOUT_S)
        if proc is None:
            raise APIError(503, "the chat template renderer did not start", code="template_renderer_unavailable")
        return proc

    def render(self, job: dict[str, Any], param: str) -> str:
        """Render ``job`` (template, messages, kwargs, flags, max_chars); a failure is a 400 naming ``param``."""
        payload = json.dumps(job).encode() + b"\n"
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            line = exchange(proc, payload, self.timeout)
            if line is None:  # overran the limit, or died (memory): replace the worker
                kill_worker(proc)
                self._proc = None
                raise bad_request(
                    f"the chat template did not render within {self.timeout:g} s and "
                    f"{self.memory >> 20} MiB",
                    param=param,
                    code="chat_template_limit",
                )
        answer = json.loads(line)
        if "error" in answer:
            code = "context_length_exceeded" if answer.get("too_long") else "chat_template_error"
            raise bad_request(f"the chat template failed: {answer['error']}", param=param, code=code)
        return str(answer["text"])

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                kill_worker(self._proc)
                self._proc = None


_RENDERER: TemplateRenderer | None = None
_RENDERER_LOCK = threading.Lock()


def renderer() -> TemplateRenderer:
    """The process's renderer (started on first use)."""
    global _RENDERER
    with _RENDERER_LOCK:
        if _RENDERER is None:
            _RENDERER = TemplateRenderer()
        return _RENDERER
