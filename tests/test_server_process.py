"""A second server process: API key on every route, --lora, no runtime loading without an adapters
dir, and graceful shutdown on SIGTERM (running requests finish, exit status 0)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_support import PROMPTS, REPO, claim, launch_server, make_adapter

pytestmark = pytest.mark.engine

KEY = "sk-test-7f3a"
ROUTES = [
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/tokenizer_info"),
    ("GET", "/version"),
    ("GET", "/ping"),
    ("POST", "/ping"),
    ("GET", "/v1/models/mine"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/no/such/route"),
]


def _launch_keyed():
    root = Path(tempfile.mkdtemp(prefix="trainserve-keyed-"))
    make_adapter(root / "mine", seed=7)
    return launch_server(["--lora", f"mine={root / 'mine'}"], api_key=KEY)


DEDICATED_SERVER = _launch_keyed  # started with the suite's shared server (server_support.prestart)


@pytest.fixture(scope="module")
def keyed_server():
    server = claim(__name__, _launch_keyed)
    yield server
    server.stop()


def test_api_key_required_on_every_route(keyed_server):
    body = {"model": keyed_server.model, "prompt": "x", "messages": [], "lora_name": "x", "lora_path": "x"}
    with httpx.Client(base_url=keyed_server.url, timeout=30) as anon:
        # only "Authorization: Bearer" carries the key (an x-api-key header is not read)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"x-api-key": KEY}):
            for method, path in ROUTES:
                r = anon.request(method, path, json=body if method == "POST" else None, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.json()["error"]["code"] == "invalid_api_key"
    with keyed_server.client() as ok:
        assert ok.get("/health").status_code == 200 and ok.get("/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_cli_lora_is_served(keyed_server):
    client = keyed_server.openai()
    cards = {m.id: m for m in client.models.list().data}
    assert cards["mine"].model_extra["version"] == "mine@v1"
    assert cards["mine"].model_extra["root"] == "mine"  # outside --adapters-dir: the directory's name only
    base = client.completions.create(
        model=keyed_server.model, prompt=PROMPTS[0], max_tokens=12, temperature=0
    )
    mine = client.completions.create(model="mine", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert mine.system_fingerprint == "mine@v1" and mine.choices[0].text != base.choices[0].text


def test_runtime_loading_refused_without_adapters_dir(keyed_server, tmp_path):
    make_adapter(tmp_path / "x", seed=8)
    with keyed_server.client() as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "x")})
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_loading_disabled"
        assert "x" not in [m["id"] for m in c.get("/v1/models").json()["data"]]


def test_sigterm_drains_running_requests_and_exits_0(keyed_server):
    received: list[dict] = []
    done = threading.Event()
    first = threading.Event()
    errors: list[BaseException] = []

    def stream() -> None:
        body = {
            "model": "mine",
            "prompt": PROMPTS[0],
            "max_tokens": 240,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        try:
            with keyed_server.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        received.append({"done": True} if line == "data: [DONE]" else json.loads(line[6:]))
                        first.set()
        except BaseException as exc:  # reported by the assertions below
            errors.append(exc)
        finally:
            done.set()
            first.set()

    worker = threading.Thread(target=stream)
    worker.start()
    assert first.wait(60)
    keyed_server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # no longer accepting connections
        with keyed_server.client() as c:
            c.get("/health")
    assert done.wait(120)
    worker.join()
    assert not errors, errors
    assert received[-1] == {"done": True}
    chunks = [r for r in received if r.get("choices")]
    assert received[-2]["usage"]["completion_tokens"] == 240  # the request ran to its end
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert keyed_server.proc.wait(60) == 0
    assert "SIGTERM: finishing 1 running request(s)" in keyed_server.log()


def test_bad_cli_arguments_exit_2(tmp_path):
    args = [
        sys.executable,
        "-m",
        "trainserve.cli",
        "serve",
        "some-model",
        "--adapters-dir",
        str(tmp_path / "nope"),
    ]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a directory" in result.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_empty_api_key_is_refused(tmp_path, how):
    """``--api-key "$KEY"`` with KEY unset must not start a server without authentication."""
    import os

    args = [sys.executable, "-m", "trainserve.cli", "serve", "some-model"]
    env = {k: v for k, v in os.environ.items() if k != "TRAINSERVE_API_KEY"}
    if how == "flag":
        args += ["--api-key", ""]
    else:
        env["TRAINSERVE_API_KEY"] = " "
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "empty" in result.stderr, result.stderr


@pytest.mark.parametrize("key", [" sekrit", "sekrit\n", "two words", "tab\tkey"])
def test_an_api_key_no_client_can_send_is_refused(key):
    """HTTP drops a header's surrounding whitespace: such a key would lock every client out (401) while the
    server looked healthy."""
    import os

    env = {**{k: v for k, v in os.environ.items() if k != "TRAINSERVE_API_KEY"}, "TRAINSERVE_API_KEY": key}
    result = subprocess.run([sys.executable, "-m", "trainserve.cli", "serve", "some-model"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "whitespace or control characters" in result.stderr, result.stderr
    from trainserve.server.state import ServerConfig

    with pytest.raises(ValueError, match="whitespace or control characters"):
        ServerConfig("m", api_key=key)


def test_empty_api_key_is_refused_by_model_serve():
    from trainserve.server.embed import serve_model
    from trainserve.server.state import ServerConfig

    with pytest.raises(ValueError, match="empty"):
        serve_model(object(), api_key="")
    with pytest.raises(ValueError, match="empty"):
        ServerConfig("m", api_key="")


@pytest.mark.parametrize("exit_on_engine_death", [True, False])
def test_a_dead_engine_stops_the_standalone_server_only(exit_on_engine_death):
    """`trainserve serve` exits once the engine loop has failed (its requests already got the error;
    nothing can be served), so a supervisor restarts it; a server inside a training process stays up
    (its routes and /health answer 503 engine_dead) and leaves the choice to that process."""
    import asyncio
    from types import SimpleNamespace

    import uvicorn
    from trainserve.server.runner import GracefulServer

    state = SimpleNamespace(loop=SimpleNamespace(fatal=None))
    server = GracefulServer(uvicorn.Config(app=lambda scope, receive, send: None), state,
                            exit_on_engine_death=exit_on_engine_death)
    assert asyncio.run(server.on_tick(1)) is False and not server.engine_died
    state.loop.fatal = RuntimeError("Loading lora x@v7 failed")
    assert asyncio.run(server.on_tick(1)) is exit_on_engine_death
    assert server.engine_died is exit_on_engine_death and server.should_exit is exit_on_engine_death
