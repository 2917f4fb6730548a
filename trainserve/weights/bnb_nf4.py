"""bitsandbytes NF4 base weights shared between the engine and the trainer (``quant_backend="bitsandbytes"``).

With ``quantization="bitsandbytes"`` vLLM quantises each linear layer to NF4 on load and keeps
the packed bytes as one ``uint8`` parameter of shape ``(n_packed, 1)``; fused layers (q/k/v,
gate/up) hold their shards as consecutive row ranges, described by ``bnb_shard_offsets``, with
one bitsandbytes ``QuantState`` per shard in ``bnb_quant_state``. The trainer's ``Linear4bit``
modules wrap ``Params4bit`` *views* of those ranges and the engine's quant states: no second
copy of packed weights, no dequantised copy kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: PEFT wraps these layers with its bitsandbytes LoRA classes when the model says it is 4-bit.
MODEL_FLAGS = {"is_loaded_in_4bit": True}


def matches(linear: nn.Module) -> bool:
    """True when an engine linear layer holds bitsandbytes 4-bit packed weights."""
    return hasattr(getattr(linear, "weight", None), "bnb_quant_state")


def _shards(weight: Any) -> list[tuple[torch.Tensor, Any]]:
    states = weight.bnb_quant_state
    data = weight.data
    if not isinstance(states, dict):
        return [(data, states)]
    offsets = [int(o) for o in weight.bnb_shard_offsets]
    return [(data[offsets[i]: offsets[i + 1]], states[i]) for i in range(len(states))]


def shard_modules(engine_linear: nn.Module, sizes: list[int], compute_dtype: torch.dtype) -> list[nn.Module]:
    """One bitsandbytes ``Linear4bit`` per shard of ``engine_linear``, viewing its packed bytes.

    Biases are not attached here (the caller views them from the engine's fused bias).
    """
    import bitsandbytes as bnb

    modules = []
    for packed, state in _shards(engine_linear.weight):
        out_features, in_features = (int(s) for s in state.shape)
        if getattr(state, "nested", False):
            raise RuntimeError("the engine kept double-quantised statistics; expected them de-nested on load")
        module = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                                   quant_type=state.quant_type, device="meta")
        module.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, blocksize=state.blocksize,
            compress_statistics=False, quant_type=state.quant_type, quant_storage=packed.dtype,
            bnb_quantized=True, module=module)
        module.quant_state = state
        modules.append(module)
    return modules


def engine_statistics(engine_param: nn.Parameter) -> list[torch.Tensor]:
    """Tensors besides the parameter itself that belong to the engine (the quant states)."""
    states = getattr(engine_param, "bnb_quant_state", None)
    states = states.values() if isinstance(states, dict) else [states] if states is not None else []
    return [t for s in states for t in (s.absmax, s.code)]


def trainer_statistics(param: nn.Parameter) -> list[torch.Tensor]:
    """Tensors a trainer parameter reads besides its own storage (must be the engine's too)."""
    state = getattr(param, "quant_state", None)
    return [state.absmax] if state is not None and hasattr(state, "absmax") else []
