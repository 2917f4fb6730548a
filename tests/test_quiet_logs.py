"""Quiet logs by default (``trainserve.logs``), the GRPO progress bar and plot, docs that run as written.

The slow checks run real commands (each imports torch, TRL and vLLM, most start an engine). Those
start together (``launched``; the two ``trainserve serve`` runs likewise), since much of a start is
one core importing modules: the commands are the same as run one by one, each in its own process
and directory, and each test still asserts on its own command's output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_LINE = re.compile(r"\b(INFO|WARNING|DEBUG) \d\d-\d\d \d\d:\d\d:\d\d \[")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_LEVEL", "TRAINSERVE_LOG_LEVEL")}
    env.update(extra)
    return env


@dataclass
class _Launch:
    """A command started in the background, its stdout and stderr going to files."""

    proc: subprocess.Popen
    out: Path
    err: Path

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out.read_text(),
                                           self.err.read_text())


def _launch(cmd: list[str], workdir: Path, cwd: Path | None = None) -> _Launch:
    workdir.mkdir(parents=True, exist_ok=True)
    out, err = workdir / "stdout.txt", workdir / "stderr.txt"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=_env(), cwd=cwd)
    return _Launch(proc, out, err)


def _doc_sample() -> str:
    """The GRPO sample of docs/grpo.md, as written ("" when the doc no longer has it)."""
    match = re.search(r"```python\n(from trainserve.logs import configure_logging.*?)```",
                      (ROOT / "docs/grpo.md").read_text(), re.S)
    return match.group(1) if match else ""


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """This module's slow command runs, all started at once (see the module docstring)."""
    root = tmp_path_factory.mktemp("quiet-logs")
    runs = {
        "grpo": _launch([str(ROOT / ".venv/bin/trainserve"), "grpo", "--steps", "1", "--batch-size", "8",
                         "--save-every", "0", "--no-plot", "--out", str(root / "grpo" / "run")], root / "grpo"),
        "verbose": _launch([sys.executable, "-c", _PROBE, "grpo", "--out", str(root / "verbose" / "run"),
                            "--verbose"], root / "verbose"),
    }
    if code := _doc_sample():
        runs["doc"] = _launch([sys.executable, "-c", code.replace("max_steps=60", "max_steps=1")], root / "doc",
                              cwd=root / "doc")
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


