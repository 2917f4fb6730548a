#!/usr/bin/env python3
"""GRPO side by side on the tiny model: trainserve's colocated engine vs TRL's own generation paths.

Variants, each in its own subprocess with the same model, LoRA, task, batch and seed:

* ``trainserve`` — ``trainserve.rl.GRPOTrainer``: rollouts from the colocated engine, live adapter.
* ``trl_vllm_colocate`` — ``trl.GRPOTrainer(use_vllm=True, vllm_mode="colocate")``: TRL starts its
  own vLLM in-process and pushes merged weights into it before each rollout.
* ``trl_transformers`` — ``trl.GRPOTrainer`` without vLLM (``model.generate``), for reference.

Per variant: steps/min and rollout tokens/s over the steps after ``--warmup`` (overall, and from the
median step / median rollout, which shrugs off stalls when other jobs share the CPU), where rollout
time is the time spent in TRL's generation hook (``_generate_single_turn``, weight sync included),
start-up time, peak RSS, and the reward of the first and last steps (a variant whose rollouts
ignore the trained weights does not learn). A variant that fails records its exact error. Writes
``benchmarks/results/grpo_cpu_<date>.json`` and ``.md``.

    .venv/bin/python scripts/bench_grpo.py --steps 30

``--device cuda`` runs the GPU benchmark instead (``scripts/bench_grpo_gpu.py``; the rest of the
command line goes to it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

VARIANTS = ("trainserve", "trl_vllm_colocate", "trl_transformers")
NOTES = (
    "Same tiny Qwen2 (fp32 checkpoint), LoRA r=16/alpha=32 on all 7 linear modules, toy task, 4 prompts x 8 "
    "generations x max 16 tokens per step, lr 5e-3, seed 0, bf16=False, no gradient checkpointing.",
    "trainserve: rollouts in the colocated engine that owns the base weights, adapter copied into its LoRA "
    "slot in memory (unmerged LoRA compute in vLLM), fp32.",
    "trl_vllm_colocate: TRL's own in-process vLLM (a second copy of the weights; vLLM chose bf16 on this CPU, "
    "TRL passes no dtype); before each rollout TRL merges the adapter and loads every weight into vLLM, and "
    "it runs an extra forward pass per step for its importance-sampling correction.",
    "trl_transformers: model.generate; no engine, no KV cache pool (hence the lower RSS).",
    "Rates leave out the first 3 steps; the machine's 2 cores are shared with other jobs, so medians of "
    "3 interleaved rounds are reported.",
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = dict(num_generations=8, per_device_train_batch_size=32, max_completion_length=16,
                learning_rate=5e-3, lora_rank=16, lora_alpha=32, seed=0, temperature=1.0, max_seq_length=256)


def _timed_trainer_class(base: type) -> type:
    """``base`` with its generation hook timed (seconds and completion tokens per call)."""

    class Timed(base):
        rollouts: list[tuple[float, int]] = []

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            t0 = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            type(self).rollouts.append((time.perf_counter() - t0, sum(len(c) for c in completion_ids)))
            return completion_ids, logprobs

    return Timed


def _config(out: str, steps: int, **extra: Any) -> Any:
    from trainserve.rl.toy_task import toy_config

    s = SETTINGS
    return toy_config(out, steps=steps, seed=s["seed"], learning_rate=s["learning_rate"],
                      num_generations=s["num_generations"],
                      per_device_train_batch_size=s["per_device_train_batch_size"],
                      max_completion_length=s["max_completion_length"], temperature=s["temperature"], **extra)


def _build(variant: str, model_path: str, out: str, steps: int) -> Any:
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainserve.rl.toy_task import toy_dataset, toy_reward_funcs

    s = SETTINGS
    if variant == "trainserve":
        from trainserve import FastLanguageModel
        from trainserve.rl import GRPOTrainer

        model, tok = FastLanguageModel.from_pretrained(
            model_path, max_seq_length=s["max_seq_length"], load_in_4bit=False, fast_inference=True,
            gpu_memory_utilization=0.3, max_lora_rank=s["lora_rank"])
        model = FastLanguageModel.get_peft_model(model, r=s["lora_rank"], lora_alpha=s["lora_alpha"],
                                                 target_modules=TARGETS, random_state=s["seed"])
        cls, args, peft_config = _timed_trainer_class(GRPOTrainer), _config(out, steps), None
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype="float32")
        tok = AutoTokenizer.from_pretrained(model_path)
        extra: dict[str, Any] = {}
        if variant == "trl_vllm_colocate":
            extra = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3,
                         vllm_max_model_length=s["max_seq_length"])
        cls, args = _timed_trainer_class(trl.GRPOTrainer), _config(out, steps, **extra)
        peft_config = LoraConfig(r=s["lora_rank"], lora_alpha=s["lora_alpha"], target_modules=TARGETS,
                                 task_type="CAUSAL_LM")
    return cls(model=model, reward_funcs=toy_reward_funcs(), args=args, train_dataset=toy_dataset(256),
               processing_class=tok, peft_config=peft_config)


def lora_overhead(model_path: str, out_json: str, reps: int = 12) -> None:
    """Diagnostic: one rollout's shape (4 prompts x 8 samples x 16 tokens) through the engine with the
    live adapter and with ``disable_adapter()`` (no LoRA compute), median ms of each."""
    from vllm import SamplingParams

    from trainserve import FastLanguageModel

    s = SETTINGS
    model, tok = FastLanguageModel.from_pretrained(
        model_path, max_seq_length=s["max_seq_length"], load_in_4bit=False, fast_inference=True,
        gpu_memory_utilization=0.3, max_lora_rank=s["lora_rank"])
    model = FastLanguageModel.get_peft_model(model, r=s["lora_rank"], lora_alpha=s["lora_alpha"],
                                             target_modules=TARGETS)
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True))["input_ids"]
               for q in ("What color is the sky?", "Tell me a joke.", "What is two plus two?", "Name a number.")]
    params = SamplingParams(n=8, max_tokens=16, min_tokens=16, logprobs=0)
    result = {}
    for label, adapter in (("live_adapter_ms", True), ("adapter_disabled_ms", False)):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            if adapter:
                model.fast_generate(prompts, sampling_params=params)
            else:
                with model.disable_adapter():
                    model.fast_generate(prompts, sampling_params=params)
            times.append(time.perf_counter() - t0)
        result[label] = round(statistics.median(times[2:]) * 1e3, 1)
    Path(out_json).write_text(json.dumps(result))


def worker(variant: str, model_path: str, steps: int, warmup: int, out_json: str) -> None:
    """Run one variant in this process and write its measurements to ``out_json``."""
    from transformers import TrainerCallback

    result: dict[str, Any] = {"variant": variant, "ok": False}
    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    t0 = time.perf_counter()
    try:
        trainer = _build(variant, model_path, f"/tmp/bench_grpo_{variant}", steps)
        result["startup_s"] = round(time.perf_counter() - t0, 2)
        trainer.add_callback(StepClock())
        train_start = time.perf_counter()
        trainer.train()
        rollouts = type(trainer).rollouts[warmup:]
        measured = step_ends[warmup:]
        span = measured[-1] - (step_ends[warmup - 1] if warmup else train_start)
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        marks = [train_start, *step_ends]
        step_s = [marks[i + 1] - marks[i] for i in range(warmup, len(step_ends))]
        result.update(
            ok=True, steps=len(step_ends), measured_steps=len(measured),
            steps_per_min=round(len(measured) / span * 60, 1),
            steps_per_min_median=round(60 / statistics.median(step_s), 1),
            rollout_tokens_per_s=round(sum(n for _, n in rollouts) / sum(t for t, _ in rollouts), 1),
            rollout_tokens_per_s_median=round(statistics.median(n / t for t, n in rollouts), 1),
            rollout_ms_per_step=round(statistics.median(t for t, _ in rollouts) * 1e3, 1),
            step_seconds=[round(x, 3) for x in step_s],
            reward_first5=round(statistics.fmean(rewards[:5]), 3),
            reward_last5=round(statistics.fmean(rewards[-5:]), 3),
        )
    except Exception as exc:  # recorded, not hidden: the report says why a variant could not run
        result.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    Path(out_json).write_text(json.dumps(result, indent=2))


NUMERIC = ("steps_per_min_median", "steps_per_min", "rollout_tokens_per_s_median", "rollout_tokens_per_s",
           "rollout_ms_per_step", "startup_s", "peak_rss_mib", "reward_first5", "reward_last5")


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: the median of each metric over its successful runs (or its first error)."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        ok = [r for r in runs if r.get("ok")]
        if not ok:
            rows.append({"variant": variant, "ok": False, "runs": len(runs), "error": runs[0].get("error")})
            continue
        row = {k: round(statistics.median(r[k] for r in ok), 1 if "reward" not in k else 3) for k in NUMERIC}
        rows.append({"variant": variant, "ok": True, "runs": len(ok), **row})
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | runs | steps/min (median step) | steps/min (overall) | rollout tok/s (median) "
             "| rollout tok/s (overall) | rollout ms/step | start-up s | peak RSS MiB "
             "| reward first5 → last5 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("ok"):
            lines.append(f"| {r['variant']} | {r['runs']} | {r['steps_per_min_median']} | "
                         f"{r['steps_per_min']} | {r['rollout_tokens_per_s_median']} | "
                         f"{r['rollout_tokens_per_s']} | "
                         f"{r['rollout_ms_per_step']} | {r['startup_s']} | {r['peak_rss_mib']} | "
                         f"{r['reward_first5']} → {r['reward_last5']} |")
        else:
            error = (r.get("error") or "no result").replace("|", "\\|").splitlines()[0][:300]
            lines.append(f"| {r['variant']} | failed | | | | | | | | {error} |")
    return "\n".join(lines)


def main() -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    known, rest = pre.parse_known_args()
    if known.device == "cuda":  # the GPU benchmark (issue 11) has its own arms and options
        sys.path.append(str(Path(__file__).resolve().parent))
        import bench_grpo_gpu

        return bench_grpo_gpu.main(rest)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the GPU benchmark, scripts/bench_grpo_gpu.py (see its --help)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the rates")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, variants interleaved")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per variant")
    parser.add_argument("--worker", choices=(*VARIANTS, "lora_overhead"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "lora_overhead":
        lora_overhead(args.model, args.json)
        return 0
    if args.worker:
        worker(args.worker, args.model, args.steps, args.warmup, args.json)
        return 0

    from trainserve import tiny_model

    model_path = tiny_model()
    date = dt.date.today().isoformat()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    for round_ in range(1, args.repeat + 1):
        for variant in args.variants:
            tmp = out_dir / f".grpo_{variant}.json"
            cmd = [sys.executable, __file__, "--worker", variant, "--model", model_path,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", str(tmp)]
            print(f"== round {round_}: {variant}", flush=True)
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                failed = {"variant": variant, "ok": False,
                          "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
                result = json.loads(tmp.read_text()) if tmp.exists() else failed
            except subprocess.TimeoutExpired:
                result = {"variant": variant, "ok": False, "error": f"timed out after {args.timeout} s"}
            tmp.unlink(missing_ok=True)
            results.append({"round": round_, **result})
            print(json.dumps({k: v for k, v in result.items() if k not in ("traceback", "step_seconds")}),
                  flush=True)
    summary = summarise(results)
    diagnostics: dict[str, Any] = {}
    if "trainserve" in args.variants:
        tmp = out_dir / ".grpo_lora_overhead.json"
        cmd = [sys.executable, __file__, "--worker", "lora_overhead", "--model", model_path, "--json", str(tmp)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        diagnostics["engine_lora_overhead"] = (json.loads(tmp.read_text()) if tmp.exists()
                                               else {"error": proc.stderr[-2000:]})
        tmp.unlink(missing_ok=True)
        print(json.dumps(diagnostics), flush=True)
    report = {
        "date": date, "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "settings": {**SETTINGS, "steps": args.steps, "warmup_steps_excluded": args.warmup,
                     "model": "tiny Qwen2"},
        "summary": summary,
        "diagnostics": diagnostics,
        "notes": NOTES,
        "results": results,
    }
    table = _table(summary)
    (out_dir / f"grpo_cpu_{date}.json").write_text(json.dumps(report, indent=2))
    lora = diagnostics.get("engine_lora_overhead", {})
    extra = (f"\nOne rollout (32 x 16 tokens) in the trainserve engine: {lora['live_adapter_ms']} ms with the "
             f"live LoRA adapter, {lora['adapter_disabled_ms']} ms with it disabled.\n"
             if "live_adapter_ms" in lora else "")
    notes = "\n".join(f"- {n}" for n in NOTES)
    (out_dir / f"grpo_cpu_{date}.md").write_text(
        f"# GRPO on the tiny model, CPU ({date})\n\n`{report['command']}`\n\n{table}\n{extra}\n{notes}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
