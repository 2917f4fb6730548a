"""16-bit base weights: every transformers parameter is a view of an engine tensor.

vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (stacked by rows) and pads
the vocabulary; every transformers parameter here is a row-slice *view* of the engine tensor,
never a copy. Writing a base weight through the training model changes what the engine
generates, and the other way round.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from trainserve.engine.vllm_compat import unwrap_lora_layer


class WeightLayoutError(RuntimeError):
    """The engine's parameters do not have the shapes the transformers model expects."""


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """The engine's parameter as a plain tensor on the same storage (vLLM uses Parameter subclasses)."""
    return tensor.data if isinstance(tensor, nn.Parameter) else tensor


def rows(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    tensor = plain(tensor)
    if tensor.shape[0] != sum(sizes):
        raise WeightLayoutError(f"fused tensor has {tensor.shape[0]} rows, expected {sizes} = {sum(sizes)}")
    return list(torch.split(tensor, sizes, dim=0))


def engine_views(engine_model: nn.Module, config, linears: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """``(transformers parameter name, view of the engine tensor)`` for a Llama-family model
    (Llama, Qwen2, Qwen3: also the attention's ``q_norm``/``k_norm`` when the engine has them).

    With ``linears=False`` the q/k/v/o/gate/up/down weights and biases are left out (4-bit
    engines: :mod:`trainserve.weights` installs their packed views).
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_size = config.num_attention_heads * head_dim
    kv_size = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    vocab = config.vocab_size
    inner = engine_model.model

    yield "model.embed_tokens.weight", plain(inner.embed_tokens.weight)[:vocab]
    for i, layer in enumerate(inner.layers):
        prefix = f"model.layers.{i}."
        yield f"{prefix}input_layernorm.weight", layer.input_layernorm.weight
        yield f"{prefix}post_attention_layernorm.weight", layer.post_attention_layernorm.weight
        for norm in ("q_norm", "k_norm"):  # Qwen3's per-head RMSNorm on q and k
            module = getattr(layer.self_attn, norm, None)
            if module is not None:
                yield f"{prefix}self_attn.{norm}.weight", module.weight
        if not linears:
            continue
        qkv = unwrap_lora_layer(layer.self_attn.qkv_proj)
        for name, view in zip(("q_proj", "k_proj", "v_proj"), rows(qkv.weight, [q_size, kv_size, kv_size]),
                              strict=True):
            yield f"{prefix}self_attn.{name}.weight", view
        if getattr(qkv, "bias", None) is not None:
            for name, view in zip(("q_proj", "k_proj", "v_proj"), rows(qkv.bias, [q_size, kv_size, kv_size]),
                                  strict=True):
                yield f"{prefix}self_attn.{name}.bias", view
        o_proj = unwrap_lora_layer(layer.self_attn.o_proj)
        yield f"{prefix}self_attn.o_proj.weight", o_proj.weight
        if getattr(o_proj, "bias", None) is not None:
            yield f"{prefix}self_attn.o_proj.bias", o_proj.bias
        gate, up = rows(unwrap_lora_layer(layer.mlp.gate_up_proj).weight, [inter, inter])
        yield f"{prefix}mlp.gate_proj.weight", gate
        yield f"{prefix}mlp.up_proj.weight", up
        yield f"{prefix}mlp.down_proj.weight", unwrap_lora_layer(layer.mlp.down_proj).weight
    yield "model.norm.weight", inner.norm.weight
    if not getattr(config, "tie_word_embeddings", False):
        yield "lm_head.weight", plain(engine_model.lm_head.weight)[:vocab]


def set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = getattr(module, attr, None)
    if current is None:
        raise WeightLayoutError(f"transformers model has no parameter {name}")
    if tuple(current.shape) != tuple(tensor.shape):
        raise WeightLayoutError(f"{name}: engine tensor {tuple(tensor.shape)} vs model {tuple(current.shape)}")
    module._parameters[attr] = nn.Parameter(plain(tensor), requires_grad=False)


def projection_groups(config, layer: nn.Module, engine_layer: nn.Module
                      ) -> Iterator[tuple[nn.Module, nn.Module, list[str], list[int]]]:
    """``(transformers parent module, engine linear, projection names, their output sizes)`` for the
    four linear groups of one decoder layer (q/k/v fused, o, gate/up fused, down)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_size = config.num_attention_heads * head_dim
    kv_size = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    yield (layer.self_attn, unwrap_lora_layer(engine_layer.self_attn.qkv_proj), ["q_proj", "k_proj", "v_proj"],
           [q_size, kv_size, kv_size])
    yield layer.self_attn, unwrap_lora_layer(engine_layer.self_attn.o_proj), ["o_proj"], [config.hidden_size]
    yield layer.mlp, unwrap_lora_layer(engine_layer.mlp.gate_up_proj), ["gate_proj", "up_proj"], [inter, inter]
    yield layer.mlp, unwrap_lora_layer(engine_layer.mlp.down_proj), ["down_proj"], [config.hidden_size]
