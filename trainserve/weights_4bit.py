"""4-bit (bitsandbytes NF4) base weights shared between the engine and the trainer.

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


def is_bnb_4bit(linear: nn.Module) -> bool:
    """True when an engine linear layer holds bitsandbytes 4-bit packed weights."""
    return hasattr(getattr(linear, "weight", None), "bnb_quant_state")


def _shards(weight: Any) -> list[tuple[torch.Tensor, Any]]:
    states = weight.bnb_quant_state
    data = weight.data
    if not isinstance(states, dict):
        return [(data, states)]
    offsets = [int(o) for o in weight.bnb_shard_offsets]
    return [(data[offsets[i]: offsets[i + 1]], states[i]) for i in range(len(states))]


def linear4bit_views(engine_linear: nn.Module, compute_dtype: torch.dtype) -> list[nn.Module]:
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


def install_4bit_linears(model: nn.Module, engine_model: nn.Module, config: Any, dtype: torch.dtype) -> None:
    """Replace every q/k/v/o/gate/up/down ``nn.Linear`` of ``model`` with 4-bit views of the engine."""
    from trainserve.weights import _plain, _rows, unwrap_lora_layer

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_size = config.num_attention_heads * head_dim
    kv_size = config.num_key_value_heads * head_dim
    for layer, engine_layer in zip(model.model.layers, engine_model.model.layers, strict=True):
        groups = [
            (layer.self_attn, unwrap_lora_layer(engine_layer.self_attn.qkv_proj), ["q_proj", "k_proj", "v_proj"]),
            (layer.self_attn, unwrap_lora_layer(engine_layer.self_attn.o_proj), ["o_proj"]),
            (layer.mlp, unwrap_lora_layer(engine_layer.mlp.gate_up_proj), ["gate_proj", "up_proj"]),
            (layer.mlp, unwrap_lora_layer(engine_layer.mlp.down_proj), ["down_proj"]),
        ]
        for parent, engine_linear, names in groups:
            views = linear4bit_views(engine_linear, dtype)
            if len(views) != len(names):
                raise RuntimeError(f"engine {type(engine_linear).__name__} has {len(views)} 4-bit shards, "
                                   f"expected {len(names)} for {names}")
            bias = getattr(engine_linear, "bias", None)
            biases = _rows(bias, [q_size, kv_size, kv_size]) if bias is not None and len(names) == 3 else (
                [_plain(bias)] if bias is not None else [None] * len(names))
            for name, module, b in zip(names, views, biases, strict=True):
                old = getattr(parent, name)
                if tuple(old.weight.shape) != (module.out_features, module.in_features):
                    raise RuntimeError(f"{name}: engine shard {module.out_features}x{module.in_features} vs "
                                       f"model {tuple(old.weight.shape)}")
                if b is not None:
                    module.bias = nn.Parameter(b, requires_grad=False)
                setattr(parent, name, module)