@pytest.mark.engine
def test_grpo_command_is_quiet_by_default(launched):
    proc = launched["grpo"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "starting the engine" in proc.stderr.splitlines()[0]  # says what it does before the slow imports
    assert "supports vLLM" not in log
    assert "parallel_mode" not in log
    assert len(VLLM_LINE.findall(log)) <= 1, log
    assert "Loading safetensors checkpoint shards" not in log
    assert len(re.findall(r"1/1 \[", log)) == 1, log  # the final bar is rendered once
    assert "{'loss'" not in log and "'reward'" not in log  # no raw transformers log dicts
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["steps"] == 1


_PROBE = """
import sys, trainserve.rl.cli as c
def fake_run(*a, **k):
    import trl.generation  # TRL warns about the vLLM version here
    import os
    print("VLLM_LOGGING_LEVEL=" + os.environ["VLLM_LOGGING_LEVEL"])  # vLLM reads it when the engine starts
    return {}
c.run_grpo = fake_run
from trainserve.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_verbose_flag_brings_the_messages_back(launched):
    proc = launched["verbose"].result(timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "supports vLLM" in log and "VLLM_LOGGING_LEVEL=INFO" in log, log


@pytest.mark.parametrize("level, vllm_level, quiet", [("info", "INFO", "False"), ("debug", "DEBUG", "False"),
                                                       ("warning", "ERROR", "True")])
def test_trainserve_log_level_applies_at_import(level, vllm_level, quiet):
    code = "import os, trainserve, trainserve.logs as l; print(os.environ['VLLM_LOGGING_LEVEL'], l._quiet)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(TRAINSERVE_LOG_LEVEL=level), check=True).stdout.split()
    assert out == [vllm_level, quiet]


def test_importing_trainserve_leaves_logging_alone():
    code = ("import os, warnings, trainserve, trainserve.logs as l; "
            "print(l._quiet, os.environ.get('VLLM_LOGGING_LEVEL'), "
            "any('TRL currently' in str(f[1] and f[1].pattern) for f in warnings.filters), "
            "'torch' in __import__('sys').modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                         check=True).stdout.split()
    # and torch is not imported yet: the command's first line comes before the slow imports
    assert out == ["None", "None", "False", "False"]


def test_progress_bar_renders_each_step_once_with_its_reward(capsys):
    from trainserve.rl.metrics import RewardProgressBar

    bar = RewardProgressBar()
    state = SimpleNamespace(is_world_process_zero=True, max_steps=3, global_step=0)
    control = SimpleNamespace(should_log=True)
    bar.on_train_begin(None, state, control)
    bar.bar.mininterval = 0  # draw every update (steps here take microseconds)
    for step, reward in ((1, 0.25), (2, 0.5), (3, 0.75)):
        state.global_step = step
        bar.on_step_end(None, state, control)
        bar.on_log(None, state, control, logs={"reward": reward, "rollout/tokens_per_s": 100.0})
    bar.on_train_end(None, state, control)
    err = capsys.readouterr().err
    assert len(re.findall(r"3/3 \[", err)) == 1, err
    for step, reward in ((1, "0.250"), (2, "0.500"), (3, "0.750")):
        assert re.search(rf"{step}/3 \[[^\r]*reward={reward}", err), err


def test_progress_bar_draws_the_final_state_even_after_a_fast_last_step(capsys):
    from trainserve.rl.metrics import RewardProgressBar

    bar = RewardProgressBar()
    state = SimpleNamespace(is_world_process_zero=True, max_steps=2, global_step=0)
    control = SimpleNamespace(should_log=True)
    bar.on_train_begin(None, state, control)
    for step in (1, 2):
        state.global_step = step
        bar.on_log(None, state, control, logs={"reward": 0.5})
    bar.on_train_end(None, state, control)
    err = capsys.readouterr().err
    assert len(re.findall(r"2/2 \[", err)) == 1 and err.endswith("\n"), err


def test_reward_plot_clips_band_integer_ticks_stable_colours(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from trainserve.rl.metrics import plot_rewards

    figs = []
    monkeypatch.setattr(plt, "close", figs.append)

    def plot(names):
        path = tmp_path / "m.jsonl"
        path.write_text("".join(json.dumps({"step": s, "reward_mean": 0.2 * s, "reward_std": 0.9,
                                            "rewards": {n: 0.1 * s for n in names}}) + "\n" for s in (1, 2, 3)))
        plot_rewards(str(path), str(tmp_path / "r.png"), reward_range=(0.0, 1.0))
        ax = figs[-1].axes[0]
        return ax, {line.get_label(): line.get_color() for line in ax.get_lines()}

    ax, colours = plot(["once", "target_word"])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() >= 0.0 and band.max() <= 1.0
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert colours["once"] != colours["target_word"]
    assert plot(["once", "target_word"])[1] == colours


@pytest.mark.engine
def test_grpo_doc_sample_runs_as_written(launched):
    code = _doc_sample()
    assert "dataset = " in code and "tiny_model()" in code and "max_steps=60" in code
    proc = launched["doc"].result()  # the sample with max_steps=1
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "supports vLLM" not in proc.stderr  # configure_logging() in the sample


def _serve_log(tmp_path, *extra: str) -> tuple[str, int]:
    """The whole output of a default ``trainserve serve`` of the tiny model: start-up, one chat
    request, SIGTERM. Returns (output, exit status)."""
    import signal
    import time

    import httpx

    from trainserve import tiny_model

    log_path = tmp_path / f"serve{len(extra)}.log"
    cmd = [str(ROOT / ".venv/bin/trainserve"), "serve", tiny_model(), "--port", "0", *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.monotonic() + 240
        while not (match := re.search(r"serving .* at (http://\S+)", log_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.25)
        body = {"model": tiny_model(), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{match.group(1)}/v1/chat/completions", json=body, timeout=60).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    return log_path.read_text(), code


@pytest.mark.engine
def test_serve_command_is_quiet_by_default_and_verbose_on_request(tmp_path):
    with ThreadPoolExecutor(2) as pool:  # both servers start together (see the module docstring)
        quiet, verbose = pool.submit(_serve_log, tmp_path), pool.submit(_serve_log, tmp_path, "--verbose")
        (log, code), (verbose_log, verbose_code) = quiet.result(), verbose.result()
    assert code == 0, log
    lines = log.splitlines()
    assert "trainserve serve: loading torch and vLLM, then starting the engine" in lines[0], log
    assert not VLLM_LINE.search(log), log
    for noise in ("Loading safetensors checkpoint shards", "Uvicorn running", "Started server process",
                  "Triton", "FutureWarning"):
        assert noise not in log, (noise, log)
    # start-up line, (torch's NUMA line on some CPUs,) engine started, URL, SIGTERM, stopped
    assert len(lines) <= 6 and "stopped" in lines[-1], log
    log, code = verbose_log, verbose_code
    assert code == 0 and len(VLLM_LINE.findall(log)) >= 5 and "Uvicorn running" in log, log
