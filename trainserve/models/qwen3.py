"""Qwen3: the shared fast path; its attention has a per-head RMSNorm on q and k (``q_norm``,
``k_norm``, applied before RoPE) and no q/k/v bias.

The shared attention forward applies the norms whenever the attention module has them, so Qwen3
needs no forward of its own: this class names the transformers classes. Sliding windows on some
layers only (``layer_types``) run in the trainer but are refused with the engine (the loader's
check), as for Qwen2.
"""

from __future__ import annotations

from trainserve.models.base import FastBaseModel

__all__ = ["FastQwen3Model"]


class FastQwen3Model(FastBaseModel):
    """Patch class for Qwen3 (``Qwen3ForCausalLM``)."""

    model_type = "qwen3"
    _module = "transformers.models.qwen3.modeling_qwen3"
    _prefix = "Qwen3"
    _pre_patched = False
