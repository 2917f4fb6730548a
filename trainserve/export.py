"""Export a trained model: ``save_pretrained_merged`` and ``push_to_hub_merged`` (Unsloth's names).

With ``fast_inference=True`` the base parameters are views of the engine's tensors, so peft's
in-place merges are refused (:mod:`trainserve.merge_guard`). Exporting therefore never merges in
place: every base weight is *copied* to the CPU (packed engine formats are dequantised from their
bytes, bitsandbytes weights through peft's dequantiser), the LoRA delta ``scale·B·A`` of each
active adapter is added to the copy in float32, and the result is cast to the model's compute
dtype and written as a plain transformers checkpoint (``config.json`` + safetensors) that
transformers and vLLM load without trainserve. The engine, the live adapter and the trainer are
untouched. Peak extra memory is one dense copy of the model in CPU RAM.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainserve.trainable_modules import adapter_save_arguments, merged_parameter_name

SAVE_METHODS = ("merged_16bit", "lora")
_OFFLINE_VALUES = ("1", "ON", "YES", "TRUE")
_BNB_PARAMS = ("Params4bit", "Int8Params")


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and (getattr(weight, "quant_state", None) is not None
                                                 or type(weight).__name__ in _BNB_PARAMS)


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """A new float32 CPU tensor holding ``module.weight`` dense, whatever format it is stored in."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and hasattr(state, "dequantize_t"):  # trainserve's packed engine formats
        # in the compute dtype: the very weight the trainer's GEMMs use (and a dtype every kernel writes)
        dense_t = state.dequantize_t(getattr(state, "dtype", torch.float32))
        return dense_t.t().to("cpu", torch.float32, copy=True).contiguous()
    if type(weight).__name__ in _BNB_PARAMS:  # bitsandbytes (GPU only)
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(weight, getattr(weight, "quant_state", None)).to(
            "cpu", torch.float32, copy=True)
    if not weight.is_floating_point():
        raise NotImplementedError(f"cannot dequantise a {type(module).__name__} weight of dtype {weight.dtype} "
                                  "for export")
    return weight.detach().to("cpu", torch.float32, copy=True)


