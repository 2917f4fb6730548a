"""Type and range checks of ``from_pretrained`` / ``get_peft_model`` arguments, run before anything loads
(no config read, no engine start) or changes (no peft module injected).

Without them a wrong type either failed deep inside transformers, peft or vLLM with an error that
does not name the argument (``'<' not supported between 'str' and 'int'``), failed only after the
engine had started, or was silently reinterpreted (``fast_inference="False"`` is truthy and started
an engine; ``max_seq_length=512.7`` reached the trainer; ``use_rslora="yes"`` was written to
``adapter_config.json``, which ``load_lora`` then refuses).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

#: ``from_pretrained`` arguments that only configure the colocated engine, with their defaults.
ENGINE_ONLY_DEFAULTS: dict[str, Any] = {"gpu_memory_utilization": 0.5, "max_lora_rank": 64, "max_loras": 1,
                                        "disable_log_stats": True, "standby": True, "float8_kv_cache": False}

#: device_map values meaning "the one default device" ({"": device} is accelerate's spelling).
SINGLE_DEVICE_MAPS = ("sequential", "auto", "balanced", None, "cpu", "cuda", "cuda:0", 0)

_CPU_WARNED: set[str] = set()

#: vLLM's seed range (numpy's): the engine refuses others with an error that does not name random_state.
SEED_MAX = 2**32 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_bools(**values: Any) -> None:
    """Each value must be ``True`` or ``False`` (a truthy string such as ``"False"`` is not)."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    """``value`` must be an integer (not a bool, not a float) ≥ 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_random_state(random_state: Any) -> None:
    """An integer in vLLM's seed range (the same rule with and without the engine)."""
    if not _is_int(random_state) or not 0 <= random_state <= SEED_MAX:
        raise ValueError(f"random_state must be an integer in [0, 2**32 - 1], got {random_state!r}")


def check_load_arguments(*, max_seq_length: Any, gpu_memory_utilization: Any, random_state: Any,
                         max_lora_rank: Any, max_loras: Any, **flags: Any) -> None:
    """``from_pretrained``'s scalar arguments (``flags``: the True/False ones, by name)."""
    from trainserve.engine.launch import round_lora_rank

    check_bools(**flags)
    check_positive_int("max_seq_length", max_seq_length)
    if not _is_number(gpu_memory_utilization) or not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {gpu_memory_utilization!r}")
    check_random_state(random_state)
    check_positive_int("max_lora_rank", max_lora_rank)
    round_lora_rank(max_lora_rank)  # above vLLM's largest rank: refused naming max_lora_rank
    check_positive_int("max_loras", max_loras)  # 0: the live adapter holds every slot, load_lora's can't be served
    if flags.get("fast_inference") is False:
        warn_unused_engine_arguments(gpu_memory_utilization=gpu_memory_utilization, max_lora_rank=max_lora_rank,
                                     max_loras=max_loras, **{k: v for k, v in flags.items()
                                                              if k in ENGINE_ONLY_DEFAULTS})


def check_model_source(model_name: Any, revision: Any, token: Any) -> str:
    """``model_name`` as a string, after checking it with ``revision`` and ``token``.

    Without this a wrong type reached the Hub client (``from_pretrained(None)`` failed with "couldn't
    connect to huggingface.co"), a path that does not exist was read as a malformed repository id,
    and ``revision`` was silently unused for a local directory (trainer and engine both read the
    directory's files, whatever revision was asked for).
    """
    if isinstance(model_name, os.PathLike):
        model_name = os.fspath(model_name)
    if not isinstance(model_name, str) or not model_name.strip():
        raise TypeError(f"model_name must be a Hub repository id or a local directory, got {model_name!r}")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"revision must be a branch, tag or commit name (a non-empty string) or None, "
                         f"got {revision!r}")
    if token is not None and not isinstance(token, bool) and (not isinstance(token, str) or not token.strip()):
        raise ValueError(f"token must be a Hugging Face token (a non-empty string), True, False or None, "
                         f"got {token!r}")
    path = os.path.expanduser(model_name)
    if os.path.isdir(path):
        if revision is not None:
            raise ValueError(f"revision={revision!r} selects a Hub revision, but model_name={model_name!r} is a local "
                             "directory, whose files load as they are; drop revision or pass the Hub repository id")
        return path
    if os.path.exists(path) or os.path.isabs(path) or model_name.startswith(("./", "../", "~", ".\\")):
        raise FileNotFoundError(f"model_name={model_name!r} is not a directory (a local model needs a directory "
                                "holding config.json and the weights)")
    return model_name


def check_device_map(device_map: Any, cuda: bool) -> None:
    """``device_map`` may only name the one device trainserve uses: CUDA when present, else the CPU."""
    value = device_map
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise NotImplementedError(f"device_map={device_map!r} is not supported (single device only)")
        value = device_map[""]
    if isinstance(value, torch.device):
        value = "cuda:0" if value.type == "cuda" and value.index in (None, 0) else str(value)
    if isinstance(value, bool) or value not in SINGLE_DEVICE_MAPS:
        raise NotImplementedError(f"device_map={device_map!r} is not supported (single device only)")
    if value in ("cuda", "cuda:0", 0) and not cuda:
        raise ValueError(f"device_map={device_map!r} asks for CUDA, which this machine does not have")
    if value == "cpu" and cuda:
        raise NotImplementedError(f"device_map={device_map!r}: with CUDA available trainserve places the model "
                                  "on the GPU; CPU placement on a CUDA machine is not supported")


