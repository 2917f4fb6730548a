"""Model patching: one module per architecture plus the shared pieces.

* :mod:`.forwards` - the patched training forwards (named functions) every architecture shares;
* :mod:`.base` - :class:`~trainserve.models.base.FastBaseModel`, which installs them on one instance;
* :mod:`.attention` - the attention of the patched forward (SDPA / varlen, windows, packing);
* :mod:`.checkpointing` - per-layer gradient checkpointing, optionally offloaded to the CPU;
* :mod:`.llama`, :mod:`.qwen2`, :mod:`.qwen3`, :mod:`.mistral` - the per-architecture patch classes
  (subclasses of the base, never of each other).

This ``__init__`` imports nothing heavy: :func:`get_fast_model_class` imports an architecture's
module (and with it the training kernels) only when it is asked for. The Unsloth entry classes with
``from_pretrained`` (``trainserve.FastQwen2Model``...) are in :mod:`trainserve.fast_models`, which
subclasses these: they call the loader, and the loader uses these, so they cannot live here.
"""

from __future__ import annotations

import importlib

__all__ = ["PATCH_CLASSES", "get_fast_model_class"]

PATCH_CLASSES: dict[str, str] = {
    "llama": "trainserve.models.llama:FastLlamaModel",
    "qwen2": "trainserve.models.qwen2:FastQwen2Model",
    "qwen3": "trainserve.models.qwen3:FastQwen3Model",
    "mistral": "trainserve.models.mistral:FastMistralModel",
}
"""model_type -> ``module:class`` of its patch class."""


def get_fast_model_class(model_type: str) -> type:
    """The patch class for ``model_type`` (``FastQwen2Model`` for "qwen2", ...)."""
    if model_type not in PATCH_CLASSES:
        raise NotImplementedError(
            f"no fast training path for model_type {model_type!r} (supported: {', '.join(sorted(PATCH_CLASSES))})")
    module, name = PATCH_CLASSES[model_type].split(":")
    return getattr(importlib.import_module(module), name)
