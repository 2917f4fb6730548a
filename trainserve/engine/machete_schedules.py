"""Per-shape Machete schedules, timed once while the engine loads, chosen per batch size at run time.

Why: Machete picks its CUTLASS schedule (tile shape, cluster, stream-K or not) with a heuristic
written for H100 and vLLM's common shapes. At decode batches of 16–256 on an H200 it left int4 no
faster than bf16 at the 7B shape (docs/quantization.md), while the kernel has a few dozen
schedules to choose from. Timing each of them on each layer shape costs about a second per
distinct shape at load time and is redone nowhere else.

Why a custom op: vLLM traces the model with ``torch.compile`` with the batch size symbolic, so
choosing a schedule in Python from ``x.shape[0]`` inside the traced code would specialise the
graph on it. ``trainserve::machete_mm`` is opaque to the tracer; its CUDA implementation looks the
schedule up with the concrete batch size when it runs — also while vLLM captures its CUDA graph for
that batch size, so each captured graph holds the tuned kernel.

The table is keyed by ``(K, N, group size, dtype)`` and a batch bucket (the smallest tuned batch
≥ M; above the largest, Machete's own heuristic). ``None`` in the table means "the heuristic",
kept whenever no schedule beats it by more than :data:`MIN_GAIN`.

``TRAINSERVE_MACHETE_TUNE=0`` turns the tuning off (Machete's heuristic everywhere).
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

logger = logging.getLogger("trainserve")

BUCKETS: tuple[int, ...] = (1, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
"""Batch sizes tuned; a decode step of M tokens uses the schedule of the smallest bucket ≥ M."""

MIN_GAIN = 0.03
"""A schedule replaces the heuristic only when it is this much faster (timing noise is ~1%)."""

Key = tuple[int, int, int, torch.dtype]

_TABLE: dict[Key, dict[int, str | None]] = {}
_GAINS: dict[Key, dict[int, tuple[float, float]]] = {}  # bucket -> (heuristic µs, chosen µs), for reports
_RUNNERS: dict[torch.dtype, Any] = {}


def tuning_enabled() -> bool:
    """``TRAINSERVE_MACHETE_TUNE``: ``1`` (default) or ``0``; anything else is an error."""
    value = os.environ.get("TRAINSERVE_MACHETE_TUNE", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"TRAINSERVE_MACHETE_TUNE must be 0 or 1, got {value!r}")
    return value == "1"


def pick(table: dict[int, str | None] | None, m: int) -> str | None:
    """The schedule for a batch of ``m`` rows: that of the smallest tuned bucket ≥ m, else None."""
    if not table:
        return None
    buckets = sorted(table)
    i = bisect.bisect_left(buckets, m)
    return table[buckets[i]] if i < len(buckets) else None


def best_schedule(times: dict[str | None, float], min_gain: float = MIN_GAIN) -> str | None:
    """The fastest schedule of ``{schedule: seconds}`` (``None`` = the heuristic), or ``None`` when it
    does not beat the heuristic by ``min_gain``; schedules that failed are absent."""
    if not times:
        return None
    fastest = min(times, key=lambda s: times[s])
    heuristic = times.get(None)
    if heuristic is not None and times[fastest] > heuristic * (1 - min_gain):
        return None
    return fastest


def _gpu_seconds(fn: Callable[[], Any], reps: int) -> float:
    """GPU time of one call: the better of two back-to-back runs of ``reps`` calls (CUDA events)."""
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / reps)
    return best


def time_schedules(runner: Any, qweight: torch.Tensor, scales: torch.Tensor, zf: torch.Tensor,
                   group_size: int, m: int, reps: int = 10) -> dict[str | None, float]:
    """Seconds per call of every schedule Machete offers (and of its heuristic, key ``None``) at batch
    ``m``; a schedule that raises for this shape is left out."""
    x = torch.randn(m, scales.shape[0] * group_size, device=qweight.device, dtype=runner.dtype)
    times: dict[str | None, float] = {}
    for schedule in [None, *runner.schedules()]:
        def call(s: str | None = schedule) -> torch.Tensor:
            return runner.mm(x, qweight, scales, zf, group_size, s)
        try:
            times[schedule] = _gpu_seconds(call, reps)
        except RuntimeError:
            continue
    return times


def tune(runner: Any, qweight: torch.Tensor, scales: torch.Tensor, zf: torch.Tensor, group_size: int,
         buckets: Sequence[int] = BUCKETS) -> dict[int, str | None]:
    """Time every schedule for this layer's shape at each bucket and remember the winners (once per
    shape and dtype); returns the table for the shape."""
    key = table_key(scales.shape[0] * group_size, scales.shape[1], group_size, runner.dtype)
    _RUNNERS.setdefault(runner.dtype, runner)
    if key in _TABLE:
        return _TABLE[key]
    started = time.perf_counter()
    table: dict[int, str | None] = {}
    gains: dict[int, tuple[float, float]] = {}
    for m in buckets:
        times = time_schedules(runner, qweight, scales, zf, group_size, m)
        table[m] = best_schedule(times)
        if None in times:
            gains[m] = (round(times[None] * 1e6, 2), round(times[table[m]] * 1e6, 2))
    _TABLE[key], _GAINS[key] = table, gains
    logger.debug("Machete schedules for K=%d N=%d (%.1f s): %s", key[0], key[1],
                 time.perf_counter() - started, table)
    return table


def table_key(k: int, n: int, group_size: int, dtype: torch.dtype) -> Key:
    return (int(k), int(n), int(group_size), dtype)


def tuned_tables() -> dict[str, dict[int, dict[str, Any]]]:
    """Every table tuned in this process, for benchmark reports: ``{"KxN g<group> <dtype>": {bucket:
    {"schedule": name or None, "heuristic_us": ..., "tuned_us": ...}}}``."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for (k, n, g, d), table in _TABLE.items():
        gains = _GAINS.get((k, n, g, d), {})
        out[f"{k}x{n} g{g} {str(d).removeprefix('torch.')}"] = {
            m: {"schedule": s, "heuristic_us": gains.get(m, (None, None))[0], "tuned_us": gains.get(m, (None, None))[1]}
            for m, s in table.items()}
    return out


def register_runner(runner: Any) -> None:
    """Make ``runner`` the one ``trainserve::machete_mm`` calls for its dtype (tuned or not)."""
    _RUNNERS.setdefault(runner.dtype, runner)


def _machete_mm_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zf: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    runner = _RUNNERS[x.dtype]
    key = table_key(x.shape[1], scales.shape[1], group_size, x.dtype)
    return runner.mm(x, qweight, scales, zf, group_size, pick(_TABLE.get(key), x.shape[0]))


def _machete_mm_fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zf: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], scales.shape[1])


def _define_op() -> torch.library.Library | None:
    """Define ``trainserve::machete_mm`` once per process (a second import of this module, e.g. from
    another path, finds it defined)."""
    if hasattr(torch.ops.trainserve, "machete_mm"):
        return None
    lib = torch.library.Library("trainserve", "FRAGMENT")
    lib.define("machete_mm(Tensor x, Tensor qweight, Tensor scales, Tensor zf, int group_size) -> Tensor")
    lib.impl("machete_mm", _machete_mm_impl, "CompositeExplicitAutograd")
    torch.library.register_fake("trainserve::machete_mm", _machete_mm_fake, lib=lib)
    return lib


_LIB = _define_op()


def machete_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zf: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """``x (M, K) @ W`` through Machete with the tuned schedule for M (the heuristic where untuned)."""
    return torch.ops.trainserve.machete_mm(x, qweight, scales, zf, group_size)
