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
import warnings
from collections.abc import Sequence
from typing import Any

#: ``from_pretrained`` arguments that only configure the colocated engine, with their defaults.
ENGINE_ONLY_DEFAULTS: dict[str, Any] = {"gpu_memory_utilization": 0.5, "max_lora_rank": 64, "max_loras": 1,
                                        "disable_log_stats": True, "standby": True, "float8_kv_cache": False}

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


def warn_unused_engine_arguments(**given: Any) -> None:
    """Without the engine, engine-only settings have nothing to configure. Unsloth scripts switch the
    engine off and keep them, so they are not refused; but a value changed from its default would
    otherwise be dropped without a word, so it is named in a warning."""
    changed = [name for name, value in given.items() if value != ENGINE_ONLY_DEFAULTS[name]]
    if changed:
        warnings.warn(f"fast_inference=False: {', '.join(f'{n}={given[n]!r}' for n in changed)} only configure"
                      " the colocated vLLM engine and have no effect without it", UserWarning, stacklevel=4)


def check_peft_arguments(*, r: Any, lora_alpha: Any, random_state: Any, use_rslora: Any, max_seq_length: Any,
                         target_modules: Any) -> None:
    """``get_peft_model``'s scalar arguments and the type of ``target_modules``."""
    check_positive_int("r", r)
    if not _is_number(lora_alpha) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    check_random_state(random_state)
    check_bools(use_rslora=use_rslora)
    if max_seq_length is not None:
        check_positive_int("max_seq_length", max_seq_length)
    if isinstance(target_modules, str):
        return
    if not isinstance(target_modules, Sequence | set | frozenset) or not all(
            isinstance(t, str) for t in target_modules):
        raise ValueError(f"target_modules must be a module name, a list of module names or 'all-linear', "
                         f"got {target_modules!r}")


__all__ = ["ENGINE_ONLY_DEFAULTS", "SEED_MAX", "check_bools", "check_load_arguments", "check_peft_arguments",
           "check_positive_int", "check_random_state", "warn_unused_engine_arguments"]
