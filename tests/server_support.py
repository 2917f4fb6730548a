"""Helpers for the server tests: small PEFT adapters of the tiny model and real server processes.

One server process (``shared_server``) is started per pytest process, the first time a test asks
for it, and stopped at the end of the session. Test modules that need a server of their own name its
launch in ``DEDICATED_SERVER``; those of the session's modules start together with the shared one
(``prestart``: a start is mostly one core importing vLLM, so several overlap well) and each module
claims its own (``claim``) when it runs, starting it then if it was not started early.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ("Hello there", "Once upon a time", "The quick brown", "In the garden")
TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
VERSION = "x-trainserve-adapter-version"  # the response header naming the adapter version that answered


def make_adapter(
    out_dir: str | os.PathLike,
    seed: int,
    rank: int = 8,
    scale: float = 0.3,
    targets: tuple[str, ...] = TARGETS,
) -> str:
    """Save a PEFT LoRA adapter of the tiny model with random non-zero A and B (seeded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainserve import tiny_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model(), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(str(out_dir))
    return str(out_dir)


@dataclass
class ServerProcess:
    """A ``trainserve serve`` child process."""

    proc: subprocess.Popen
    url: str
    log_path: Path
    model: str
    adapters_dir: Path | None
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=timeout)

    def openai(self, **kwargs):
        import openai

        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0, **kwargs
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@dataclass
class PendingServer:
    """A ``trainserve serve`` child process that was started and may not be serving yet."""

    proc: subprocess.Popen
    log_path: Path
    model: str
    adapters_dir: Path | None
    api_key: str | None
    timeout: float
    started: float
    _ready: ServerProcess | None = None

    def ready(self) -> ServerProcess:
        """Wait (until ``timeout`` after the start) for it to serve and answer /health."""
        if self._ready is not None:
            return self._ready
        deadline = self.started + self.timeout
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            match = re.search(r"serving .* at (http://\S+)", self.log_path.read_text(errors="replace"))
            if match:
                url = match.group(1)
                break
            time.sleep(0.25)
        if url is None:
            self.proc.kill()
            raise RuntimeError(f"server did not start in {self.timeout} s:\n{self.log_path.read_text()[-4000:]}")
        server = ServerProcess(self.proc, url, self.log_path, self.model, self.adapters_dir, self.api_key)
        with server.client() as c:
            assert c.get("/health").status_code == 200
        self._ready = server
        return server


def launch_server(
    extra_args: list[str],
    adapters_dir: Path | None = None,
    api_key: str | None = None,
    timeout: float = 240.0,
    model: str | None = None,
) -> PendingServer:
    """Start ``python -m trainserve.cli serve <model, default the tiny one> ... --port 0`` (not waiting)."""
    from trainserve import tiny_model

    model = model or tiny_model()
    log_dir = Path(tempfile.mkdtemp(prefix="trainserve-server-log-"))
    log_path = log_dir / "server.log"
    args = [
        sys.executable,
        "-m",
        "trainserve.cli",
        "serve",
        model,
        "--port",
        "0",
        "--max-model-len",
        "256",
        "--max-lora-rank",
        "16",
        "--log-level",
        "info",
        *extra_args,
    ]
    if adapters_dir is not None:
        args += ["--adapters-dir", str(adapters_dir)]
    if api_key is not None:
        args += ["--api-key", api_key]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    return PendingServer(proc, log_path, model, adapters_dir, api_key, timeout, time.monotonic())


def start_server(
    extra_args: list[str],
    adapters_dir: Path | None = None,
    api_key: str | None = None,
    timeout: float = 240.0,
    model: str | None = None,
) -> ServerProcess:
    """Start ``python -m trainserve.cli serve <model, default the tiny one> ... --port 0`` and wait for /health."""
    return launch_server(extra_args, adapters_dir, api_key, timeout, model).ready()


_PENDING: dict[str, PendingServer] = {}


def prestart(config, launches: dict[str, Callable[[], PendingServer]]) -> None:
    """Start every server of ``launches`` (key → launch) not started yet, all at once, then wait
    until they serve, so that their starts overlap each other and no test. A server that fails to
    start raises when its module claims it, not here."""
    started = {key: launch() for key, launch in launches.items() if key not in _PENDING}
    _PENDING.update(started)
    if started:
        config.add_cleanup(_stop_unclaimed)
    for pending in started.values():
        try:
            pending.ready()
        except Exception:  # raised again by claim()
            pass


def claim(key: str, launch: Callable[[], PendingServer]) -> ServerProcess:
    """The server prestarted under ``key``, or one started now by ``launch``; the caller stops it."""
    pending = _PENDING.pop(key, None) or launch()
    return pending.ready()


