"""The GPU GRPO benchmark's harness (scripts/bench_grpo_gpu*.py), checked on CPU.

Why: the benchmark is run on a lent GPU with very little time, so it must work the first time.
The fast tests cover what needs no engine (config semantics, metrics, memory sampling, the merged
results file and its table, and ``--nproc``: its checks, the torchrun command, the per-rank batch
under a world of 2, and the per-GPU scaling of a 1- and a 2-GPU run in one table). The end-to-end
smoke run (the trainserve_bf16 arm on the tiny model, 2 steps, through ``bench_grpo.py --device
cuda``, ~40 s on 2 cores) runs only with ``TRAINSERVE_BENCH_SMOKE=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.append(str(SCRIPTS))

import bench_grpo_gpu as bench  # noqa: E402
import bench_grpo_gpu_arms as arms  # noqa: E402
import bench_grpo_gpu_launch as launch  # noqa: E402
import bench_grpo_gpu_profile as profile  # noqa: E402
import bench_grpo_gpu_report as report  # noqa: E402
from bench_grpo_gpu_memory import MemorySampler, PhasePeaks  # noqa: E402

SETTINGS = dict(steps=4, warmup=1, prompts_per_step=8, generations=8, completion_length=16, prompt_length=32,
                max_seq_length=512, micro_batch=0, gpu_memory_utilization=0.5, learning_rate=5e-6,
                temperature=1.0, seed=0, lora_rank=16, lora_alpha=32, is_correction="default")


@pytest.mark.parametrize("micro, accumulation", [(0, 1), (16, 4)])
def test_one_optimizer_step_is_one_generation_of_64(tmp_path, micro, accumulation):
    for kind in ("trainserve", "trl", "unsloth"):
        args = arms.grpo_config({**SETTINGS, "micro_batch": micro}, kind, cuda=False, out_dir=str(tmp_path))
        assert args.generation_batch_size == 64 and args.num_generations == 8
        assert args.gradient_accumulation_steps == accumulation == args.steps_per_generation
        assert args.max_completion_length == 16 and args.learning_rate == 5e-6 and not args.bf16
        assert args.gradient_checkpointing is {"trainserve": False, "trl": True, "unsloth": True}[kind]
        assert args.use_vllm is (kind == "trl")
    trl_args = arms.grpo_config(SETTINGS, "trl", cuda=False, out_dir=str(tmp_path))
    assert (trl_args.vllm_mode, trl_args.vllm_gpu_memory_utilization, trl_args.vllm_max_model_length) == (
        "colocate", 0.5, 512)
    off = arms.grpo_config({**SETTINGS, "is_correction": "off"}, "trl", cuda=False, out_dir=str(tmp_path))
    assert off.vllm_importance_sampling_correction is False


def test_prompts_and_reward(tiny_path):
    texts, lengths = arms.prompt_texts(tiny_path, 16, 128)
    assert len(set(texts)) == 16 and all(t.endswith(" Answer:") for t in texts)
    assert all(120 <= n <= 136 for n in lengths), lengths
    assert arms.prompt_texts(tiny_path, 16, 128) == (texts, lengths)  # the same for every arm
    assert arms.length_reward(["", "a b", " ".join(["w"] * 100), [{"content": "a b c d"}]]) == [0, 2 / 64, 1, 4 / 64]


def test_summary_of_step_records():
    steps = [{"step_s": 9.0, "rollout_s": 8.0, "rollout_tokens": 100, "completions": 64}]  # warm-up
    steps += [{"step_s": 3.0, "rollout_s": 1.0, "rollout_tokens": 16384, "completions": 64, "mem_peak_gib": p,
               "weight_sync_s": 0.2, "mem_peak_rollout_gib": p - r, "mem_peak_training_gib": p - 2 + r}
              for p, r in ((40.0, 0), (42.5, 2))]
    out = report.summarise({"steps": steps}, {"warmup": 1})
    assert out["measured_steps"] == 2 and out["steps_per_min"] == out["steps_per_min_median"] == 20.0
    assert out["rollout_tokens_per_s"] == 16384.0 and out["rollout_ms_per_step"] == 1000.0
    assert out["train_ms_per_step"] == 2000.0 and out["weight_sync_ms_per_step"] == 200.0
    assert out["completion_length_mean"] == 256.0 and out["peak_mem_step_max_gib"] == 42.5
    assert out["peak_mem_rollout_max_gib"] == 40.5 and out["peak_mem_training_max_gib"] == 42.5


def test_step_profile_busy_time_and_kernel_categories():
    """``--profile-step``: GPU busy time is the union of kernel intervals (overlaps counted once),
    and kernels land in the categories the summary reports."""
    assert profile.busy_ms([(0, 1000), (500, 2000), (3000, 3500), (3100, 3200)]) == 2.5
    assert profile.busy_ms([]) == 0.0
    assert profile.category("nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_TNT") == "gemm"
    assert profile.category("sm90_xmma_gemm_e4m3bf16_e4m3f32") == "gemm_fp8"
    assert profile.category("_dequant_kernel") == "dequant"
    assert profile.category("_quantize_kernel") == "act_quantize"
    assert profile.category("pytorch_flash::flash_bwd_dq_dk_dv_loop") == "attention"
    assert profile.category("some_new_kernel") == "other"
    rec = profile.TrainingStepProfiler(3)
    rec.rollout_returned(2)  # not the profiled step: nothing starts (and no CUDA is touched)
    assert rec.step_ended(2) is None and rec.step_ended(3) is None


def test_idle_gaps_are_attributed_to_the_host_ops_running_in_them():
    """``--profile-step``'s idle analysis: gaps between kernels (overlaps merged, short gaps ignored)
    are charged to the top-level host operators overlapping them; what no operator covers is the
    interpreter's own time."""
    kernels = [(0, 100), (50, 300), (1300, 1400), (1420, 1500), (4500, 4600)]  # µs
    ops = [(200, 900, "aten::item"), (900, 1250, "LoraProjectionsFunction"), (1600, 2600, "Optimizer.step"),
           (5000, 6000, "after the last kernel")]
    r = profile.idle_gaps(kernels, ops, min_gap_us=50)
    assert r["gaps"] == 2 and r["idle_ms"] == 4.0  # 300→1300 and 1500→4500; the 20 µs gap is ignored
    assert r["idle_ms_by_host_op"] == {"(python, no op)": 2.05, "Optimizer.step": 1.0, "aten::item": 0.6,
                                       "LoraProjectionsFunction": 0.35}
    assert r["gap_histogram"] == {"<0.2ms": 0, "0.2-1ms": 0, "1-5ms": 2, ">=5ms": 0}
    assert r["longest_gaps"][0] == {"ms": 3.0, "at_ms": 1.5, "host_ops": ["Optimizer.step"]}
    assert r["longest_gaps"][1]["host_ops"] == ["aten::item", "LoraProjectionsFunction"]
    assert profile.idle_gaps([], ops)["idle_ms"] == 0.0


