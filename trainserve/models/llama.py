"""Llama: the shared patched forward as is; any RoPE type (dynamic ones run transformers' rotary
forward, see :func:`trainserve.models.forwards.fast_rotary_forward`)."""

from __future__ import annotations

from trainserve.models.base import FastBaseModel

__all__ = ["FastLlamaModel"]


class FastLlamaModel(FastBaseModel):
    """Patch class for Llama (``LlamaForCausalLM``)."""

    model_type = "llama"
    _module = "transformers.models.llama.modeling_llama"
    _prefix = "Llama"
    _pre_patched = False
