"""The LoRA variants of ``get_peft_model`` beyond plain LoRA: ``bias`` and LoftQ, checked before peft runs.

**bias** (``"none"``, ``"lora_only"``, ``"all"``): peft makes base-layer biases trainable (those of the
LoRA-targeted layers, or every bias) and saves them with the adapter; the patched forward runs such
layers through peft's module (the fused kernels keep biases frozen), so they train like peft. With
``fast_inference=True`` a bias other than ``"none"`` is refused: vLLM 0.32's LoRA has no adapter bias
(``vllm/lora/peft_helper.py``: "Adapter bias is not supported"), so the engine could not serve it as
part of the adapter, and the base biases are the engine's own tensors - training them in place would
change what every request, the base model's included, is served, outside any adapter version.

**LoftQ** (``loftq_config`` / ``init_lora_weights="loftq"``): peft replaces each targeted base weight by
its quantised-dequantised copy and initialises A/B from the SVD of the quantisation error. With
``fast_inference=True`` it is refused: the base weights are the engine's tensors, and peft assigns the
new weight to ``.data``, which would cut the trainer off from the engine's weights (they would silently
diverge); vLLM also refuses LoftQ-initialised adapters. Without the engine peft's LoftQ runs as is on a
16-bit (or fp32) base; it needs bitsandbytes and a CUDA (or XPU) device (peft >= 0.20 quantises only
through bitsandbytes), and a base that is already quantised is refused (LoftQ quantises it itself).
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BIAS_VALUES", "check_bias", "resolve_loftq"]

BIAS_VALUES = ("none", "lora_only", "all")
_BNB_PARAMS = ("Params4bit", "Int8Params")


def check_bias(bias: Any, fast: bool) -> None:
    """Raise for a ``bias`` peft does not know, or one the engine cannot serve (``fast``: with an engine)."""
    if bias not in BIAS_VALUES:
        raise ValueError(f"bias must be one of {BIAS_VALUES}, got {bias!r}")
    if bias != "none" and fast:
        raise NotImplementedError(
            f"bias={bias!r} with fast_inference=True is not supported: vLLM's LoRA cannot serve adapter biases "
            "(it refuses adapters with bias != 'none'), and the base biases are the engine's own tensors, so "
            "training them would change what the engine serves to every request outside the adapter. Use "
            "bias='none', or load with fast_inference=False to train biases (save_lora / save_pretrained_merged "
            "export them)")


def _quantized_linears(model: nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and (
                getattr(weight, "quant_state", None) is not None or type(weight).__name__ in _BNB_PARAMS
                or not weight.is_floating_point()):
            names.append(name)
    return names


def _loftq_dict(loftq_config: Any) -> dict[str, Any]:
    """peft's ``LoftQConfig`` fields from a ``LoftQConfig`` or a dict; unknown keys or bad values refused."""
    from peft import LoftQConfig

    if is_dataclass(loftq_config) and not isinstance(loftq_config, type):
        values = asdict(loftq_config)
    elif isinstance(loftq_config, dict):
        values = dict(loftq_config)
    else:
        raise ValueError(f"loftq_config must be a peft.LoftQConfig or a dict, got {type(loftq_config).__name__}")
    try:
        values = asdict(LoftQConfig(**values))
    except TypeError as exc:
        raise ValueError(f"loftq_config {loftq_config!r} is invalid: {exc}") from exc
    if values["loftq_bits"] not in (4, 8):
        raise ValueError(f"loftq_config loftq_bits must be 4 or 8 (peft's LoftQ), got {values['loftq_bits']!r}")
    if isinstance(values["loftq_iter"], bool) or not isinstance(values["loftq_iter"], int) or values["loftq_iter"] < 1:
        raise ValueError(f"loftq_config loftq_iter must be a positive integer, got {values['loftq_iter']!r}")
    return values


def resolve_loftq(model: nn.Module, loftq_config: Any, init_lora_weights: Any, fast: bool) -> tuple[Any, dict]:
    """``(init_lora_weights, loftq_config)`` for peft's ``LoraConfig``; raises when LoftQ cannot run here.

    LoftQ is asked for by ``init_lora_weights="loftq"`` (then ``loftq_config`` defaults, as in Unsloth, to
    4 bits and 1 iteration) or by a ``loftq_config`` with the default ``init_lora_weights=True`` (peft would
    ignore it; trainserve never ignores an argument). A ``loftq_config`` with another initialisation is a
    conflict. Returns ``(init_lora_weights, {})`` when no LoftQ is asked for.
    """
    wanted = init_lora_weights == "loftq" or bool(loftq_config)
    if not wanted:
        return init_lora_weights, {}
    if init_lora_weights not in (True, "loftq"):
        raise ValueError(f"loftq_config is given with init_lora_weights={init_lora_weights!r}; LoftQ is an "
                         "initialisation of its own: leave init_lora_weights at True or set it to 'loftq'")
    values = _loftq_dict(loftq_config or {})
    if fast:
        raise NotImplementedError(
            "loftq_config with fast_inference=True is not supported: LoftQ replaces every targeted base weight "
            "by its quantised copy, and with the engine the base weights are the engine's tensors (peft would "
            "cut the trainer off from them, so trainer and engine would silently differ; vLLM also refuses "
            "LoftQ-initialised adapters). Use fast_inference=False, or the default initialisation")
    quantized = _quantized_linears(model)
    if quantized:
        raise ValueError(f"loftq_config needs the unquantised base weights (LoftQ quantises them itself), but "
                         f"{quantized[0]!r} is quantised; load with load_in_16bit=True (or load_in_4bit=False)")
    from peft.import_utils import is_bnb_4bit_available

    if not is_bnb_4bit_available() or not (torch.cuda.is_available() or _xpu()):
        raise NotImplementedError(
            "loftq_config needs bitsandbytes and a CUDA (or XPU) device: peft's LoftQ quantises through "
            "bitsandbytes only (peft >= 0.20), so it cannot run on this machine; train with the default "
            "initialisation here, or run LoftQ on a GPU with fast_inference=False")
    import importlib.util

    if importlib.util.find_spec("scipy") is None:
        raise ImportError("loftq_config needs scipy (peft's LoftQ uses it): pip install 'trainserve[loftq]'")
    return "loftq", values


def _xpu() -> bool:
    return bool(getattr(torch, "xpu", None) is not None and torch.xpu.is_available())