def test_memory_sampler_keeps_peaks_per_phase_and_step():
    values = iter([1, 5, 3, 2, 9, 4, 4, 4] + [4] * 1000)
    sampler = MemorySampler(interval_s=3600)  # no background samples: only the explicit ones below
    sampler._read, sampler.source, sampler.baseline = (lambda: next(values) * 2**30), "fake", 2**30
    sampler.start()  # 1
    sampler.sample()  # 5
    sampler.set_phase("measured")  # 3 (startup), 2 (measured)
    assert sampler.take_step_peak() == 9 * 2**30  # samples once more (9); a step's peak spans phases
    sampler.sample()  # 4
    assert sampler.take_step_peak() == 4 * 2**30
    sampler.stop()
    rep = sampler.report()
    assert rep["peak_mem_startup_gib"] == 5.0 and rep["peak_mem_measured_gib"] == 9.0
    assert rep["peak_mem_run_gib"] == 9.0 and rep["mem_baseline_gib"] == 1.0


def test_phase_peaks_split_each_step_at_its_rollout():
    """Training before the rollout and after it count as training; only the bracketed part as rollout."""
    used = {"v": 30}
    sampler = MemorySampler(interval_s=3600)
    sampler._read, sampler.source = (lambda: used["v"] * 2**30), "fake"
    phases = PhasePeaks(sampler)
    sampler.sample()  # model loading's peak, before training starts
    used["v"] = 5
    phases.start()  # 30 GiB stays out of the first step
    used["v"] = 7  # reward/loss work of the step before its rollout
    sampler.sample()
    with phases.rollout():
        used["v"] = 12
        sampler.sample()
        used["v"] = 9
    used["v"] = 20  # training activations
    sampler.sample()
    used["v"] = 6
    assert phases.step_ended() == {"mem_peak_rollout_gib": 12.0, "mem_peak_training_gib": 20.0}
    used["v"] = 8
    assert phases.step_ended() == {"mem_peak_rollout_gib": None, "mem_peak_training_gib": None}  # no rollout

    def rollout_on_another_thread() -> None:
        with phases.rollout():
            used["v"] = 50
            sampler.sample()

    worker = threading.Thread(target=rollout_on_another_thread)
    worker.start()
    worker.join()
    assert phases.step_ended() == {"mem_peak_rollout_gib": None, "mem_peak_training_gib": None}


