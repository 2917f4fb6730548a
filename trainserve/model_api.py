"""Methods trainserve attaches to a model: ``fast_generate``, ``save_lora``, ``load_lora``, ``serve`` and
the exports of :mod:`trainserve.export` (``save_pretrained_merged``, ``push_to_hub_merged``) and
:mod:`trainserve.gguf_export` (``save_pretrained_gguf``).

They read the model's :class:`ModelState` (``model._trainserve``), which links the transformers
model to the engine, the live adapter and the saved-adapter registry.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass
from typing import Any

from trainserve.adapters import AdapterRegistry
from trainserve.export import push_to_hub_merged, save_pretrained_merged
from trainserve.gguf_export import save_pretrained_gguf
from trainserve.trainable_modules import adapter_save_arguments

_NEEDS_ENGINE = ("needs the colocated vLLM engine: load the model with "
                 "FastLanguageModel.from_pretrained(..., fast_inference=True)")


@dataclass
class ModelState:
    """What a trainserve model knows about its engine (absent when ``fast_inference=False``)."""

    engine: Any
    config: Any
    registry: AdapterRegistry
    tokenizer: Any
    max_lora_rank: int = 0  # as the user asked (the engine's slots may be larger)
    live: Any = None  # LiveAdapter once get_peft_model ran
    peft_model: Any = None
    live_base: Any = None  # trainserve.full_finetune.LiveBase with full_finetuning=True


def state_of(model: Any) -> ModelState | None:
    """The :class:`ModelState` of a trainserve model (through a PEFT wrapper too)."""
    base = getattr(model, "base_model", None)
    for candidate in (model, base, getattr(base, "model", None)):
        state = getattr(candidate, "__dict__", {}).get("_trainserve")
        if state is not None:
            return state
    return None


def _normalise_prompts(prompts: Any) -> list[Any]:
    from vllm.inputs import TokensPrompt

    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) for t in prompts):
            return [TokensPrompt(prompt_token_ids=list(prompts))]
        out = []
        for p in prompts:
            if isinstance(p, (list, tuple)):
                if not all(isinstance(t, int) for t in p):
                    raise TypeError("token-id prompts must be lists of ints")
                out.append(TokensPrompt(prompt_token_ids=list(p)))
            elif isinstance(p, (str, dict)):
                out.append(p)
            else:
                raise TypeError(f"unsupported prompt type {type(p).__name__}")
        return out
    raise TypeError(f"prompts must be a str, a list of str, or token ids; got {type(prompts).__name__}")


def _sampling_params(sampling_params: Any) -> Any:
    """``SamplingParams()`` for None; a ``SamplingParams`` or a list of them (one per prompt) as given."""
    from vllm import SamplingParams

    if sampling_params is None:
        return SamplingParams()
    if isinstance(sampling_params, SamplingParams) or (
            isinstance(sampling_params, (list, tuple)) and sampling_params
            and all(isinstance(p, SamplingParams) for p in sampling_params)):
        return sampling_params
    raise TypeError("sampling_params must be a vllm.SamplingParams or a list of them (one per prompt), "
                    f"got {sampling_params!r}")


def _adapter_enabled(peft_model: Any) -> bool:
    """False inside ``with model.disable_adapter():`` or when the adapter is merged into the base."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            return not module.disable_adapters and not module.merged
    return False


def fast_generate(self: Any, prompts: Any, sampling_params: Any = None, lora_request: Any = None,
                  use_tqdm: bool = False, **kwargs: Any) -> list[Any]:
    """Generate with the colocated engine; returns vLLM ``RequestOutput``s.

    Without ``lora_request`` the adapter is used *exactly as the trainer has it now* (the last
    optimizer step, in memory, no disk); inside ``with model.disable_adapter():`` the base model
    is used. Prompts may be a str, a list of str, token ids or a list of token-id lists.
    """
    if kwargs:
        raise TypeError(f"fast_generate got unexpected arguments {sorted(kwargs)}")
    state = state_of(self)
    if state is None:
        raise RuntimeError(f"fast_generate {_NEEDS_ENGINE}")
    params = _sampling_params(sampling_params)
    batch = _normalise_prompts(prompts)
    state.registry.check_usable(lora_request)
    if state.live_base is not None:  # full fine-tuning: no KV from before a weight change is reused
        state.live_base.sync()
    if lora_request is None and state.live is not None and _adapter_enabled(state.peft_model):
        lora_request = state.live.sync_request()
    standby = state.engine.standby
    standby.before_generate()
    try:
        return state.engine.loop.generate(batch, params, lora_request=lora_request, use_tqdm=use_tqdm)
    finally:
        standby.after_generate()


