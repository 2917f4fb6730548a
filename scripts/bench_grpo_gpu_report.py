"""Metrics, results file and markdown table of the GPU GRPO benchmark.

Why a merge: each device call must finish within 10 minutes, so arms run one per invocation;
every invocation appends its runs to the same ``grpo_<gpu>_<shape>_<date>.json`` and the table is
built from the newest successful run of each arm found there (the newest failure if none
succeeded), so the table always covers every arm measured so far.

Several GPUs (``--nproc N``, issue 13): such a run is recorded as ``<arm>@<N>gpu`` (``nproc``,
``world_size`` and ``global_batch`` in the record), so the same arm on 1 and on N GPUs are two rows of
one file. Every GPU does one 1-GPU step's work (64 completions) per optimizer step, so "steps/min per
GPU" — per-GPU completions per minute over the 64 completions of a 1-GPU step — equals steps/min for
such runs, and the per-GPU scaling is the N-GPU arm's steps/min per GPU over the same arm's 1-GPU
value (issue 13's target: >= 0.92). The "vs" ratios compare runs with the same number of GPUs.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path
from typing import Any

ARM_ORDER = ("trainserve_int4", "trainserve_int4_overlap", "trainserve_bnb", "trainserve_bnb_overlap",
             "trainserve_fp8", "trainserve_fp8_overlap", "trainserve_fp8_block", "trainserve_fp8_block_overlap",
             "trainserve_int8", "trainserve_int8_overlap",
             "trainserve_bf16", "trainserve_bf16_overlap", "trl_colocate", "unsloth")
BASELINES = ("trl_colocate", "trainserve_bf16")
# Settings that must agree for two runs to sit in one table without a warning.
COMPARED_SETTINGS = ("steps", "warmup", "prompts_per_step", "generations", "completion_length", "prompt_length",
                     "max_seq_length", "gpu_memory_utilization", "lora_rank", "lora_alpha", "learning_rate",
                     "micro_batch", "is_correction")


def median_or_none(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def rounded(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def summarise(rec: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    """Rates over the steps after warm-up (overall, and from the median step) from the step records."""
    logged, out = rec.get("logged") or [], {}
    if logged:  # TRL's own per-step log lines
        out["reward_first"], out["reward_last"] = logged[0].get("reward"), logged[-1].get("reward")
        lengths = [x["completions/mean_length"] for x in logged[s["warmup"]:] if x.get("completions/mean_length")]
        out["completion_length_mean_logged"] = rounded(median_or_none(lengths), 1)
        swaps = [x["rollout/adapter_swap_ms"] for x in logged if x.get("rollout/adapter_swap_ms")]
        out["adapter_swap_ms_median"] = rounded(median_or_none(swaps), 2)
    steps = rec["steps"][s["warmup"]:]
    if not steps:
        return out
    span = sum(x["step_s"] for x in steps)
    roll_s = [x["rollout_s"] for x in steps if x.get("rollout_s")]
    train_ms = [(x["step_s"] - x["rollout_s"]) * 1e3 for x in steps if x.get("rollout_s")]
    peaks = [x["mem_peak_gib"] for x in steps if x.get("mem_peak_gib")]
    syncs = [x["weight_sync_s"] * 1e3 for x in steps if x.get("weight_sync_s") is not None]
    gen_only = [x for x in steps if x.get("rollout_s") and x.get("rollout_tokens") is not None
                and x.get("weight_sync_s") is not None and x["rollout_s"] > x["weight_sync_s"]]
    both = [x for x in steps if x.get("rollout_s") and x.get("rollout_tokens") is not None]
    comps = sum(x.get("completions") or 0 for x in both)
    return {
        **out,
        "measured_steps": len(steps),
        "steps_per_min": rounded(len(steps) / span * 60, 2),
        "steps_per_min_median": rounded(60 / statistics.median(x["step_s"] for x in steps), 2),
        "step_s_median": rounded(median_or_none([x["step_s"] for x in steps]), 3),
        "rollout_tokens_per_s": rounded(sum(x["rollout_tokens"] for x in both) / sum(x["rollout_s"] for x in both))
        if both else None,
        "rollout_tokens_per_s_median": rounded(median_or_none([x["rollout_tokens"] / x["rollout_s"] for x in both])),
        "rollout_tokens_per_s_excl_sync": rounded(sum(x["rollout_tokens"] for x in gen_only)
                                             / sum(x["rollout_s"] - x["weight_sync_s"] for x in gen_only))
        if gen_only else None,
        "rollout_ms_per_step": rounded(median_or_none([x * 1e3 for x in roll_s])),
        "train_ms_per_step": rounded(median_or_none(train_ms)),
        "weight_sync_ms_per_step": rounded(median_or_none(syncs)),
        "completion_length_mean": rounded(sum(x["rollout_tokens"] for x in both) / comps, 1) if comps else None,
        "peak_mem_step_max_gib": max(peaks, default=None),
        # the same peak split at the rollout (the KV cache's phase) and the training part (activations')
        "peak_mem_rollout_max_gib": max((x["mem_peak_rollout_gib"] for x in steps
                                         if x.get("mem_peak_rollout_gib")), default=None),
        "peak_mem_training_max_gib": max((x["mem_peak_training_gib"] for x in steps
                                          if x.get("mem_peak_training_gib")), default=None),
    }


def slug(device: str) -> str:
    """``NVIDIA H200`` → ``h200``; ``NVIDIA H100 80GB HBM3`` → ``h100-80gb-hbm3``."""
    s = re.sub(r"[^a-z0-9]+", "-", device.lower().replace("nvidia", "")).strip("-")
    return s or "unknown"


def load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        path.rename(path.with_suffix(".json.corrupt"))  # keep it for inspection, start a fresh file
        return {}


def merge(path: Path, header: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Append ``runs`` to the report at ``path`` (created if missing) and write it atomically."""
    report = load(path)
    report.setdefault("benchmark", "grpo_gpu")
    report.setdefault("first_run", header.get("date"))
    report.update({k: v for k, v in header.items() if k not in ("invocation", "invocations")})
    invocations = report.setdefault("invocations", [])
    for inv in [*header.get("invocations", []), *([header["invocation"]] if header.get("invocation") else [])]:
        if inv not in invocations:
            invocations.append(inv)
    seen = {_key(r) for r in report.setdefault("runs", [])}
    report["runs"].extend(r for r in runs if _key(r) not in seen)  # merging a file twice adds nothing
    report["summary"] = summary_rows(report["runs"])
    report["table"] = table(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return report


def _key(run: dict[str, Any]) -> tuple:
    if not run.get("finished_at"):
        return ("unique", id(run))
    return run.get("arm"), run.get("finished_at"), run.get("command")


def base_arm(name: str) -> str:
    return name.split("@", 1)[0]


def nproc_of(run: dict[str, Any]) -> int:
    return int(run.get("nproc") or 1)  # runs from before --nproc existed ran one process


def steps_per_min_per_gpu(run: dict[str, Any]) -> float | None:
    """Median-step steps/min in units of one GPU's 1-GPU step: per-GPU completions per minute / 64."""
    spm = run.get("steps_per_min_median")
    if not spm:
        return None
    s, n = run.get("settings") or {}, nproc_of(run)
    per_step = (s.get("prompts_per_step") or 8) * (s.get("generations") or 8)
    return round(spm * (run.get("global_batch") or per_step * n) / n / per_step, 2)


def latest_by_arm(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    def rank(run: dict[str, Any]) -> int:  # ok > stopped with measured steps > failed
        return 2 if run.get("ok") else 1 if run.get("steps_per_min_median") else 0

    best: dict[str, dict[str, Any]] = {}
    for run in runs:  # in order: a later run replaces an earlier one unless it got less far
        arm = run.get("arm", "?")
        if arm not in best or rank(run) >= rank(best[arm]):
            best[arm] = run
    order = {a: i for i, a in enumerate(ARM_ORDER)}
    return dict(sorted(best.items(), key=lambda kv: (order.get(base_arm(kv[0]), len(order)), nproc_of(kv[1]))))


SUMMARY_KEYS = ("ok", "steps_per_min_median", "steps_per_min", "rollout_tokens_per_s", "rollout_tokens_per_s_median",
                "rollout_ms_per_step", "train_ms_per_step", "weight_sync_ms_per_step", "peak_mem_measured_gib",
                "peak_mem_run_gib", "peak_mem_startup_gib", "mem_baseline_gib", "torch_max_allocated_gib_measured",
                "startup_s", "model_load_s", "completion_length_mean", "reward_first", "reward_last",
                "gradient_checkpointing_mode", "measured_steps", "finished_at", "error", "nproc", "world_size",
                "global_batch", "peak_mem_measured_gib_per_gpu", "vllm_lora_kernel_configs")


def summary_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows, latest = [], latest_by_arm(runs)
    for arm, run in latest.items():
        row = {"arm": arm, **{k: run.get(k) for k in SUMMARY_KEYS}}
        suffix = arm[len(base_arm(arm)):]  # "@2gpu": compared with the baselines on as many GPUs
        for base in BASELINES:
            ref = latest.get(base + suffix, {})
            a, b = run.get("steps_per_min_median"), ref.get("steps_per_min_median") if ref.get("ok") else None
            row[f"steps_per_min_vs_{base}"] = round(a / b, 2) if a and b else None
        row["steps_per_min_per_gpu"] = steps_per_min_per_gpu(run)
        one = latest.get(base_arm(arm), {}) if nproc_of(run) > 1 else {}
        a, b = row["steps_per_min_per_gpu"], steps_per_min_per_gpu(one) if one.get("ok") else None
        row["per_gpu_scaling_vs_1gpu"] = round(a / b, 3) if a and b and nproc_of(one) == 1 else None
        rows.append(row)
    return rows


def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def _mem(run: dict[str, Any], key: str) -> str:
    """A peak in GiB; on several GPUs the maximum, then each GPU's own."""
    per = run.get(f"{key}_per_gpu")
    each = f" ({' / '.join(_f(v, 2) for v in per)})" if per and len(per) > 1 else ""
    return _f(run.get(key), 2) + each


def table(report: dict[str, Any]) -> str:
    """Markdown table of the newest run of each arm in ``report`` (ratios are of steps/min, median step)."""
    runs = latest_by_arm(report.get("runs", []))
    head = ("| arm | steps/min (median step) | steps/min (overall) | GPUs | steps/min per GPU "
            "| per-GPU scaling vs 1 GPU | vs TRL colocate | vs trainserve bf16 | rollout tok/s | rollout ms/step "
            "| train ms/step | peak GiB, measured steps | peak GiB, whole run "
            "| torch max alloc GiB | start-up s | completion len | reward first → last | checkpointing |")
    lines = [head, "|---|" + "---:|" * 15 + "---|---|"]
    rows = {r["arm"]: r for r in summary_rows(report.get("runs", []))}
    for arm, run in runs.items():
        err = (run.get("error") or "no result").replace("|", "\\|").replace("\n", " ")[:240]
        done = f" (after {len(run.get('steps', []))} steps)" if run.get("steps") else ""
        if not run.get("ok") and not run.get("steps_per_min_median"):
            lines.append(f"| {arm} | failed{done}: {err} |" + " |" * 16)
            continue
        label = arm if run.get("ok") else f"{arm} (stopped{done}: {err[:80]})"
        r = rows[arm]
        ratio = [_f(r.get(f"steps_per_min_vs_{b}"), 2) + ("×" if r.get(f"steps_per_min_vs_{b}") else "")
                 for b in BASELINES]
        scaling = _f(r.get("per_gpu_scaling_vs_1gpu"), 3) + ("×" if r.get("per_gpu_scaling_vs_1gpu") else "")
        lines.append(
            f"| {label} | {_f(run.get('steps_per_min_median'), 2)} | {_f(run.get('steps_per_min'), 2)} "
            f"| {nproc_of(run)} | {_f(r.get('steps_per_min_per_gpu'), 2)} | {scaling} | {ratio[0]} "
            f"| {ratio[1]} | {_f(run.get('rollout_tokens_per_s'), 0)} | {_f(run.get('rollout_ms_per_step'), 0)} "
            f"| {_f(run.get('train_ms_per_step'), 0)} | {_mem(run, 'peak_mem_measured_gib')} "
            f"| {_mem(run, 'peak_mem_run_gib')} | {_f(run.get('torch_max_allocated_gib_measured'), 2)} "
            f"| {_f(run.get('startup_s'), 1)} | {_f(run.get('completion_length_mean'), 1)} "
            f"| {_f(run.get('reward_first'), 3)} → {_f(run.get('reward_last'), 3)} "
            f"| {run.get('gradient_checkpointing_mode')} |")
    settings = {json.dumps({k: (run.get("settings") or {}).get(k) for k in COMPARED_SETTINGS}, sort_keys=True)
                for run in runs.values()}
    if len(settings) > 1:
        lines.append("\nWARNING: the arms above ran with different settings: " + " vs ".join(sorted(settings)))
    return "\n".join(lines)
