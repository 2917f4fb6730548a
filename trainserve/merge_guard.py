"""Refuse peft merges into base weights that a colocated vLLM engine serves.

With ``fast_inference=True`` the training model's base parameters *are* the engine's tensors
(views, in whatever format the engine holds them: 16-bit or quantized). peft's merges write the
LoRA delta into those tensors (or swap them for merged copies, for quantized layers), so
``merge_adapter()``, ``merge_and_unload()`` or a single ``lora_layer.merge()`` would silently
change what the engine serves as the base model — for every saved adapter, for later
``from_pretrained`` calls in the process, and for the trainer. The guard is keyed on "this
model's base is shared with an engine", never on tensor dtypes, so it holds for every format.

It is installed per instance (no peft class is modified): on the ``LoraModel`` (its
``_check_merge_allowed``, which peft runs first in ``merge_adapter`` and ``merge_and_unload``)
and on every LoRA layer (``merge``), again after ``add_adapter``/``load_adapter`` create layers.
``unmerge``/``unload()`` stay available: they never write merged weights.
"""

from __future__ import annotations

import types
import weakref
from typing import Any


class SharedBaseMergeError(RuntimeError):
    """A merge would have written into the base weights the colocated engine serves."""


def merge_refusal(what: str, model: Any = None) -> str:
    """The error message for a refused merge, naming the safe export routes (``model`` is unused,
    kept for callers that pass it)."""
    return (f"{what} would write the LoRA into the base weights that the colocated vLLM engine serves (the "
            "training model's base parameters are the engine's tensors), changing the base model, every saved "
            "adapter served on it and later from_pretrained() calls in this process. To export a merged model "
            "use model.save_pretrained_merged(dir, tokenizer) (it merges into a CPU copy and leaves the engine "
            "untouched), or model.save_lora(dir) and merge in a process without the engine: "
            "FastLanguageModel.from_pretrained(base, fast_inference=False), then "
            "peft.PeftModel.from_pretrained(model, dir).merge_and_unload().")


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def guard_merges(peft_model: Any) -> None:
    """Make every merge path of ``peft_model`` (a PEFT model over an engine-shared base) raise
    :class:`SharedBaseMergeError` before any weight is touched. Idempotent."""
    ref = weakref.ref(peft_model)

    def refuse(what: str) -> Any:
        def _refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
            raise SharedBaseMergeError(merge_refusal(what, ref()))
        return _refuse

    tuner = peft_model.base_model  # the LoraModel
    tuner.__dict__["_check_merge_allowed"] = types.MethodType(refuse("merging the adapter"), tuner)
    for layer in _lora_layers(peft_model):
        layer.__dict__["merge"] = types.MethodType(refuse("lora_layer.merge()"), layer)
    for name in ("add_adapter", "load_adapter"):  # new adapters may create new LoRA layers
        original = getattr(peft_model, name, None)
        if original is None or getattr(original, "_trainserve_guarded", False):
            continue

        def wrapped(*args: Any, __original: Any = original, **kwargs: Any) -> Any:
            result = __original(*args, **kwargs)
            model = ref()
            if model is not None:
                guard_merges(model)
            return result

        wrapped._trainserve_guarded = True  # type: ignore[attr-defined]
        peft_model.__dict__[name] = wrapped


def is_guarded(peft_model: Any) -> bool:
    """True if every LoRA layer of ``peft_model`` and its tuner refuse merges."""
    layers = _lora_layers(peft_model)
    return "_check_merge_allowed" in peft_model.base_model.__dict__ and all("merge" in m.__dict__ for m in layers)
