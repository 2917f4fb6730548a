"""Mistral: the Llama layout (no q/k/v bias) with a sliding window on every layer.

transformers' ``MistralModel`` applies ``config.sliding_window`` (when set) to all layers; the shared
model forward does the same (:func:`trainserve.models.forwards.layer_kinds`: the windowed mask or
varlen call), and vLLM's engine applies the same window, so trainer and engine agree for prompts
longer than the window too (tested on CPU).
"""

from __future__ import annotations

from typing import Any

from trainserve.models.base import FastBaseModel

__all__ = ["FastMistralModel"]


class FastMistralModel(FastBaseModel):
    """Patch class for Mistral (``MistralForCausalLM``)."""

    model_type = "mistral"
    _module = "transformers.models.mistral.modeling_mistral"
    _prefix = "Mistral"
    _pre_patched = False

    @classmethod
    def validate_config(cls, config: Any, rope_scaling: Any = None) -> None:
        """Refuse a Mistral config with ``layer_types``: transformers' ``MistralModel`` ignores them (one
        window for all layers) while vLLM and the shared forward would follow them."""
        super().validate_config(config)
        if getattr(config, "layer_types", None):
            raise ValueError("a Mistral config with layer_types (alternating attention) is not supported: "
                             "transformers' MistralModel ignores them; remove layer_types from config.json")
