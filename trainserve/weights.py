"""Build the transformers training model around the engine's tensors: one copy of base weights.

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


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The engine's parameter as a plain tensor on the same storage (vLLM uses Parameter subclasses)."""
    return tensor.data if isinstance(tensor, nn.Parameter) else tensor


def _linear(module: nn.Module) -> nn.Module:
    return unwrap_lora_layer(module)


def _rows(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    tensor = _plain(tensor)
    if tensor.shape[0] != sum(sizes):
        raise WeightLayoutError(f"fused tensor has {tensor.shape[0]} rows, expected {sizes} = {sum(sizes)}")
    return list(torch.split(tensor, sizes, dim=0))


def engine_views(engine_model: nn.Module, config, linears: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """``(transformers parameter name, view of the engine tensor)`` for a Llama-family model.

    With ``linears=False`` the q/k/v/o/gate/up/down weights and biases are left out (4-bit
    engines: see :mod:`trainserve.weights_4bit`).
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_size = config.num_attention_heads * head_dim
    kv_size = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    vocab = config.vocab_size
    inner = engine_model.model

    yield "model.embed_tokens.weight", _plain(inner.embed_tokens.weight)[:vocab]
    for i, layer in enumerate(inner.layers):
        prefix = f"model.layers.{i}."
        yield f"{prefix}input_layernorm.weight", layer.input_layernorm.weight
        yield f"{prefix}post_attention_layernorm.weight", layer.post_attention_layernorm.weight
        if not linears:
            continue
        qkv = _linear(layer.self_attn.qkv_proj)
        for name, view in zip(("q_proj", "k_proj", "v_proj"), _rows(qkv.weight, [q_size, kv_size, kv_size]),
                              strict=True):
            yield f"{prefix}self_attn.{name}.weight", view
        if getattr(qkv, "bias", None) is not None:
            for name, view in zip(("q_proj", "k_proj", "v_proj"), _rows(qkv.bias, [q_size, kv_size, kv_size]),
                                  strict=True):
                yield f"{prefix}self_attn.{name}.bias", view
        o_proj = _linear(layer.self_attn.o_proj)
        yield f"{prefix}self_attn.o_proj.weight", o_proj.weight
        if getattr(o_proj, "bias", None) is not None:
            yield f"{prefix}self_attn.o_proj.bias", o_proj.bias
        gate, up = _rows(_linear(layer.mlp.gate_up_proj).weight, [inter, inter])
        yield f"{prefix}mlp.gate_proj.weight", gate
        yield f"{prefix}mlp.up_proj.weight", up
        yield f"{prefix}mlp.down_proj.weight", _linear(layer.mlp.down_proj).weight
    yield "model.norm.weight", inner.norm.weight
    if not getattr(config, "tie_word_embeddings", False):
        yield "lm_head.weight", _plain(engine_model.lm_head.weight)[:vocab]


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = getattr(module, attr, None)
    if current is None:
        raise WeightLayoutError(f"transformers model has no parameter {name}")
    if tuple(current.shape) != tuple(tensor.shape):
        raise WeightLayoutError(f"{name}: engine tensor {tuple(tensor.shape)} vs model {tuple(current.shape)}")
    module._parameters[attr] = nn.Parameter(_plain(tensor), requires_grad=False)


def build_shared_model(engine_model: nn.Module, config, dtype: torch.dtype) -> nn.Module:
    """A transformers ``*ForCausalLM`` whose every base parameter views ``engine_model``'s tensors."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    from trainserve.weights_4bit import install_4bit_linears, is_bnb_4bit

    device = engine_model.model.embed_tokens.weight.device
    quantized = is_bnb_4bit(_linear(engine_model.model.layers[0].self_attn.qkv_proj))
    for name, view in engine_views(engine_model, config, linears=not quantized):
        _set_parameter(model, name, view)
    if quantized:
        install_4bit_linears(model, engine_model, config, dtype)
        model.__dict__["is_loaded_in_4bit"] = True  # PEFT then wraps the layers with its 4-bit LoRA
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them for real.
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:
        with torch.device(device):
            model.model.rotary_emb = type(rotary)(config=config)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise WeightLayoutError(f"no engine tensor for {leftovers[:5]}{'…' if len(leftovers) > 5 else ''}")
    model.eval()
    return model


def shared_storage_report(model: nn.Module, engine_model: nn.Module) -> dict[str, int]:
    """Count transformers base parameters whose storage lies inside an engine tensor's storage."""
    engine_tensors = list(engine_model.parameters()) + list(engine_model.buffers())
    for p in list(engine_model.parameters()):
        states = getattr(p, "bnb_quant_state", None)
        for state in (states.values() if isinstance(states, dict) else [states] if states is not None else []):
            engine_tensors += [state.absmax, state.code]
    engine_ranges = []
    for t in engine_tensors:
        if t.numel():
            start = t.untyped_storage().data_ptr()
            engine_ranges.append((start, start + t.untyped_storage().nbytes()))
    shared = separate = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        ptr = p.data_ptr()
        state = getattr(p, "quant_state", None)  # 4-bit: the statistics must be the engine's too
        if state is not None and not any(lo <= state.absmax.data_ptr() < hi for lo, hi in engine_ranges):
            separate += 1
            continue
        if any(lo <= ptr < hi for lo, hi in engine_ranges):
            shared += 1
        else:
            separate += 1
    return {"shared": shared, "separate": separate}
