"""KV-cache standby: give the KV cache's GPU memory to the trainer, only when the trainer runs.

With ``fast_inference=True`` on CUDA the engine starts with vLLM's sleep mode. The physical
memory behind the KV cache is unmapped *lazily*: not after each ``fast_generate`` but at the first
forward pass of the training model after a generation (a pre-hook on the model calls
:meth:`KVStandby.trainer_needs_memory`). Repeated generations, evaluation loops that only
generate, and the server therefore never pay for it; a training step always runs with the KV
cache's memory free. The next ``fast_generate`` maps the memory again first (the weights stay:
the trainer shares them). Standby is skipped while the engine loop serves in the background (HTTP).

Mapping ~50 GB again takes tens of milliseconds, which would sit between an optimizer step and the
first token of the next rollout. So when the loop has shown its pattern — the last optimizer step
was followed by a generation, as in GRPO — the next optimizer step starts mapping the memory in a
background thread, and the generation only waits for what is left of it. A forward after a step
(gradient accumulation) turns the prediction off again.

A trainer can ask for the mapping to start later, at its step's end (``prefetch_at_step_end``,
then :meth:`KVStandby.step_ended`; trainserve's ``GRPOTrainer`` does): after ``zero_grad()``, which
training loops run right after the optimizer step. Why: gradients are allocated during the
backward inside the cached blocks the activations just left, and a live tensor keeps its whole
cached segment from being returned. Mapping at the step itself left ~7 GiB of the step's freed
activations cached beside the KV cache for the whole rollout (7B int4 GRPO on an H200,
2026-12-01: 10.5 GiB unused in torch's cache at the rollout, 3.6 GiB at the first one). The
signal comes from the training thread: another thread reading ``.grad`` while ``zero_grad()``
frees it crashed the process (glibc heap corruption, same run).
"""

from __future__ import annotations

import threading
import time
from typing import Any


class KVStandby:
    """Releases the KV cache before training forwards and restores it before generations."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.enabled = bool(engine.spec.enable_sleep_mode)
        self.released = False
        self.freed_bytes = 0
        self.releases = 0
        self.restores = 0
        self.last_release_ms = 0.0
        self.last_restore_ms = 0.0
        self.last_wait_ms = 0.0  # how long the last generation waited for the KV cache
        self.prefetch_at_step_end = False  # a trainer calls step_ended() after zero_grad()
        self._prefetch_pending = False
        self.prefetches = 0
        self._after_step = False  # an optimizer step happened; nothing ran on the model since
        self._step_then_generate = False  # the last step was followed by a generation
        self._prefetch: threading.Thread | None = None
        self._prefetch_error: BaseException | None = None
        self._restore_lock = threading.Lock()

    def before_generate(self) -> None:
        """Make sure the KV cache is mapped (call before submitting requests)."""
        if self._after_step:
            self._step_then_generate, self._after_step = True, False
        t0 = time.perf_counter()
        self._prefetch_pending = False  # no step end came: map now, below
        self._join_prefetch()
        if self.released:
            self._restore()
        self.last_wait_ms = (time.perf_counter() - t0) * 1e3

    def _restore(self) -> None:
        from trainserve.engine import vllm_compat

        with self._restore_lock:
            if not self.released:
                return
            t0 = time.perf_counter()
            self.engine.loop.call(lambda: vllm_compat.restore_kv_cache(self.engine.llm))
            self.released = False
            self.restores += 1
            self.last_restore_ms = (time.perf_counter() - t0) * 1e3

    def on_optimizer_step(self) -> None:
        """After an optimizer step of the live adapter: start mapping the KV cache in the background
        when a generation is expected next, or, with ``prefetch_at_step_end``, at
        :meth:`step_ended` (see the module docstring)."""
        self._after_step = True
        if (not self.enabled or not self.released or not self._step_then_generate or self._prefetch is not None
                or self.engine.loop.background):
            return
        if self.prefetch_at_step_end:
            self._prefetch_pending = True
            return
        self._start_prefetch()

    def step_ended(self) -> None:
        """The training thread, after the step's ``zero_grad()``: start the mapping that
        :meth:`on_optimizer_step` left pending."""
        if self._prefetch_pending and self.released and self._prefetch is None:
            self._prefetch_pending = False
            self._start_prefetch()

    def _start_prefetch(self) -> None:
        def run() -> None:
            try:
                self._restore()
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller that waits for it
                self._prefetch_error = exc

        self.prefetches += 1
        self._prefetch = threading.Thread(target=run, name="trainserve-kv-prefetch", daemon=True)
        self._prefetch.start()

    def _join_prefetch(self) -> None:
        thread, self._prefetch = self._prefetch, None
        if thread is not None:
            thread.join()
        error, self._prefetch_error = self._prefetch_error, None
        if error is not None:
            raise error

    def after_generate(self) -> None:
        """Nothing to do: the KV cache stays mapped until the trainer needs the memory."""

    def trainer_needs_memory(self) -> None:
        """Release the KV cache if it is mapped and nothing runs on the engine (a training forward
        is about to start). Cheap when there is nothing to do: it runs before every forward."""
        self._prefetch_pending = False
        if self._after_step:  # a forward right after a step: not a rollout loop
            self._step_then_generate, self._after_step = False, False
        if self._prefetch is not None:
            self._join_prefetch()
        if not self.enabled or self.released or self.engine.loop.background:
            return
        from trainserve.engine import vllm_compat

        def release() -> None:
            if self.engine.loop.num_unfinished == 0:
                import torch

                torch.cuda.synchronize()
                self.freed_bytes = vllm_compat.release_kv_cache()
                self.released = True
                self.releases += 1

        t0 = time.perf_counter()
        self.engine.loop.call(release)
        self.last_release_ms = (time.perf_counter() - t0) * 1e3

    def check_weights_outside_kv_cache(self, tensors: Any) -> bool:
        """Turn standby off (with a warning) if any of ``tensors`` lies in memory that a release
        would unmap: weights placed in the KV cache's pool would silently lose their values.

        Returns whether standby stays enabled."""
        if not self.enabled:
            return False
        from trainserve.engine import vllm_compat

        ranges = vllm_compat.kv_cache_ranges()
        if not ranges:
            return True
        for t in tensors:
            ptr = t.data_ptr()
            if t.is_cuda and t.numel() and any(lo <= ptr < hi for lo, hi in ranges):
                import logging

                logging.getLogger("trainserve").warning(
                    "KV standby is off: engine weights were allocated in the KV cache's memory, which "
                    "standby would unmap")
                self.enabled = False
                return False
        return True

    def disable(self) -> None:
        """Keep the KV cache mapped from now on (e.g. when an HTTP server starts)."""
        self.before_generate()
        self.enabled = False


def install_trainer_hook(model: Any, standby: KVStandby) -> None:
    """Free the KV cache at the start of ``model``'s forward passes (no-op unless standby is on)."""
    if standby.enabled:
        model.register_forward_pre_hook(lambda module, args: standby.trainer_needs_memory())
