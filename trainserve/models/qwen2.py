"""Qwen2: the shared fast path plus Qwen2's rules (no RoPE scaling; sliding-window layers).

Qwen2's attention differs from Llama's only by q/k/v biases (handled by the fused projections)
and per-layer sliding windows (``config.layer_types``; the model forward builds a windowed mask
or varlen call for those layers). RoPE scaling is rejected: Qwen2 checkpoints are trained
without it, and the serving engine would not apply it either.
"""

from __future__ import annotations

from typing import Any

from trainserve.models.base import FastBaseModel

__all__ = ["FastQwen2Model"]


def rope_type(rope: Any) -> str | None:
    """The RoPE type named by a ``rope_scaling`` / ``rope_parameters`` value (None for none)."""
    if rope is None:
        return None
    if isinstance(rope, dict):
        return rope.get("rope_type") or rope.get("type")
    return str(rope)


class FastQwen2Model(FastBaseModel):
    """Patch class for Qwen2 (``Qwen2ForCausalLM``)."""

    model_type = "qwen2"
    _module = "transformers.models.qwen2.modeling_qwen2"
    _prefix = "Qwen2"
    _pre_patched = False

    @classmethod
    def validate_config(cls, config: Any, rope_scaling: Any = None) -> None:
        """Raise ValueError for RoPE scaling (argument or config) or a non-Qwen2 config."""
        super().validate_config(config)
        if rope_scaling is not None:
            raise ValueError(
                f"Qwen2 does not support RoPE scaling (rope_scaling={rope_scaling!r}); "
                "load Qwen2 models without rope_scaling"
            )
        for attr in ("rope_scaling", "rope_parameters"):
            rt = rope_type(getattr(config, attr, None))
            if rt not in (None, "default"):
                raise ValueError(
                    f"Qwen2 does not support RoPE scaling: config.{attr} has rope_type {rt!r}; "
                    "only the default RoPE is allowed for Qwen2"
                )