# peft's PeftModel.save_pretrained keywords save_lora passes on (peft ignores any other keyword).
_SAVE_KEYWORDS = ("selected_adapters", "save_embedding_layers", "is_main_process")


def save_lora(self: Any, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Save the active adapter as a PEFT directory (``adapter_config.json`` + safetensors); ``kwargs``:
    peft's ``selected_adapters``, ``save_embedding_layers``, ``is_main_process``."""
    if not isinstance(save_directory, (str, os.PathLike)) or not str(save_directory):
        raise TypeError(f"save_lora needs a directory path, got save_directory={save_directory!r}")
    if kwargs.pop("safe_serialization", True) is not True:
        raise ValueError("save_lora(safe_serialization=False) is not supported: load_lora and vLLM read "
                         "adapter_model.safetensors")
    unknown = sorted(set(kwargs) - set(_SAVE_KEYWORDS))
    if unknown:
        raise TypeError(f"save_lora got unexpected arguments {unknown} (accepted: {list(_SAVE_KEYWORDS)})")
    state = state_of(self)
    peft_model = state.peft_model if state is not None and state.peft_model is not None else self
    if not hasattr(peft_model, "peft_config"):
        raise RuntimeError("save_lora needs a model from FastLanguageModel.get_peft_model")
    peft_model.save_pretrained(str(save_directory), safe_serialization=True,
                               **{**adapter_save_arguments(peft_model), **kwargs})
    if state is not None and state.tokenizer is not None:
        state.tokenizer.save_pretrained(str(save_directory))


def load_lora(self: Any, save_directory: str | os.PathLike, load_tensors: bool = False, name: str | None = None) -> Any:
    """Validate a saved adapter, register it with the engine, and return its vLLM ``LoRARequest``.

    The same content always maps to the same request; saving new weights to the same directory
    gives a new request (so the engine never serves a stale cached copy).
    """
    if load_tensors:
        raise NotImplementedError("load_lora(load_tensors=True) is not supported; adapters load from disk")
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"load_lora name must be a non-empty str or None, got name={name!r}")
    state = state_of(self)
    if state is None:
        raise RuntimeError(f"load_lora {_NEEDS_ENGINE}")
    return state.registry.load(save_directory, name=name)


def serve(self: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          background: bool = True, **kwargs: Any) -> Any:
    """Serve this model's colocated engine over the OpenAI HTTP API (``live`` = the training adapter)."""
    if state_of(self) is None:
        raise RuntimeError(f"serve {_NEEDS_ENGINE}")
    from trainserve.server.embed import serve_model

    return serve_model(self, host=host, port=port, api_key=api_key, background=background, **kwargs)


def attach_api(model: Any, fast: bool) -> None:
    """Bind the trainserve methods onto ``model`` (a transformers or PEFT model).

    The engine methods are bound without an engine too (``fast=False``): calling them then raises
    trainserve's error saying how to get one, not an ``AttributeError``."""
    model.fast_generate = types.MethodType(fast_generate, model)
    model.load_lora = types.MethodType(load_lora, model)
    model.serve = types.MethodType(serve, model)
    model.save_lora = types.MethodType(save_lora, model)
    model.save_pretrained_merged = types.MethodType(save_pretrained_merged, model)
    model.push_to_hub_merged = types.MethodType(push_to_hub_merged, model)
    model.save_pretrained_gguf = types.MethodType(save_pretrained_gguf, model)