def test_phase_peaks_read_torchs_unused_cache_around_the_rollout(monkeypatch):
    """On CUDA: torch's reserved-but-unused blocks at the rollout's start and end (the larger is
    reported), and what torch had allocated when it started."""
    state = {"allocated": 10 * 2**30, "reserved": 14 * 2**30}

    class FakeCuda:
        is_available = is_initialized = staticmethod(lambda: True)
        memory_allocated = staticmethod(lambda: state["allocated"])
        memory_reserved = staticmethod(lambda: state["reserved"])

    monkeypatch.setitem(sys.modules, "torch", type("FakeTorch", (), {"cuda": FakeCuda}))
    sampler = MemorySampler(interval_s=3600)
    sampler._read, sampler.source = (lambda: 2**30), "fake"
    phases = PhasePeaks(sampler)
    phases.start()
    with phases.rollout():  # 4 GiB unused at the start, 1.5 at the end
        state.update(allocated=16 * 2**30, reserved=17.5 * 2**30)
    rec = phases.step_ended()
    assert rec["torch_cache_unused_gib_rollout"] == 4.0 and rec["torch_allocated_gib_rollout_start"] == 10.0
    assert "torch_cache_unused_gib_rollout" not in phases.step_ended()  # per step
    monkeypatch.setattr(FakeCuda, "is_initialized", staticmethod(lambda: False))  # never initialise CUDA
    with phases.rollout():
        pass
    assert "torch_allocated_gib_rollout_start" not in phases.step_ended()


def test_gate_up_counts_per_step(monkeypatch):
    counts = {"kept": 3, "recomputed": 53}
    fake = type("FakeMlpMemory", (), {"gate_up_counts": staticmethod(lambda: dict(counts))})
    monkeypatch.setitem(sys.modules, "trainserve.models.mlp_memory", fake)
    marks: dict = {}
    assert profile.mlp_gate_up_since(marks) == {"kept": 3, "recomputed": 53}
    counts.update(kept=10, recomputed=102)
    assert profile.mlp_gate_up_since(marks) == {"kept": 7, "recomputed": 49}
    monkeypatch.delitem(sys.modules, "trainserve.models.mlp_memory")
    assert profile.mlp_gate_up_since(marks) is None  # a peer's process never imports it


def test_memory_sampler_without_a_gpu_reports_nothing():
    sampler = MemorySampler(0.01).start()
    sampler.stop()
    rep = sampler.report()
    if rep["mem_source"] is None:  # CPU machine
        assert rep["peak_mem_run_gib"] is None and rep["mem_samples"] == 0


def _run(arm, ok=True, spm=None, **extra):
    base = {"arm": arm, "ok": ok, "settings": {"steps": 12, "warmup": 2}}
    if ok:
        base.update(steps_per_min_median=spm, steps_per_min=spm, rollout_tokens_per_s=1000.0, startup_s=90.0,
                    peak_mem_measured_gib=40.0, reward_first=0.0, reward_last=0.1, gradient_checkpointing_mode=True)
    else:
        base.update(error="NotImplementedError: load_in_fp8=True | not yet", steps=[{}, {}])
    return {**base, **extra}


