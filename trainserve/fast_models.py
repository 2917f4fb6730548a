"""``FastLlamaModel`` / ``FastMistralModel`` / ``FastQwen2Model`` / ``FastQwen3Model``: Unsloth's
per-architecture ``from_pretrained``.

Unsloth lets a script load through the architecture's class (``FastQwen2Model.from_pretrained``,
seed 000) instead of ``FastLanguageModel``. These classes are the patch classes of
:mod:`trainserve.models` (``models.llama``, ``models.qwen2``, ...) plus that entry point: the same load as
``FastLanguageModel.from_pretrained`` (engine, shared weights, every argument check), with the
class's defaults (``max_seq_length=4096``) and a refusal, before anything is loaded, of a
checkpoint of another architecture. They live here, not in :mod:`trainserve.models`, so that the
patch modules never import the loader (which imports them).
"""

from __future__ import annotations

from typing import Any

from trainserve.hf_kwargs import HfOptions, resolve_model_path
from trainserve.loader import FastLanguageModel
from trainserve.models import llama, mistral, qwen2, qwen3
from trainserve.reload import saved_adapter_base


def _model_type(model_name: str, kwargs: dict[str, Any]) -> str | None:
    """The ``model_type`` of what ``from_pretrained(model_name, **kwargs)`` would load (the base, for a
    saved adapter directory)."""
    from transformers import AutoConfig

    options = HfOptions(cache_dir=kwargs.get("cache_dir"), local_files_only=bool(kwargs.get("local_files_only")))
    revision, token = kwargs.get("revision"), kwargs.get("token")
    path = resolve_model_path(model_name, options, revision, token)
    path = saved_adapter_base(path) or path
    config = AutoConfig.from_pretrained(path, token=token, revision=revision,
                                        trust_remote_code=bool(kwargs.get("trust_remote_code")),
                                        cache_dir=options.cache_dir, local_files_only=options.local_files_only)
    return getattr(config, "model_type", None)


def _load(cls: type, model_name: str, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    model_type = _model_type(model_name, kwargs)
    if model_type != cls.model_type:
        raise ValueError(f"{cls.__name__}.from_pretrained loads model_type {cls.model_type!r}; {model_name!r} "
                         f"is {model_type!r}: use FastLanguageModel.from_pretrained, which picks the architecture")
    return FastLanguageModel.from_pretrained(model_name, **kwargs)


class _EntryPoints:
    """What every architecture class shares with ``FastLanguageModel`` besides ``from_pretrained``."""

    get_peft_model = staticmethod(FastLanguageModel.get_peft_model)
    for_training = staticmethod(FastLanguageModel.for_training)
    for_inference = staticmethod(FastLanguageModel.for_inference)


class FastLlamaModel(_EntryPoints, llama.FastLlamaModel):
    """Llama: the patch class plus ``from_pretrained`` / ``get_peft_model`` (Unsloth's ``FastLlamaModel``)."""

    @classmethod
    def from_pretrained(cls, model_name: str = "unsloth/llama-3-8b-bnb-4bit", max_seq_length: int = 4096,
                        dtype: Any = None, load_in_4bit: bool | None = None, **kwargs: Any) -> tuple[Any, Any]:
        """``FastLanguageModel.from_pretrained`` for a Llama checkpoint (or a LoRA saved on one); a
        checkpoint of another ``model_type`` is refused before anything loads."""
        return _load(cls, model_name, dict(max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
                                           **kwargs))


class FastQwen2Model(_EntryPoints, qwen2.FastQwen2Model):
    """Qwen2: the patch class plus ``from_pretrained`` / ``get_peft_model`` (seed 000).

    The ``rope_scaling`` argument is refused for Qwen2 (seed 000); YaRN declared in the checkpoint's
    config.json loads (see :mod:`trainserve.models.qwen2`)."""

    @classmethod
    def from_pretrained(cls, model_name: str = "Qwen/Qwen2-7B", max_seq_length: int = 4096, dtype: Any = None,
                        load_in_4bit: bool | None = None, rope_scaling: Any = None,
                        **kwargs: Any) -> tuple[Any, Any]:
        """``FastLanguageModel.from_pretrained`` for a Qwen2 checkpoint (or a LoRA saved on one); a
        checkpoint of another ``model_type`` or a ``rope_scaling`` is refused before anything loads."""
        if rope_scaling is not None:
            raise qwen2.rope_argument_refused(rope_scaling)
        return _load(cls, model_name, dict(max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
                                           **kwargs))


class FastQwen3Model(_EntryPoints, qwen3.FastQwen3Model):
    """Qwen3: the patch class plus ``from_pretrained`` / ``get_peft_model`` (Unsloth's ``FastQwen3Model``)."""

    @classmethod
    def from_pretrained(cls, model_name: str = "Qwen/Qwen3-8B", max_seq_length: int = 4096,
                        dtype: Any = None, load_in_4bit: bool | None = None, **kwargs: Any) -> tuple[Any, Any]:
        """``FastLanguageModel.from_pretrained`` for a Qwen3 checkpoint (or a LoRA saved on one); a
        checkpoint of another ``model_type`` is refused before anything loads."""
        return _load(cls, model_name, dict(max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
                                           **kwargs))


class FastMistralModel(_EntryPoints, mistral.FastMistralModel):
    """Mistral: the patch class plus ``from_pretrained`` / ``get_peft_model`` (Unsloth's ``FastMistralModel``)."""

    @classmethod
    def from_pretrained(cls, model_name: str = "unsloth/mistral-7b-v0.3-bnb-4bit", max_seq_length: int = 4096,
                        dtype: Any = None, load_in_4bit: bool | None = None, **kwargs: Any) -> tuple[Any, Any]:
        """``FastLanguageModel.from_pretrained`` for a Mistral checkpoint (or a LoRA saved on one); a
        checkpoint of another ``model_type`` is refused before anything loads."""
        return _load(cls, model_name, dict(max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
                                           **kwargs))


__all__ = ["FastLlamaModel", "FastMistralModel", "FastQwen2Model", "FastQwen3Model"]