def merged_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base model's weights with every active LoRA adapter added, as new CPU tensors of ``dtype``
    (keys as in a plain transformers checkpoint). Nothing of ``model`` is written to."""
    from peft.tuners.lora import LoraLayer

    causal = _causal_lm(model)
    out: dict[str, torch.Tensor] = {}
    written: set[str] = set()
    with torch.no_grad():
        for name, module in causal.named_modules():
            if isinstance(module, LoraLayer):
                written.add(name)
                base = module.get_base_layer()
                weight = _dense_weight(base)
                if not module.disable_adapters:
                    for adapter in module.active_adapters:
                        if adapter in module.lora_A:
                            weight += module.get_delta_weight(adapter).detach().to("cpu", torch.float32)
                out[f"{name}.weight"] = weight.to(dtype)
                if getattr(base, "bias", None) is not None:
                    out[f"{name}.bias"] = base.bias.detach().to("cpu", dtype, copy=True)
            elif not name.endswith(".base_layer") and _is_quantized(module):
                written.add(name)  # a frozen quantised projection without LoRA: dequantised
                out[f"{name}.weight"] = _dense_weight(module).to(dtype)
                if getattr(module, "bias", None) is not None:
                    out[f"{name}.bias"] = module.bias.detach().to("cpu", dtype, copy=True)
        adapters = _active_adapters(model)
        for name, param in causal.named_parameters():
            owner = name.rsplit(".", 1)[0]
            if "lora_" in name or owner in written or owner.endswith(".base_layer"):
                continue
            name = merged_parameter_name(name, adapters)  # modules_to_save: the trained copy
            if name is not None:
                out[name] = param.detach().to("cpu", dtype, copy=True)
    return out


def _active_adapters(model: nn.Module) -> list[str]:
    """The adapters whose ``modules_to_save`` copies an export writes (none while they are disabled)."""
    from peft.utils import ModulesToSaveWrapper

    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            return [] if module.disable_adapters else list(module.active_adapters)
    return []


def _export_dtype(model: nn.Module) -> torch.dtype:
    """The model's compute dtype: its embedding's (packed projections store integers)."""
    return _causal_lm(model).get_input_embeddings().weight.dtype


def _save_merged(model: nn.Module, save_directory: str, tokenizer: Any, max_shard_size: str | int) -> None:
    from transformers import AutoModelForCausalLM

    causal = _causal_lm(model)
    dtype = _export_dtype(model)
    config = causal.config.__class__.from_dict(causal.config.to_dict())
    if hasattr(config, "quantization_config"):  # the export is dense: no quantisation to apply on load
        delattr(config, "quantization_config")
    config.dtype = dtype
    state = merged_state_dict(model, dtype)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"merged weights do not match {type(plain).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if getattr(causal, "generation_config", None) is not None:
        plain.generation_config = causal.generation_config
    plain.save_pretrained(save_directory, safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)


def save_pretrained_merged(self: Any, save_directory: str | os.PathLike, tokenizer: Any = None,
                           save_method: str = "merged_16bit", push_to_hub: bool = False, token: str | None = None,
                           max_shard_size: str | int = "5GB", safe_serialization: bool = True,
                           **kwargs: Any) -> None:
    """Save the model with its LoRA merged into a copy of the base (``"merged_16bit"``, in the model's
    compute dtype), or the adapter alone (``"lora"``). The live model and the engine are untouched.

    ``tokenizer``, when given, is saved beside the weights.
    ``"merged_4bit"`` is refused: a 4-bit checkpoint of a merged model would need re-quantising the
    merged weights with a format plain loaders understand; save ``"merged_16bit"`` and quantise it
    when loading (``load_in_4bit=True``) instead."""
    if kwargs:
        raise TypeError(f"save_pretrained_merged got unexpected arguments {sorted(kwargs)}")
    if push_to_hub:
        return push_to_hub_merged(self, str(save_directory), tokenizer, save_method=save_method, token=token,
                                  max_shard_size=max_shard_size)
    if not safe_serialization:
        raise NotImplementedError("safe_serialization=False is not supported: trainserve writes safetensors only")
    if save_method in ("merged_4bit", "merged_4bit_forced"):
        raise NotImplementedError(
            f"save_method={save_method!r} is not supported: save with save_method='merged_16bit' (a plain "
            "checkpoint in the model's dtype) and load that with load_in_4bit=True to quantise it")
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method must be one of {SAVE_METHODS} (or 'merged_4bit', refused), "
                         f"got {save_method!r}")
    save_directory = str(save_directory)
    if save_method == "lora":
        if not hasattr(self, "peft_config"):
            raise RuntimeError("save_method='lora' needs a model from FastLanguageModel.get_peft_model")
        self.save_pretrained(save_directory, safe_serialization=True, **adapter_save_arguments(self))
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        return None
    _save_merged(self, save_directory, tokenizer, max_shard_size)
    return None


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set now (or was when huggingface_hub was imported)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _OFFLINE_VALUES or bool(constants.HF_HUB_OFFLINE)


class HubExportError(RuntimeError):
    """Pushing an export to the Hugging Face Hub failed (offline, no access, network)."""


def push_to_hub_merged(self: Any, repo_id: str, tokenizer: Any = None, save_method: str = "merged_16bit",
                       token: str | None = None, private: bool | None = None,
                       commit_message: str = "Upload model trained with trainserve",
                       max_shard_size: str | int = "5GB", **kwargs: Any) -> None:
    """Export like :func:`save_pretrained_merged` into a temporary directory and upload it to ``repo_id``.

    Fails fast, before merging anything: with ``HF_HUB_OFFLINE=1`` at once, otherwise the repository
    is created first (huggingface_hub's HTTP client has its own timeouts and retries), and every
    huggingface_hub error is re-raised as :class:`HubExportError` saying what failed."""
    if kwargs:
        raise TypeError(f"push_to_hub_merged got unexpected arguments {sorted(kwargs)}")
    if hub_offline():
        raise HubExportError(f"push_to_hub_merged({repo_id!r}): HF_HUB_OFFLINE is set, so nothing can be "
                             "uploaded; save locally with model.save_pretrained_merged(dir, tokenizer) instead")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure: say what failed
        raise HubExportError(f"push_to_hub_merged({repo_id!r}): creating the repository failed "
                             f"({type(exc).__name__}: {exc}); nothing was merged or uploaded") from exc
    with tempfile.TemporaryDirectory(prefix="trainserve-export-") as tmp:
        save_pretrained_merged(self, tmp, tokenizer, save_method=save_method, max_shard_size=max_shard_size)
        try:
            api.upload_folder(repo_id=repo_id, folder_path=Path(tmp), commit_message=commit_message)
        except Exception as exc:  # noqa: BLE001
            raise HubExportError(f"push_to_hub_merged({repo_id!r}): the upload failed "
                                 f"({type(exc).__name__}: {exc})") from exc
