"""Where a GRPO training step's time goes: CUDA kernel time by category, for ``--profile-step N``.

Why: at the 7B shape trainserve's GRPO step is ~40% rollout and ~60% training (H200, FP8 per
channel: 1.58 s + 2.17 s), and the training part runs at about a third of what its GEMM FLOPs
need at the GPU's measured rates. Whether the rest is GEMMs at poor tile shapes, the LoRA terms,
casts, the activation quantiser, attention, the log-prob head, the optimizer, or an idle GPU while
Python launches kernels decides what to build next. ``torch.profiler`` starts when step N's
rollout returns (so only the training part of the step is recorded: the decode kernels are
profiled by ``profile_decode_kernels.py``) and stops at the step's end; the summary (categories,
GPU busy time against wall time, top kernels, top CPU operators) goes into the arm's result JSON.
"""

from __future__ import annotations

import sys
import time
from typing import Any

# First match wins; lower-cased kernel names. FP8 GEMMs name their element type (e4m3 / f8).
CATEGORIES = [
    ("gemm_fp8", ("e4m3", "f8f8", "_f8_", "fp8_gemm", "scaled_mm")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "wgmma")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("logprob_head", ("logprob", "log_softmax", "chunked", "cross_entropy", "_ce_rows")),
    ("act_quantize", ("_quantize_kernel",)),
    ("dequant", ("dequant",)),
    ("norm_rope_swiglu", ("rms", "norm", "rope", "rotary", "swiglu", "silu")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "fused_optimizer")),
    ("copy_cast", ("copy", "cast", "convert", "to_copy", "cat", "fill", "zero")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "triton_poi")),
    ("reduce", ("reduce", "sum", "norm_kernel", "triton_red")),
]


def category(name: str, categories: list[tuple[str, tuple[str, ...]]] = CATEGORIES) -> str:
    """The first category of ``categories`` one of whose keys occurs in the lower-cased kernel name."""
    low = name.lower()
    for cat, keys in categories:
        if any(k in low for k in keys):
            return cat
    return "other"


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Union length of ``(start, end)`` intervals in µs, as ms: the time the GPU ran at least one kernel."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e3


def idle_gaps(kernels: list[tuple[float, float]], cpu_ops: list[tuple[float, float, str]],
              min_gap_us: float = 50.0, top: int = 15) -> dict[str, Any]:
    """Where the GPU sat idle, and what the host was doing then.

    ``kernels``: GPU kernel ``(start, end)`` µs; ``cpu_ops``: top-level host operators (no parent)
    as ``(start, end, name)`` µs. Idle gaps of at least ``min_gap_us`` between the first and the
    last kernel are attributed to the operators overlapping them (by name, their overlap in ms);
    idle time no operator covers is ``"(python, no op)"``: interpreter time between operators
    (framework code, rewards, tokenisation). Also returns the ``top`` longest gaps with the names
    of the operators in them, and a histogram of gap lengths. Why: the training part of a 7B FP8
    step took ~270 ms longer than the GPU's work on a slower host; this says which host work it was.
    """
    merged: list[list[float]] = []
    for a, b in sorted(kernels):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    gaps = [(merged[i][1], merged[i + 1][0]) for i in range(len(merged) - 1)
            if merged[i + 1][0] - merged[i][1] >= min_gap_us]
    ops = sorted(cpu_ops)
    by_name: dict[str, float] = {}
    longest: list[tuple[float, float, list[str]]] = []
    hist = {"<0.2ms": 0, "0.2-1ms": 0, "1-5ms": 0, ">=5ms": 0}
    j = 0
    for g0, g1 in gaps:
        length = g1 - g0
        hist["<0.2ms" if length < 200 else "0.2-1ms" if length < 1000 else "1-5ms" if length < 5000 else ">=5ms"] += 1
        while j < len(ops) and ops[j][1] <= g0:  # ops are sorted by start; skip the ones that ended before
            j += 1
        covered, names = 0.0, []
        k = j
        while k < len(ops) and ops[k][0] < g1:
            a, b, name = ops[k]
            overlap = min(b, g1) - max(a, g0)
            if overlap > 0:
                by_name[name] = by_name.get(name, 0.0) + overlap / 1e3
                covered += overlap
                if name not in names:
                    names.append(name)
            k += 1
        if length - covered > 0:
            by_name["(python, no op)"] = by_name.get("(python, no op)", 0.0) + (length - covered) / 1e3
        longest.append((length, g0, names[:4]))
    longest.sort(key=lambda x: -x[0])
    t_first = merged[0][0] if merged else 0.0
    return {
        "idle_ms": round(sum(b - a for a, b in gaps) / 1e3, 1),
        "gaps": len(gaps),
        "gap_histogram": hist,
        "idle_ms_by_host_op": {n: round(v, 2) for n, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:25]},
        "longest_gaps": [{"ms": round(length / 1e3, 2), "at_ms": round((g0 - t_first) / 1e3, 1), "host_ops": names}
                         for length, g0, names in longest[:top]],
    }


