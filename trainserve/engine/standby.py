"""KV-cache standby: give the KV cache's GPU memory to the trainer, only when the trainer runs.

With ``fast_inference=True`` on CUDA the engine starts with vLLM's sleep mode. The physical
memory behind the KV cache is unmapped *lazily*: not after each ``fast_generate`` but at the first
forward pass of the training model after a generation (a pre-hook on the model calls
:meth:`KVStandby.trainer_needs_memory`). Repeated generations, evaluation loops that only
generate, and the server therefore never pay for it; a training step always runs with the KV
cache's memory free. The next ``fast_generate`` maps the memory again first (the weights stay:
the trainer shares them). Standby is skipped while the engine loop serves in the background (HTTP).
"""

from __future__ import annotations

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

    def before_generate(self) -> None:
        """Make sure the KV cache is mapped (call before submitting requests)."""
        if not self.released:
            return
        from trainserve.engine import vllm_compat

        t0 = time.perf_counter()
        self.engine.loop.call(lambda: vllm_compat.restore_kv_cache(self.engine.llm))
        self.released = False
        self.restores += 1
        self.last_restore_ms = (time.perf_counter() - t0) * 1e3

    def after_generate(self) -> None:
        """Nothing to do: the KV cache stays mapped until the trainer needs the memory."""

    def trainer_needs_memory(self) -> None:
        """Release the KV cache if it is mapped and nothing runs on the engine (a training forward
        is about to start). Cheap when there is nothing to do: it runs before every forward."""
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

    def disable(self) -> None:
        """Keep the KV cache mapped from now on (e.g. when an HTTP server starts)."""
        self.before_generate()
        self.enabled = False


def install_trainer_hook(model: Any, standby: KVStandby) -> None:
    """Free the KV cache at the start of ``model``'s forward passes (no-op unless standby is on)."""
    if standby.enabled:
        model.register_forward_pre_hook(lambda module, args: standby.trainer_needs_memory())
