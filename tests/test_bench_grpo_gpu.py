"""The GPU GRPO benchmark's harness (scripts/bench_grpo_gpu*.py), checked on CPU.

Why: the benchmark is run on a lent GPU with very little time, so it must work the first time.
The fast tests cover what needs no engine (config semantics, metrics, memory sampling, the merged
results file and its table). The end-to-end smoke run (the trainserve_bf16 arm on the tiny model,
2 steps, through ``bench_grpo.py --device cuda``, ~40 s on 2 cores) runs only with
``TRAINSERVE_BENCH_SMOKE=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.append(str(SCRIPTS))

import bench_grpo_gpu_arms as arms  # noqa: E402
import bench_grpo_gpu_report as report  # noqa: E402
from bench_grpo_gpu_memory import MemorySampler  # noqa: E402

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
               "weight_sync_s": 0.2} for p in (40.0, 42.5)]
    out = report.summarise({"steps": steps}, {"warmup": 1})
    assert out["measured_steps"] == 2 and out["steps_per_min"] == out["steps_per_min_median"] == 20.0
    assert out["rollout_tokens_per_s"] == 16384.0 and out["rollout_ms_per_step"] == 1000.0
    assert out["train_ms_per_step"] == 2000.0 and out["weight_sync_ms_per_step"] == 200.0
    assert out["completion_length_mean"] == 256.0 and out["peak_mem_step_max_gib"] == 42.5


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
    assert run["trainer_args"]["generation_batch_size"] == 64 and run["startup_s"] > 0
    assert run["rollout_tokens_per_s"] > 0 and 0 < run["completion_length_mean"] <= 8
    assert (tmp_path / "copy" / path.name).exists() and "| trainserve_bf16 |" in proc.stdout