class TrainingStepProfiler:
    """Profiles the training part of one optimizer step (from its rollout's return to the step's end)."""

    def __init__(self, step: int):
        self.step = step
        self._prof: Any = None
        self._t0 = 0.0

    def rollout_returned(self, step: int) -> None:
        if step != self.step or self._prof is not None:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def step_ended(self, step: int) -> dict[str, Any] | None:
        """Stop (after ``torch.cuda.synchronize()``) and summarise; None unless this was the profiled step."""
        if step != self.step or self._prof is None:
            return None
        import torch

        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self._t0) * 1e3
        self._prof.__exit__(None, None, None)
        return summarise(self._prof, wall_ms, self.step)


def summarise(prof: Any, wall_ms: float, step: int) -> dict[str, Any]:
    """The JSON summary of a finished ``torch.profiler.profile`` over ``wall_ms`` of step ``step``."""
    import torch

    by_cat: dict[str, float] = {}
    kernels: dict[str, list[float]] = {}
    intervals: list[tuple[float, float]] = []
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        dur = evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
        start = evt.time_range.start
        intervals.append((start, start + dur))
        cat = category(evt.name)
        by_cat[cat] = by_cat.get(cat, 0.0) + dur / 1e3
        k = kernels.setdefault(evt.name[:160], [0.0, 0])
        k[0] += dur / 1e3
        k[1] += 1
    busy = busy_ms(intervals)
    top_level = [(e.time_range.start, e.time_range.end, e.name[:100]) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CPU and getattr(e, "cpu_parent", None) is None]
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:40]
    cpu_ops = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0),
                     key=lambda e: -e.self_cpu_time_total)[:25]
    return {
        "step": step,
        "what": "training part of the step: from the rollout's return to the optimizer step's end",
        "wall_ms": round(wall_ms, 1),
        "gpu_busy_ms": round(busy, 1),
        "gpu_idle_share": round(1 - busy / wall_ms, 3) if wall_ms else None,
        "kernel_ms_by_category": {c: round(v, 1) for c, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "kernel_launches": sum(k[1] for k in kernels.values()),
        "top_kernels": [{"name": n, "ms": round(v[0], 2), "calls": v[1]} for n, v in top],
        "top_cpu_ops": [{"name": e.key[:120], "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
                         "calls": e.count} for e in cpu_ops],
        "idle": idle_gaps(intervals, top_level),
    }


def standby_since(marks: dict[str, Any]) -> dict[str, Any] | None:
    """trainserve arms: what KV standby did since the last call: releases and restores, the last
    release / restore time and how long the last generation waited for its KV cache (ms). The
    release runs at the first training forward with the GPU idle, so it is part of the step; the
    restore is prefetched at the step's end, after ``zero_grad()``. None for the peers or without an
    engine."""
    module = sys.modules.get("trainserve.engine.launch")
    engine = module.current_engine() if module is not None else None
    if engine is None:
        return None
    st = engine.standby
    now = {"releases": st.releases, "restores": st.restores, "prefetches": st.prefetches}
    last = marks.get("standby", {})
    marks["standby"] = now
    out: dict[str, Any] = {k: n - last.get(k, 0) for k, n in now.items()}
    out.update(enabled=st.enabled, release_ms=round(st.last_release_ms, 2), restore_ms=round(st.last_restore_ms, 2),
               wait_ms=round(st.last_wait_ms, 2))
    return out


def _counts_since(marks: dict[str, Any], key: str, module_name: str, counts: str) -> dict[str, int] | None:
    """How far the process-wide counters ``module_name.counts()`` moved since the last call with
    this ``key``; None when trainserve never imported that module (the peers' processes)."""
    module = sys.modules.get(module_name)
    if module is None:
        return None
    now = getattr(module, counts)()
    last = marks.get(key, {})
    marks[key] = now
    return {k: n - last.get(k, 0) for k, n in now.items()}


def attention_kinds_since(marks: dict[str, Any]) -> dict[str, int] | None:
    """trainserve arms: training forwards per attention kind since the last call (a ``masked``
    forward runs SDPA's fp32 math kernel: slow and large); None for the peers."""
    out = _counts_since(marks, "attention_kinds", "trainserve.models.attention", "attention_kind_counts")
    return None if out is None else {k: n for k, n in out.items() if n}


def shared_prefix_since(marks: dict[str, Any]) -> dict[str, int] | None:
    """trainserve arms: training forwards that computed shared prompt tokens once since the last call,
    with their real tokens and the tokens computed (trainserve/models/shared_prefix.py); None for the
    peers."""
    return _counts_since(marks, "shared_prefix", "trainserve.models.shared_prefix", "shared_prefix_stats")


def mlp_gate_up_since(marks: dict[str, Any]) -> dict[str, int] | None:
    """trainserve arms: MLP calls of training forwards since the last call that kept their gate|up
    activation and that recompute it in the backward (``TRAINSERVE_MLP_RECOMPUTE`` /
    ``TRAINSERVE_MLP_KEEP_GIB``, trainserve/models/mlp_memory.py); None for the peers."""
    return _counts_since(marks, "mlp_gate_up", "trainserve.models.mlp_memory", "gate_up_counts")