def test_results_accumulate_across_invocations_and_the_table_covers_every_arm(tmp_path):
    path = tmp_path / "grpo_h200_1.5b_2026-12-01.json"
    report.merge(path, {"date": "d", "invocation": {"command": "a"}}, [_run("trl_colocate", spm=4.0)])
    report.merge(path, {"date": "d", "invocation": {"command": "b"}},
                 [_run("trainserve_bf16", spm=6.0), _run("trainserve_fp8", ok=False)])
    data = report.merge(path, {"date": "d", "invocation": {"command": "c"}},
                        [_run("trl_colocate", ok=False), _run("trainserve_int4", spm=8.0),
                         _run("unsloth", ok=False, error="timed out after 500 s (at step 9)",
                              steps_per_min_median=3.0)])
    saved = json.loads(path.read_text())
    assert saved["table"] == data["table"] and len(saved["invocations"]) == 3 and len(saved["runs"]) == 6
    rows = {r["arm"]: r for r in saved["summary"]}
    assert rows["trl_colocate"]["ok"]  # a later failure does not hide the successful run
    assert rows["trainserve_int4"]["steps_per_min_vs_trl_colocate"] == 2.0
    assert rows["trainserve_int4"]["steps_per_min_vs_trainserve_bf16"] == 1.33
    lines = data["table"].splitlines()
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == [
        "trainserve_int4", "trainserve_fp8", "trainserve_bf16", "trl_colocate",
        "unsloth (stopped (after 2 steps): timed out after 500 s (at step 9))"]
    assert lines[0].count("|") == lines[1].count("|")
    fp8 = next(line for line in lines if line.startswith("| trainserve_fp8"))
    assert "failed (after 2 steps): NotImplementedError" in fp8
    assert fp8.replace("\\|", "").count("|") == lines[0].count("|")  # a failed row keeps the columns
    assert "| 3.00 |" in lines[-1]  # a run stopped at the time limit still shows its measured steps
    assert report.slug("NVIDIA H200") == "h200" and report.slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"


# ------------------------------------------------------------------ --nproc (issue 13: data parallel)


