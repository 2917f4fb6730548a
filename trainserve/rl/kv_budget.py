"""Advice when the engine's KV cache is far larger than a GRPO trainer's rollouts can use.

Why it matters: with KV standby the cache's memory goes to the trainer during training steps, but
every rollout maps all of it again. So an oversized cache raises the rollout's device memory, and
the run's peak wherever the rollout sets it, without making anything faster. On an H200, 7B int4
GRPO went from a 26.0 to a 23.7 GiB peak at the same speed when ``gpu_memory_utilization`` went
from 0.1 to 0.085 (BENCHMARKS.md, seventh call series; then the rollout also sat beside the
training step's cached activations, which :class:`KVPrefetchAtStepEnd` has since removed). vLLM sizes
the cache from ``gpu_memory_utilization`` when the engine starts, before any trainer exists, so the
trainer can only say what to pass next time. Nothing is changed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger("trainserve")

GIB = 2**30
#: the advice keeps this much more than a rollout needs at most
MARGIN = 1.25
#: and speaks only when at least this much memory would come back
MIN_EXCESS_BYTES = 1 * GIB


@dataclass(frozen=True)
class KVAdvice:
    capacity_tokens: int
    needed_tokens: int
    excess_bytes: int
    utilization: float
    suggested_utilization: float

    def message(self) -> str:
        return (
            f"the engine's KV cache holds {self.capacity_tokens:,} tokens; this trainer's rollouts need at most "
            f"{self.needed_tokens:,} (generation_batch_size x max_model_len). The other "
            f"{self.excess_bytes / GIB:.1f} GiB are mapped again at every rollout and never used: they add to "
            f"the rollout's device memory (the run's peak wherever the rollout sets it). Load with "
            f"gpu_memory_utilization={self.suggested_utilization:g} (now {self.utilization:g}) to keep "
            f"{MARGIN:g}x what a rollout needs.")


def kv_bytes_per_token(hf_config: Any, kv_cache_dtype: str, dtype_bytes: int) -> int:
    """Bytes of K and V per token over all layers (attention layers of a plain decoder)."""
    text = getattr(hf_config, "text_config", None) or hf_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_value = 1 if str(kv_cache_dtype).startswith("fp8") else dtype_bytes
    return 2 * text.num_hidden_layers * kv_heads * head_dim * per_value


def kv_advice(capacity_tokens: int, needed_tokens: int, bytes_per_token: int, utilization: float,
              device_bytes: int) -> KVAdvice | None:
    """The advice, or None when the cache is not oversized (under 2x the need, or under 1 GiB to gain)."""
    keep = math.ceil(needed_tokens * MARGIN)
    excess = (capacity_tokens - keep) * bytes_per_token
    if capacity_tokens < 2 * needed_tokens or excess < MIN_EXCESS_BYTES:
        return None
    suggested = math.ceil((utilization - excess / device_bytes) * 200) / 200  # up to a multiple of 0.005
    if suggested >= utilization or suggested <= 0:
        return None
    return KVAdvice(capacity_tokens, needed_tokens, int(excess), utilization, suggested)


def advise_kv_cache(engine: Any, args: Any, hf_config: Any) -> KVAdvice | None:
    """Warn (once per trainer) when the running engine's KV cache is oversized for ``args``'
    rollouts; CUDA only (vLLM on the CPU sizes its cache in bytes, not from the utilisation)."""
    import torch

    if not torch.cuda.is_available():
        return None
    from trainserve.engine import vllm_compat

    spec = engine.spec
    batch = getattr(args, "generation_batch_size", None)
    if not isinstance(batch, int) or batch < 1:
        return None
    try:  # advice only: a vLLM that moved this internal must not stop training (the contract test says so)
        capacity = vllm_compat.kv_cache_tokens(engine.llm)
    except vllm_compat.VLLMInternalsChanged:
        logger.debug("no KV cache advice: vLLM does not report its cache size", exc_info=True)
        return None
    needed = batch * int(spec.max_model_len)
    dtype_bytes = 4 if str(spec.dtype) in ("float32", "float", "torch.float32") else 2
    advice = kv_advice(capacity, needed,
                       kv_bytes_per_token(hf_config, spec.kv_cache_dtype, dtype_bytes),
                       float(spec.gpu_memory_utilization),
                       torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    if advice is not None:
        logger.warning("GRPOTrainer: %s", advice.message())
    return advice


class KVPrefetchAtStepEnd(TrainerCallback):
    """Has KV standby map the cache again at the step's end instead of at its optimizer step.

    transformers' ``Trainer`` calls ``on_step_end`` right after ``model.zero_grad()``: by then the
    gradients that kept the activations' cached blocks alive are freed, so the mapping's
    ``empty_cache()`` can return those blocks (:mod:`trainserve.engine.standby` explains why it
    matters). Only for the duration of ``train()``; a loop of your own keeps mapping at the step.
    """

    def __init__(self, standby: Any):
        self.standby = standby

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.standby.prefetch_at_step_end = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.standby.step_ended()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.standby.prefetch_at_step_end = False
