"""Machete schedule tuning (issue 11): the choice rules, the table, and that ``trainserve::machete_mm``
picks each batch size's schedule at run time under ``torch.compile`` with a symbolic batch size (as
vLLM compiles the model) — one graph, no recompilation per batch size.

The Machete kernel itself needs a Hopper GPU (``tests/gpu/test_machete_gpu.py``); here a stand-in
runner records which schedule each call asked for.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from trainserve.engine import machete_schedules as ms


class RecordingRunner:
    """Stands in for ``vllm_compat.MacheteRunner``: a dense GEMM that records the schedule asked for."""

    def __init__(self, dtype: torch.dtype, weight: torch.Tensor):
        self.dtype, self.weight, self.calls = dtype, weight, []

    def schedules(self) -> list[str]:
        return ["tile_a", "tile_b"]

    def mm(self, x2, qweight, scales, zf, group_size, schedule=None):
        self.calls.append((x2.shape[0], schedule))
        return x2 @ self.weight


@pytest.fixture()
def clean_tables(monkeypatch):
    monkeypatch.setattr(ms, "_TABLE", {})
    monkeypatch.setattr(ms, "_GAINS", {})
    monkeypatch.setattr(ms, "_RUNNERS", {})


def test_pick_uses_the_smallest_tuned_bucket_at_or_above_m() -> None:
    table = {1: None, 16: "a", 64: "b", 256: "c"}
    assert [ms.pick(table, m) for m in (1, 2, 16, 17, 64, 65, 256, 257, 4096)] == [
        None, "a", "a", "b", "b", "c", "c", None, None]
    assert ms.pick(None, 8) is None and ms.pick({}, 8) is None


def test_best_schedule_keeps_the_heuristic_unless_clearly_beaten() -> None:
    assert ms.best_schedule({None: 1.0, "a": 0.98}) is None  # 2% is within MIN_GAIN
    assert ms.best_schedule({None: 1.0, "a": 0.90, "b": 0.95}) == "a"
    assert ms.best_schedule({None: 1.0, "a": 1.5}) is None
    assert ms.best_schedule({"a": 2.0, "b": 1.0}) == "b"  # heuristic failed for this shape
    assert ms.best_schedule({}) is None


def test_tuning_switch(monkeypatch) -> None:
    monkeypatch.delenv("TRAINSERVE_MACHETE_TUNE", raising=False)
    assert ms.tuning_enabled()
    monkeypatch.setenv("TRAINSERVE_MACHETE_TUNE", "0")
    assert not ms.tuning_enabled()
    monkeypatch.setenv("TRAINSERVE_MACHETE_TUNE", "yes")
    with pytest.raises(ValueError, match="TRAINSERVE_MACHETE_TUNE must be 0 or 1, got 'yes'"):
        ms.tuning_enabled()


def _fake_timings(by_bucket: dict[int, dict]):
    def time_schedules(runner, qweight, scales, zf, group_size, m, reps=20):
        return by_bucket[m]
    return time_schedules


def test_tune_once_per_shape_and_report(monkeypatch, clean_tables) -> None:
    runner = RecordingRunner(torch.float32, torch.randn(128, 256))
    scales = torch.ones(2, 256)  # K = 2 groups of 64
    timings = {1: {None: 1e-5, "tile_a": 2e-5}, 64: {None: 4e-5, "tile_a": 3e-5, "tile_b": 3.5e-5}}
    calls = []

    def counting(*args, **kw):
        calls.append(args[-1])
        return _fake_timings(timings)(*args, **kw)

    monkeypatch.setattr(ms, "time_schedules", counting)
    table = ms.tune(runner, torch.empty(16, 256, dtype=torch.int32), scales, scales, 64, buckets=(1, 64))
    assert table == {1: None, 64: "tile_a"}
    assert ms.tune(runner, torch.empty(16, 256, dtype=torch.int32), scales, scales, 64, buckets=(1, 64)) is table
    assert calls == [1, 64]  # the second call for the same shape timed nothing
    report = ms.tuned_tables()["128x256 g64 float32"]
    assert report[64] == {"schedule": "tile_a", "heuristic_us": 40.0, "tuned_us": 30.0}
    assert report[1]["schedule"] is None


def test_op_picks_per_batch_size_inside_one_dynamic_graph(monkeypatch, clean_tables) -> None:
    """vLLM compiles with a symbolic batch size; the op must not specialise the graph on it, and each
    concrete batch must still get its bucket's schedule."""
    k, n, g = 128, 256, 64
    weight = torch.randn(k, n)
    runner = RecordingRunner(torch.float32, weight)
    timings = {m: {None: 1.0, "tile_a": 0.5 if m == 16 else 2.0, "tile_b": 0.5 if m == 64 else 2.0}
               for m in (1, 16, 64)}
    monkeypatch.setattr(ms, "time_schedules", _fake_timings(timings))
    scales = torch.ones(k // g, n)
    qweight = torch.empty(k // 8, n, dtype=torch.int32)
    ms.tune(runner, qweight, scales, scales, g, buckets=(1, 16, 64))
    ms.register_runner(runner)

    def layer(x):
        return torch.relu(ms.machete_mm(x, qweight, scales, scales, g)) * 2

    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, dynamic=True)
    for m in (3, 16, 40, 64, 300):
        x = torch.randn(m, k)
        torch.testing.assert_close(compiled(x), torch.relu(x @ weight) * 2)
    assert counter.frame_count == 1  # one graph for every batch size
    assert [c for c in runner.calls if c[0] in (3, 16, 40, 64, 300)] == [
        (3, "tile_a"), (16, "tile_a"), (40, "tile_b"), (64, "tile_b"), (300, None)]


@pytest.mark.engine
def test_machete_runner_tuned_call_goes_through_the_op(monkeypatch, clean_tables) -> None:
    from trainserve.engine.vllm_compat import MacheteRunner

    runner = MacheteRunner(torch.float32)
    recorded = RecordingRunner(torch.float32, torch.randn(128, 256))
    monkeypatch.setattr(runner, "mm", recorded.mm)
    ms.register_runner(runner)
    ms._TABLE[ms.table_key(128, 256, 64, torch.float32)] = {8: "tile_b"}  # noqa: SLF001 - test seeds the table
    scales, bias = torch.ones(2, 256), torch.randn(256)
    x = torch.randn(2, 3, 128)
    out = runner(x, torch.empty(16, 256, dtype=torch.int32), scales, scales, 64, bias, tuned=True)
    torch.testing.assert_close(out, x @ recorded.weight + bias)
    out = runner(x, torch.empty(16, 256, dtype=torch.int32), scales, scales, 64, None)
    assert recorded.calls == [(6, "tile_b"), (6, None)]
