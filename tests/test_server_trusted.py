"""A server started with ``--trust-request-chat-template --drain-timeout 0 --public-health`` and an
API key: request-supplied chat templates are rendered, but in a sandboxed process with limits; the
probes are open without the key, nothing else is; a drain that times out exits non-zero."""

from __future__ import annotations

import signal
import threading

import pytest
from server_support import PROMPTS, claim, complete, launch_server

pytestmark = pytest.mark.engine

KEY = "sk-trusted-91c2"
TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}ANSWER:"


def _launch_trusted():
    return launch_server(["--trust-request-chat-template", "--drain-timeout", "0", "--public-health"], api_key=KEY)


DEDICATED_SERVER = _launch_trusted  # started with the suite's shared server (server_support.prestart)


@pytest.fixture(scope="module")
def trusted():
    server = claim(__name__, _launch_trusted)
    yield server
    server.stop()


def _chat(server, template: str, **extra) -> dict:
    return {
        "model": server.model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "temperature": 0,
        "chat_template_kwargs": {"chat_template": template},
        **extra,
    }


def test_trusted_request_template_is_used(trusted):
    with trusted.client() as http:
        chat = http.post("/v1/chat/completions", json=_chat(trusted, TEMPLATE))
        assert chat.status_code == 200, chat.text
        same = complete(http, trusted.model, prompt="[user] Hi\nANSWER:", max_tokens=5)
        assert chat.json()["choices"][0]["message"]["content"] == same["choices"][0]["text"]
        assert chat.json()["usage"]["prompt_tokens"] == same["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    "template, code",
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "chat_template_limit"),
        ("{{ 'x' * 10**10 }}", "chat_template_error"),  # MemoryError under the worker's memory cap
        ("{{ ''.__class__.__mro__ }}", "chat_template_error"),  # the jinja sandbox
    ],
)
def test_runaway_templates_are_cut_off(trusted, template, code):
    with trusted.client() as http:
        r = http.post("/v1/chat/completions", json=_chat(trusted, template))
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
        assert r.json()["error"]["param"] == "chat_template_kwargs.chat_template"
        # the server (and the renderer, restarted if it was killed) keeps serving
        assert complete(http, trusted.model, max_tokens=2)["usage"]["completion_tokens"] == 2
        assert http.post("/v1/chat/completions", json=_chat(trusted, TEMPLATE)).status_code == 200


def test_public_health_opens_only_the_probes(trusted):
    import httpx

    with httpx.Client(base_url=trusted.url, timeout=30) as anon:
        assert anon.get("/health").json()["status"] == "ok"
        assert anon.get("/ping").status_code == 200 and anon.post("/ping").status_code == 200
        assert "trainserve_requests_total" in anon.get("/metrics").text
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize"),
                             ("GET", "/version"), ("GET", "/openapi.json"), ("GET", "/health/x")):
            r = anon.request(method, path, json={"model": trusted.model, "prompt": "x"})
            assert r.status_code == 401, (method, path, r.status_code)
    with trusted.client() as ok:
        assert ok.get("/v1/models").status_code == 200


def test_drain_that_times_out_exits_nonzero(trusted):
    first = threading.Event()

    def stream() -> None:
        body = {"model": trusted.model, "prompt": PROMPTS[0], "max_tokens": 240, "ignore_eos": True, "stream": True}
        try:
            with trusted.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
                for _ in r.iter_lines():
                    first.set()
        except Exception:  # the server cuts the stream off: that is the point
            pass
        finally:
            first.set()

    worker = threading.Thread(target=stream)
    worker.start()
    assert first.wait(60)
    trusted.proc.send_signal(signal.SIGTERM)
    assert trusted.proc.wait(120) == 1
    worker.join(60)
    assert "drain timed out" in trusted.log()