def check_cpu_engine(*, fast_inference: bool, cuda: bool, gpu_memory_utilization: float,
                     float8_kv_cache: bool) -> None:
    """Engine settings that have no CPU counterpart: refused (``float8_kv_cache``) or named in a warning
    (``gpu_memory_utilization``: the CPU engine's KV cache is sized by ``VLLM_CPU_KVCACHE_SPACE``; once
    per process)."""
    if float8_kv_cache and not cuda:
        raise NotImplementedError("float8_kv_cache=True needs CUDA")
    changed = gpu_memory_utilization != ENGINE_ONLY_DEFAULTS["gpu_memory_utilization"]
    if fast_inference and not cuda and changed and "gpu_memory_utilization" not in _CPU_WARNED:
        _CPU_WARNED.add("gpu_memory_utilization")  # once per process, like the CPU quantisation fallback
        warnings.warn(f"gpu_memory_utilization={gpu_memory_utilization!r} has no effect on the CPU engine: its KV "
                      f"cache is VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE', '?')} GiB "
                      "(set that variable before the first load to change it)", UserWarning, stacklevel=3)


def cap_max_seq_length(max_seq_length: int, limit: int, what: str) -> int:
    """``max_seq_length``, or ``limit`` with a warning naming both when it is larger."""
    if max_seq_length > limit:
        warnings.warn(f"max_seq_length={max_seq_length} exceeds {what} ({limit}); using {limit}", stacklevel=3)
        return limit
    return max_seq_length


def warn_unused_engine_arguments(**given: Any) -> None:
    """Without the engine, engine-only settings have nothing to configure. Unsloth scripts switch the
    engine off and keep them, so they are not refused; but a value changed from its default would
    otherwise be dropped without a word, so it is named in a warning."""
    changed = [name for name, value in given.items() if value != ENGINE_ONLY_DEFAULTS[name]]
    if changed:
        warnings.warn(f"fast_inference=False: {', '.join(f'{n}={given[n]!r}' for n in changed)} only configure"
                      " the colocated vLLM engine and have no effect without it", UserWarning, stacklevel=4)


def check_peft_model_input(model: Any) -> None:
    """``get_peft_model``'s ``model`` must be a model from ``from_pretrained`` (an ``nn.Module`` with a config)."""
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise TypeError(f"get_peft_model's model must be the model FastLanguageModel.from_pretrained returned, got "
                        f"{type(model).__name__}")


def _names(value: Any) -> bool:
    return isinstance(value, Sequence | set | frozenset) and not isinstance(value, str) and all(
        isinstance(t, str) for t in value)


def check_peft_arguments(*, r: Any, lora_alpha: Any, random_state: Any, use_rslora: Any, max_seq_length: Any,
                         target_modules: Any, modules_to_save: Any = None, layers_to_transform: Any = None,
                         loftq_config: Any = None, num_layers: int | None = None) -> None:
    """``get_peft_model``'s scalar arguments and the types of its module and layer selections.

    peft reads some wrong values as "no selection" (``layers_to_transform=[]`` puts LoRA on every
    layer, ``loftq_config=0`` means no LoftQ) and crashes on others without naming them.
    """
    check_positive_int("r", r)
    if not _is_number(lora_alpha) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    check_random_state(random_state)
    check_bools(use_rslora=use_rslora)
    if max_seq_length is not None:
        check_positive_int("max_seq_length", max_seq_length)
    if not isinstance(target_modules, str) and not _names(target_modules):
        raise ValueError(f"target_modules must be a module name, a list of module names or 'all-linear', "
                         f"got {target_modules!r}")
    if modules_to_save is not None and not isinstance(modules_to_save, str) and not _names(modules_to_save):
        raise ValueError(f"modules_to_save must be None, a module name or a list of module names, got "
                         f"{modules_to_save!r}")
    if layers_to_transform is not None:
        layers = [layers_to_transform] if _is_int(layers_to_transform) else layers_to_transform
        if (not isinstance(layers, Sequence) or isinstance(layers, str) or not layers
                or not all(_is_int(i) and i >= 0 and (num_layers is None or i < num_layers) for i in layers)):
            raise ValueError(f"layers_to_transform must be None (every layer), a layer index or a non-empty list of "
                             f"layer indices in [0, {num_layers}), got {layers_to_transform!r}")
    from peft import LoftQConfig

    if loftq_config is not None and not isinstance(loftq_config, dict | LoftQConfig):
        raise ValueError(f"loftq_config must be None, a dict or peft's LoftQConfig, got {loftq_config!r}")


__all__ = ["ENGINE_ONLY_DEFAULTS", "SEED_MAX", "SINGLE_DEVICE_MAPS", "cap_max_seq_length", "check_bools",
           "check_cpu_engine", "check_device_map",
           "check_load_arguments", "check_model_source", "check_peft_arguments", "check_peft_model_input",
           "check_positive_int", "check_random_state", "warn_unused_engine_arguments"]
