"""Qwen2: the shared fast path plus Qwen2's rules (RoPE scaling from config.json only; sliding-window layers).

Qwen2's attention differs from Llama's only by q/k/v biases (handled by the fused projections)
and per-layer sliding windows (``config.layer_types``; the model forward builds a windowed mask
or varlen call for those layers).

RoPE scaling: Qwen2 reaches long contexts with YaRN declared in the checkpoint's ``config.json``
(seed 001: 131,072 tokens; ``rope_scaling`` / ``rope_parameters`` with ``"rope_type": "yarn"``).
Such a config loads: transformers' rotary module computes YaRN's ``inv_freq`` and attention factor,
the patched rotary forward reads both (:func:`trainserve.models.forwards.fast_rotary_forward`), and
vLLM builds its YaRN rotary embedding from the same config, so trainer and engine apply the same RoPE
(the loader refuses, before the engine starts, RoPE the two would apply differently:
:func:`trainserve.rope_config.check_supported`). The ``rope_scaling=`` *argument* of
``from_pretrained`` stays refused for Qwen2, as Unsloth's seed 000 does: it would rescale a checkpoint
that was not trained for it; :data:`ROPE_ARGUMENT_REFUSED` says to use the config route instead.
"""

from __future__ import annotations

from typing import Any

from trainserve.models.base import FastBaseModel

__all__ = ["ROPE_ARGUMENT_REFUSED", "FastQwen2Model", "rope_argument_refused"]

ROPE_ARGUMENT_REFUSED = (
    "Qwen2 does not support the rope_scaling argument (rope_scaling={rope_scaling!r}), as Unsloth's "
    "FastQwen2Model: it would rescale a checkpoint not trained for it. For long context (YaRN), declare it in "
    "the checkpoint's config.json instead, e.g. \"rope_scaling\": {{\"type\": \"yarn\", \"factor\": 4.0, "
    "\"original_max_position_embeddings\": 32768}} (or the transformers-5 \"rope_parameters\" with "
    "\"rope_type\": \"yarn\" and \"rope_theta\") and raise max_position_embeddings to the context you need; "
    "trainer and engine then both apply it"
)
"""The refusal of ``rope_scaling=`` for Qwen2, pointing to the config.json route (``.format(rope_scaling=...)``)."""


def rope_argument_refused(rope_scaling: Any) -> ValueError:
    """The ``ValueError`` raised for ``from_pretrained(qwen2, rope_scaling=...)``."""
    return ValueError(ROPE_ARGUMENT_REFUSED.format(rope_scaling=rope_scaling))


class FastQwen2Model(FastBaseModel):
    """Patch class for Qwen2 (``Qwen2ForCausalLM``)."""

    model_type = "qwen2"
    _module = "transformers.models.qwen2.modeling_qwen2"
    _prefix = "Qwen2"
    _pre_patched = False

    @classmethod
    def validate_config(cls, config: Any, rope_scaling: Any = None) -> None:
        """Raise ValueError for a non-Qwen2 config or a ``rope_scaling`` argument; RoPE scaling that the
        config itself declares (YaRN) is allowed."""
        super().validate_config(config)
        if rope_scaling is not None:
            raise rope_argument_refused(rope_scaling)
