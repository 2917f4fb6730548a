"""KV-cache standby: give the KV cache's GPU memory to the trainer between rollouts.

With ``fast_inference=True`` on CUDA the engine starts with vLLM's sleep mode, and after each
``fast_generate`` the physical memory behind the KV cache is unmapped (weights stay: the trainer
shares them); the next ``fast_generate`` maps it again first. Training activations can use that
memory in between. Standby is skipped while the engine loop serves in the background (HTTP).
"""

from __future__ import annotations

import time
from typing import Any


class KVStandby:
    """Releases and restores one engine's KV cache around generations."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.enabled = bool(engine.spec.enable_sleep_mode)
        self.released = False
        self.freed_bytes = 0
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
        self.last_restore_ms = (time.perf_counter() - t0) * 1e3

    def after_generate(self) -> None:
        """Release the KV cache if nothing else is running on the engine."""
        if not self.enabled or self.released or self.engine.loop.background:
            return
        from trainserve.engine import vllm_compat

        def release() -> None:
            if self.engine.loop.num_unfinished == 0:
                import torch

                torch.cuda.synchronize()
                self.freed_bytes = vllm_compat.release_kv_cache()
                self.released = True

        t0 = time.perf_counter()
        self.engine.loop.call(release)
        self.last_release_ms = (time.perf_counter() - t0) * 1e3

    def disable(self) -> None:
        """Keep the KV cache mapped from now on (e.g. when an HTTP server starts)."""
        self.before_generate()
        self.enabled = False