def _stop_unclaimed() -> None:
    while _PENDING:
        _, pending = _PENDING.popitem()
        if pending.proc.poll() is None:
            pending.proc.kill()
            pending.proc.wait(30)


def dedicated_launches(session) -> dict[str, Callable[[], PendingServer]]:
    """``DEDICATED_SERVER`` of each test module in this session (keyed by module name)."""
    modules = {getattr(item, "module", None) for item in session.items}
    return {m.__name__: m.DEDICATED_SERVER for m in modules if hasattr(m, "DEDICATED_SERVER")}


_SHARED: dict[str, object] = {}
SHARED_MAX_REQUEST_BYTES = 256 * 1024  # the shared server's --max-request-bytes


def shared_server(config, session=None) -> ServerProcess:
    """The session's shared server (adapters ``a1``, ``a2`` in its adapters dir; fast polling),
    started with the dedicated servers of ``session``'s modules (see the module docstring)."""
    if "server" not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="trainserve-shared-"))
        config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))

        def launch() -> PendingServer:
            adapters = root / "adapters"
            adapters.mkdir()
            make_adapter(adapters / "a1", seed=1)
            make_adapter(adapters / "a2", seed=2)
            return launch_server(
                ["--adapter-poll-interval", "0.2", "--max-request-bytes", str(SHARED_MAX_REQUEST_BYTES)],
                adapters_dir=adapters,
            )

        prestart(config, {"shared": launch, **(dedicated_launches(session) if session is not None else {})})
        server = claim("shared", launch)
        _SHARED["server"] = server
        config.add_cleanup(server.stop)
    return _SHARED["server"]  # type: ignore[return-value]


def complete(
    client: httpx.Client, model: str, prompt: str = PROMPTS[0], max_tokens: int = 12, **extra
) -> dict:
    """A greedy non-streaming completion (raises on an HTTP error)."""
    r = client.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra},
    )
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def bad_adapter(good: str | os.PathLike, out_dir: str | os.PathLike, kind: str) -> str:
    """A broken copy of the adapter ``good``: ``kind`` says how it is broken."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    shutil.copytree(good, out)
    cfg_path, weights = out / "adapter_config.json", out / "adapter_model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    tensors = load_file(str(weights))
    first_a = next(k for k in tensors if "lora_A" in k)
    if kind == "rank":  # r=32 > --max-lora-rank 16, tensors consistent with it
        cfg["r"] = cfg["lora_alpha"] = 32
        tensors = {
            k: (torch.randn(32, v.shape[1]) if "lora_A" in k else torch.randn(v.shape[0], 32)) * 0.1
            for k, v in tensors.items()
        }
    elif kind == "targets":
        cfg["target_modules"] = ["q_proj", "attn_c_proj"]
    elif kind == "shape":
        tensors[first_a] = torch.randn(tensors[first_a].shape[0], tensors[first_a].shape[1] + 8)
    elif kind == "nan":
        tensors[first_a][0, 0] = float("nan")
    elif kind == "inf":
        tensors[next(k for k in tensors if "lora_B" in k)][1, 1] = float("inf")
    elif kind == "no_weights":
        weights.unlink()
        tensors = None
    elif kind == "no_config":
        cfg_path.unlink()
        cfg = None
    elif kind == "corrupt_weights":
        weights.write_bytes(weights.read_bytes()[:200])
        tensors = None
    elif kind == "corrupt_config":
        cfg_path.write_text('{"r": 8, "target_modules": ')
        cfg = None
    elif kind == "deep_config":  # json.loads raises RecursionError, not a ValueError
        cfg_path.write_text("[" * 100_000 + "]" * 100_000)
        cfg = None
    elif kind == "bad_alpha":
        cfg["lora_alpha"] = "lots"
    elif kind == "string_alpha":  # float("16") works, vLLM's alpha / r does not
        cfg["lora_alpha"] = "16"
    elif kind == "huge_b":  # finite weights whose update overflows the activations
        tensors = {k: v * 1e30 if "lora_B" in k else v for k, v in tensors.items()}
    elif kind == "huge_alpha":
        cfg["lora_alpha"] = 1e38
    elif kind == "no_lora_b":
        del tensors[first_a.replace("lora_A", "lora_B")]
    elif kind == "rank_pattern":  # says rank 4 for q_proj, the tensors have rank 8
        cfg["rank_pattern"] = {"q_proj": 4}
    else:
        raise ValueError(kind)
    if cfg is not None:
        cfg_path.write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors, str(weights))
    return str(out)