def test_nproc_is_checked_before_anything_starts(monkeypatch):
    assert bench.parse_args([]).nproc == 1 and bench.parse_args(["--nproc", "2"]).nproc == 2
    for bad in (["--nproc", "0"], ["--nproc", "-1"], ["--nproc", "2", "--dist-timeout", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert launch.check_nproc(1, "7b", 0) is None  # one process: nothing to check (no gloo probe either)
    assert launch.check_nproc(2, "7b", 2) is None and launch.check_nproc(2, "7b", 8) is None
    assert "must be at least 1" in launch.check_nproc(0, "7b", 2)
    assert "only 1 visible CUDA device(s)" in launch.check_nproc(2, "7b", 1)
    assert "only --shape tiny" in launch.check_nproc(2, "7b", 0, gloo=lambda: True)  # CPU: the tiny shape only
    assert "gloo" in launch.check_nproc(2, "tiny", 0, gloo=lambda: False)
    assert launch.check_nproc(2, "tiny", 0, gloo=lambda: True) is None
    # main refuses before it builds a checkpoint or starts an arm
    monkeypatch.setattr(bench, "visible_gpu_count", lambda: 1)
    monkeypatch.setattr(bench, "prepare_model", lambda *a, **k: pytest.fail("started something"))
    with pytest.raises(SystemExit, match="refused before starting anything: --nproc 2 but only 1 visible"):
        bench.main(["--shape", "7b", "--arms", "trainserve_int4", "--nproc", "2"])


def test_each_arm_records_its_host(monkeypatch, tmp_path):
    """Series on lent GPUs run on different hosts; the CPU model is what explains a trainserve-only
    difference in the training step (launch-bound parts), so every arm's record names it."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU 9000 @ 3.0GHz\nflags\t: fpu\n")
    real_path = launch.Path
    monkeypatch.setattr(launch, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    h = launch.host()
    assert h["cpu_model"] == "Example CPU 9000 @ 3.0GHz" and h["cpu_count"] == os.cpu_count()
    monkeypatch.setattr(launch, "Path", lambda p: tmp_path / "missing" if p == "/proc/cpuinfo" else real_path(p))
    assert launch.host()["cpu_count"] == os.cpu_count()  # no /proc/cpuinfo: the rest is still recorded


def test_torchrun_launch_command_and_environment():
    worker = ["--worker", "trainserve_int4", "--settings", "s.json", "--result", "r.json", "--t0", "1.5"]
    assert launch.worker_command(["/py", "-P"], "/b.py", worker, 1) == ["/py", "-P", "/b.py", *worker]
    assert launch.worker_command(["/py", "-P"], "/b.py", worker, 2) == [
        "/py", "-P", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "/b.py", *worker]
    assert launch.launch_env(1, 300, True) is None  # one process: the parent's environment, as before
    assert launch.launch_env(1, 300, True, gpus=1) is None
    # one process on a multi-GPU host sees one GPU (TRL's GRPOTrainer refuses nn.DataParallel)
    one_gpu = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}
    assert launch.launch_env(1, 300, True, env={"PATH": "/bin"}, gpus=2) == one_gpu
    assert launch.launch_env(1, 300, True, env={"CUDA_VISIBLE_DEVICES": "3, 5"}, gpus=2)["CUDA_VISIBLE_DEVICES"] == "3"
    env = launch.launch_env(2, 300, True, env={"RANK": "3", "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "5",
                                                "PATH": "/bin"}, cpus=32)
    assert "RANK" not in env and env["PATH"] == "/bin" and env["PYTHONSAFEPATH"] == "1"
    assert env["TRAINSERVE_DIST_TIMEOUT"] == "300" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["OMP_NUM_THREADS"] == "5"  # what the machine set is kept
    assert launch.launch_env(2, 300, False, env={}, cpus=32)["OMP_NUM_THREADS"] == "16"
    assert "PYTHONSAFEPATH" not in launch.launch_env(2, 300, False, env={})
    assert launch.run_name("trl_colocate", 1, 2) == "trl_colocate"
    assert launch.run_name("trl_colocate", 2, 2) == "trl_colocate@2gpu" and launch.run_name("a", 2, 0) == "a@2proc"
    assert launch.file_stem("trl_colocate@2gpu") == "trl_colocate_2gpu"
    log = ("[bench 10:00:01] trl_colocate[rank 1]: FAILED: RuntimeError: boom\n...\nRoot Cause (first observed "
           "failure):\n[0]:\n  time      : 2026-12-01_10:00:02\n  host      : h\n  rank      : 1 (local_rank: 1)"
           "\n  exitcode  : 3 (pid: 42)\n")
    assert launch.root_cause(log) == "torchrun: rank 1 failed first (exit code 3): RuntimeError: boom"
    assert launch.root_cause("Traceback ...") is None


def test_each_rank_generates_and_trains_the_one_gpu_batch(tmp_path, monkeypatch):
    import transformers

    assert launch.config_kwargs(SETTINGS, cuda=True) == {}  # one process: the config stays as it was
    monkeypatch.setattr(launch, "world_from_env", lambda env=None: (0, 2, 0))
    monkeypatch.setattr(transformers.TrainingArguments, "world_size", property(lambda self: 2))
    assert launch.config_kwargs({**SETTINGS, "dist_timeout": 120}, cuda=True) == {"ddp_timeout": 120}
    args = arms.grpo_config({**SETTINGS, "micro_batch": 16}, "trl", cuda=False, out_dir=str(tmp_path))
    # per rank: 16 x 4 accumulation = 64 completions = 8 prompts x 8; TRL's generation batch is global
    assert args.use_cpu and args.ddp_timeout == 300 and args.per_device_train_batch_size == 16
    assert args.gradient_accumulation_steps == args.steps_per_generation == 4
    assert args.generation_batch_size == 128 and args.num_generations == 8
    assert launch.check_batch(args, SETTINGS, 2) == 128
    with pytest.raises(ValueError, match="expected 64 completions per rank x 3 ranks"):
        launch.check_batch(args, SETTINGS, 3)


def test_memory_sampler_on_several_gpus_keeps_each_ones_peak():
    values = iter([[1, 2], [5, 3], [2, 7]] + [[2, 2]] * 1000)
    sampler = MemorySampler(interval_s=3600, devices=2)
    sampler._read, sampler.source, sampler.baselines = (lambda: [v * 2**30 for v in next(values)]), "fake", [0, 0]
    sampler.start()  # [1, 2]
    sampler.sample()  # [5, 3]
    sampler.set_phase("measured")  # [2, 7] (startup), [2, 2] (measured)
    assert sampler.take_step_peak() == 7 * 2**30 and sampler.step_per_gpu() == {"mem_peak_gib_per_gpu": [5.0, 7.0]}
    rep = sampler.report()
    assert rep["peak_mem_startup_gib"] == 7.0 and rep["peak_mem_startup_gib_per_gpu"] == [5.0, 7.0]
    assert rep["peak_mem_measured_gib_per_gpu"] == [2.0, 2.0] and rep["peak_mem_run_gib_per_gpu"] == [5.0, 7.0]
    assert MemorySampler(3600).step_per_gpu() == {}  # one GPU: the step records stay as they were


def test_table_shows_per_gpu_rate_and_scaling_of_one_and_two_gpu_runs(tmp_path):
    path = tmp_path / "grpo_h200_7b_2026-12-01.json"
    settings = {"steps": 12, "warmup": 2, "prompts_per_step": 8, "generations": 8}
    two = dict(nproc=2, world_size=2, global_batch=128, settings=settings)
    report.merge(path, {"date": "d", "invocation": {"command": "1gpu"}},
                 [_run("trainserve_int4", spm=14.0, nproc=1, global_batch=64, settings=settings),
                  _run("trl_colocate", spm=13.0, settings=settings)])  # an old record: no nproc field
    data = report.merge(path, {"date": "d", "invocation": {"command": "2gpu"}}, [
        _run("trainserve_int4@2gpu", spm=13.3, arm_base="trainserve_int4", peak_mem_measured_gib=21.0,
             peak_mem_measured_gib_per_gpu=[21.0, 20.5], **two),
        _run("trl_colocate@2gpu", spm=11.0, arm_base="trl_colocate", **two)])
    rows = {r["arm"]: r for r in data["summary"]}
    ts2 = rows["trainserve_int4@2gpu"]
    assert ts2["nproc"] == 2 and ts2["global_batch"] == 128 and ts2["steps_per_min_per_gpu"] == 13.3
    assert ts2["per_gpu_scaling_vs_1gpu"] == 0.95  # 13.3 / 14.0
    assert ts2["steps_per_min_vs_trl_colocate"] == 1.21  # vs TRL on as many GPUs (13.3 / 11.0)
    assert rows["trainserve_int4"]["steps_per_min_vs_trl_colocate"] == 1.08  # 14.0 / 13.0
    assert rows["trainserve_int4"]["per_gpu_scaling_vs_1gpu"] is None
    assert rows["trl_colocate@2gpu"]["per_gpu_scaling_vs_1gpu"] == 0.846
    lines = data["table"].splitlines()
    head = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == [
        "trainserve_int4", "trainserve_int4@2gpu", "trl_colocate", "trl_colocate@2gpu"]
    assert all(line.count("|") == lines[0].count("|") for line in lines[1:])
    cells = dict(zip(head, [c.strip() for c in lines[3].split("|")[1:-1]], strict=True))
    assert cells["GPUs"] == "2" and cells["steps/min per GPU"] == "13.30"
    assert cells["per-GPU scaling vs 1 GPU"] == "0.950×" and cells["vs TRL colocate"] == "1.21×"
    assert cells["peak GiB, measured steps"] == "21.00 (21.00 / 20.50)"
    one = dict(zip(head, [c.strip() for c in lines[2].split("|")[1:-1]], strict=True))
    assert one["GPUs"] == "1" and one["steps/min per GPU"] == "14.00" and one["per-GPU scaling vs 1 GPU"] == "–"


@pytest.mark.engine
@pytest.mark.skipif(os.environ.get("TRAINSERVE_BENCH_SMOKE") != "1", reason="set TRAINSERVE_BENCH_SMOKE=1 (~40 s)")
def test_smoke_run_through_bench_grpo_device_cuda(tmp_path):
    cmd = [sys.executable, str(SCRIPTS / "bench_grpo.py"), "--device", "cuda", "--shape", "tiny", "--arms",
           "trainserve_bf16", "--steps", "2", "--warmup", "1", "--completion-length", "8", "--prompt-length", "16",
           "--out", str(tmp_path), "--copy-to", str(tmp_path / "copy")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("grpo_*_tiny_*.json")
    run = json.loads(path.read_text())["runs"][0]
    assert run["ok"] and run["measured_steps"] == 1 and run["rollout_timer"] == "_generate_single_turn"
    assert run["host"]["cpu_count"] >= 1
    assert run["trainer_args"]["generation_batch_size"] == 64 and run["startup_s"] > 0
    assert run["rollout_tokens_per_s"] > 0 and 0 < run["completion_length_mean"] <= 8
    assert (tmp_path / "copy" / path.name).exists() and "| trainserve_bf16 |" in proc.stdout
    assert all(sum(step["mlp_gate_up"].values()) > 0 for step in run["steps"])  # training forwards counted
    assert isinstance(run["trainserve_env"], dict) and isinstance(run["vllm_lora_env"], dict)
    assert run["module_walks"]["elided_train_calls"] >= 1 and run["module_walks"]["cached_parameter_calls"] >= 1


def test_attention_kinds_are_reported_per_step_for_trainserve_arms(monkeypatch) -> None:
    """Each step's record says how many training forwards ran each attention kind (a ``masked``
    forward is SDPA's slow fp32 math kernel); peers, without trainserve imported, get None."""
    from trainserve.models import attention

    marks: dict = {}
    monkeypatch.delitem(sys.modules, "trainserve.models.attention")
    assert profile.attention_kinds_since(marks) is None
    monkeypatch.setitem(sys.modules, "trainserve.models.attention", attention)
    profile.attention_kinds_since(marks)  # the baseline
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    attention.build_attn_spec(mask, None, 2, 4, torch.device("cpu"))
    attention.build_attn_spec(None, None, 2, 4, torch.device("cpu"))
    attention.build_attn_spec(None, None, 2, 4, torch.device("cpu"))
    assert profile.attention_kinds_since(marks) == {"masked": 1, "causal": 2}
    assert profile.attention_kinds_since(marks) == {}


def test_standby_is_reported_per_step_for_trainserve_arms(monkeypatch) -> None:
    """Each trainserve step's record says how often KV standby released and restored the cache and
    how long the last release, restore and wait took; peers (no engine) get None."""
    import types

    from trainserve.engine import launch as engine_launch
    from trainserve.engine.standby import KVStandby

    marks: dict = {}
    monkeypatch.delitem(sys.modules, "trainserve.engine.launch")
    assert profile.standby_since(marks) is None
    monkeypatch.setitem(sys.modules, "trainserve.engine.launch", engine_launch)
    monkeypatch.setattr(engine_launch, "_CURRENT", None)
    assert profile.standby_since(marks) is None  # trainserve imported, no engine
    standby = KVStandby(types.SimpleNamespace(spec=types.SimpleNamespace(enable_sleep_mode=True)))
    monkeypatch.setattr(engine_launch, "_CURRENT", types.SimpleNamespace(standby=standby))
    assert profile.standby_since(marks)["releases"] == 0  # the baseline
    standby.releases, standby.restores, standby.prefetches = 2, 2, 1
    standby.last_release_ms, standby.last_restore_ms, standby.last_wait_ms = 12.345, 30.0, 0.5
    assert profile.standby_since(marks) == {"releases": 2, "restores": 2, "prefetches": 1, "enabled": True,
                                            "release_ms": 12.35, "restore_ms": 30.0, "wait_ms": 0.5}
    assert profile.standby_since(marks)["releases"] == 0


def test_profile_decode_sums_the_waits_of_the_engine_loop() -> None:
    import profile_decode_kernels

    class Evt:
        def __init__(self, name: str, us: float) -> None:
            self.name, self.self_cpu_time_total = name, us

    events = [Evt("cudaMemcpyAsync", 1500), Evt("aten::mm", 9000), Evt("cudaMemcpyAsync", 500),
              Evt("cudaEventSynchronize", 4000)]
    assert profile_decode_kernels.cpu_waits(events) == {"cudaEventSynchronize": [4.0, 1],
                                                        "cudaMemcpyAsync": [2.0, 2]}


def test_shared_prefix_counts_are_reported_per_step_for_trainserve_arms(monkeypatch) -> None:
    """Each step's record says how many training forwards computed shared prompts once, and how many
    tokens they computed of how many; peers, without trainserve's module imported, get None."""
    from trainserve.models import shared_prefix

    marks: dict = {}
    monkeypatch.delitem(sys.modules, "trainserve.models.shared_prefix")
    assert profile.shared_prefix_since(marks) is None
    monkeypatch.setitem(sys.modules, "trainserve.models.shared_prefix", shared_prefix)
    profile.shared_prefix_since(marks)  # the baseline
    monkeypatch.setenv("TRAINSERVE_SHARED_PREFIX", "1")  # on the CPU only when asked for
    ids = torch.tensor([[*range(3, 23), 5], [*range(3, 23), 6]])
    plan, _ = shared_prefix.plan_shared_prefix(ids, torch.ones_like(ids))
    assert plan is not None
    assert profile.shared_prefix_since(marks) == {"forwards": 1, "tokens": 42, "computed": 22}
    assert profile.shared_prefix_since(marks) == {"forwards": 0, "tokens": 0, "computed": 0}
