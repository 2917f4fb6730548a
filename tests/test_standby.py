"""KV standby's state machine (CPU: vLLM's sleep mode itself needs CUDA, so the unmap/map calls are
replaced by counters): generations never release, the first trainer forward after a generation
does, and the next generation maps the memory again."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from trainserve.engine import standby as standby_mod
from trainserve.engine import vllm_compat


def _engine(enabled: bool = True, background: bool = False):
    loop = SimpleNamespace(background=background, num_unfinished=0, call=lambda fn: fn())
    return SimpleNamespace(spec=SimpleNamespace(enable_sleep_mode=enabled), loop=loop, llm=None)


def test_release_is_lazy_and_once_per_generation(monkeypatch) -> None:
    calls = {"release": 0, "restore": 0}

    def release() -> int:
        calls["release"] += 1
        return 123

    def restore(llm) -> None:
        calls["restore"] += 1

    monkeypatch.setattr(vllm_compat, "release_kv_cache", release)
    monkeypatch.setattr(vllm_compat, "restore_kv_cache", restore)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    kv = standby_mod.KVStandby(_engine())
    model = torch.nn.Linear(4, 4)
    standby_mod.install_trainer_hook(model, kv)
    for _ in range(3):  # repeated generations: nothing to release or restore
        kv.before_generate()
        kv.after_generate()
    assert calls == {"release": 0, "restore": 0}
    model(torch.randn(2, 4))
    model(torch.randn(2, 4))
    assert calls == {"release": 1, "restore": 0} and kv.released and kv.freed_bytes == 123
    kv.before_generate()
    assert calls == {"release": 1, "restore": 1} and not kv.released
    model(torch.randn(2, 4))
    assert calls["release"] == 2


def test_no_release_when_disabled_busy_or_serving(monkeypatch) -> None:
    monkeypatch.setattr(vllm_compat, "release_kv_cache", lambda: (_ for _ in ()).throw(AssertionError("released")))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    standby_mod.KVStandby(_engine(enabled=False)).trainer_needs_memory()
    standby_mod.KVStandby(_engine(background=True)).trainer_needs_memory()
    busy = _engine()
    busy.loop.num_unfinished = 2
    kv = standby_mod.KVStandby(busy)
    kv.trainer_needs_memory()
    assert not kv.released
    model = torch.nn.Linear(2, 2)
    standby_mod.install_trainer_hook(model, standby_mod.KVStandby(_engine(enabled=False)))
    assert not model._forward_pre_hooks


def test_restore_is_prefetched_after_a_step_only_in_rollout_loops(monkeypatch) -> None:
    import threading

    calls = {"release": 0, "restore": 0}
    threads: list[str] = []

    def release() -> int:
        calls["release"] += 1
        return 1

    def restore(llm) -> None:
        calls["restore"] += 1
        threads.append(threading.current_thread().name)

    monkeypatch.setattr(vllm_compat, "release_kv_cache", release)
    monkeypatch.setattr(vllm_compat, "restore_kv_cache", restore)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    kv = standby_mod.KVStandby(_engine())
    model = torch.nn.Linear(2, 2)
    standby_mod.install_trainer_hook(model, kv)

    def cycle() -> None:  # generate, train forward, optimizer step
        kv.before_generate()
        model(torch.randn(1, 2))
        kv.on_optimizer_step()

    cycle()  # first step: no pattern seen yet, nothing prefetched
    assert kv.prefetches == 0 and kv.released
    cycle()  # the step before was followed by a generation: this step prefetches
    assert kv.prefetches == 1
    kv.before_generate()  # waits for the prefetch; no second restore
    assert not kv.released and threads[-1] == "trainserve-kv-prefetch"
    # gradient accumulation starts: the first step still predicts a generation (its predecessor was
    # followed by one) and prefetches; the forward that follows instead turns the prediction off
    model(torch.randn(1, 2))
    kv.on_optimizer_step()
    assert kv.prefetches == 2
    model(torch.randn(1, 2))
    assert kv.released
    restores = calls["restore"]
    kv.on_optimizer_step()
    model(torch.randn(1, 2))
    kv.on_optimizer_step()
    assert kv.prefetches == 2 and calls["restore"] == restores and kv.released


def test_weights_in_kv_cache_memory_turn_standby_off(monkeypatch) -> None:
    class FakeCuda:
        is_cuda = True

        def __init__(self, ptr: int) -> None:
            self.ptr = ptr

        def data_ptr(self) -> int:
            return self.ptr

        def numel(self) -> int:
            return 1

    monkeypatch.setattr(vllm_compat, "kv_cache_ranges", lambda: [(1000, 2000)])
    kv = standby_mod.KVStandby(_engine())
    assert kv.check_weights_outside_kv_cache([FakeCuda(10), FakeCuda(5000)]) and kv.enabled
    assert not kv.check_weights_outside_kv_cache([FakeCuda(10), FakeCuda(1500)]) and not kv.enabled



def test_a_trainer_moves_the_prefetch_to_its_step_end(monkeypatch) -> None:
    """With ``prefetch_at_step_end`` (trainserve's GRPOTrainer) the mapping starts at
    ``step_ended()``, after ``zero_grad()``; a generation or a forward that comes first does not
    wait for it."""
    import threading

    from trainserve.rl.kv_budget import KVPrefetchAtStepEnd

    restores: list[str] = []
    monkeypatch.setattr(vllm_compat, "release_kv_cache", lambda: 1)
    monkeypatch.setattr(vllm_compat, "restore_kv_cache", lambda llm: restores.append(threading.current_thread().name))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    kv = standby_mod.KVStandby(_engine())
    model = torch.nn.Linear(2, 2)
    standby_mod.install_trainer_hook(model, kv)
    callback = KVPrefetchAtStepEnd(kv)
    callback.on_train_begin(None, None, None)
    assert kv.prefetch_at_step_end

    def step() -> None:  # forward, optimizer step (its post hook), then the step's end
        model(torch.randn(1, 2))
        kv.on_optimizer_step()

    kv.before_generate()
    step()
    callback.on_step_end(None, None, None)
    kv.before_generate()  # the pattern: a step, then a generation
    assert restores == ["MainThread"]
    step()
    assert kv.released and kv.prefetches == 0 and len(restores) == 1  # nothing mapped at the step
    callback.on_step_end(None, None, None)
    kv._prefetch.join(timeout=5)
    assert restores[-1] == "trainserve-kv-prefetch" and not kv.released and kv.prefetches == 1
    kv.before_generate()
    assert len(restores) == 2
    step()  # a generation before the step's end: mapped at once, on the generating thread
    kv.before_generate()
    assert restores[-1] == "MainThread" and kv.prefetches == 1
    callback.on_step_end(None, None, None)  # too late: nothing left to do
    assert kv.prefetches == 1 and len(restores) == 3
    step()  # gradient accumulation: a forward before the step's end cancels the prediction
    model(torch.randn(1, 2))
    callback.on_step_end(None, None, None)
    assert kv.prefetches == 1 and kv.released
    callback.on_train_end(None, None, None)
    assert not kv.prefetch_at_step_end
