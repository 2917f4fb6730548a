"""Build the transformers training model around the engine's tensors: one copy of base weights.

The engine owns every base tensor; the trainer's modules are zero-copy views. Norms, embeddings
and ``lm_head`` are always 16-bit views (:mod:`.dense`). The linear layers take the engine's
format, one module per format behind the same small interface (``matches(engine_linear)``,
``shard_modules(engine_linear, sizes, dtype)``, ``MODEL_FLAGS``, ``engine_statistics``,
``trainer_statistics``):

* :mod:`.dense` — 16-bit weights: ``nn.Linear`` whose weight is a row slice of the fused tensor;
* :mod:`.marlin_int` — trainserve's 4-/8-bit integer method (``load_in_4bit`` / ``load_in_8bit``);
* :mod:`.fp8` — vLLM's online FP8 (``load_in_fp8``);
* :mod:`.bnb_nf4` — vLLM's bitsandbytes NF4 (``quant_backend="bitsandbytes"``).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from trainserve.engine.vllm_compat import unwrap_lora_layer
from trainserve.weights import bnb_nf4, fp8, marlin_int
from trainserve.weights.dense import (
    WeightLayoutError,
    engine_views,
    plain,
    projection_groups,
    rows,
    set_parameter,
)

__all__ = ["WeightLayoutError", "build_shared_model", "engine_format", "shared_storage_report"]

PACKED_FORMATS: tuple[ModuleType, ...] = (marlin_int, fp8, bnb_nf4)


def engine_format(engine_model: nn.Module) -> ModuleType | None:
    """The format module of the engine's linear layers, or None for 16-bit weights."""
    first = unwrap_lora_layer(engine_model.model.layers[0].self_attn.qkv_proj)
    return next((f for f in PACKED_FORMATS if f.matches(first)), None)


def _install_packed_linears(model: nn.Module, engine_model: nn.Module, config, fmt: ModuleType,
                            dtype: torch.dtype) -> None:
    """Replace every q/k/v/o/gate/up/down ``nn.Linear`` of ``model`` with ``fmt``'s views of the engine."""
    for layer, engine_layer in zip(model.model.layers, engine_model.model.layers, strict=True):
        for parent, engine_linear, names, sizes in projection_groups(config, layer, engine_layer):
            if not fmt.matches(engine_linear):
                raise WeightLayoutError(f"engine layer {type(engine_linear).__name__} is not in the "
                                        f"{fmt.__name__} format of the rest of the model")
            modules = fmt.shard_modules(engine_linear, sizes, dtype)
            if len(modules) != len(names):
                raise WeightLayoutError(f"engine {type(engine_linear).__name__} has {len(modules)} shards, "
                                        f"expected {len(names)} for {names}")
            bias = getattr(engine_linear, "bias", None)
            biases = rows(bias, sizes) if bias is not None else [None] * len(names)
            for name, module, b in zip(names, modules, biases, strict=True):
                old = getattr(parent, name)
                if tuple(old.weight.shape) != (module.out_features, module.in_features):
                    raise WeightLayoutError(f"{name}: engine shard {module.out_features}x{module.in_features} "
                                            f"vs model {tuple(old.weight.shape)}")
                if b is not None:
                    module.bias = nn.Parameter(plain(b), requires_grad=False)
                setattr(parent, name, module)


def build_shared_model(engine_model: nn.Module, config, dtype: torch.dtype) -> nn.Module:
    """A transformers ``*ForCausalLM`` whose every base parameter views ``engine_model``'s tensors."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    device = engine_model.model.embed_tokens.weight.device
    fmt = engine_format(engine_model)
    for name, view in engine_views(engine_model, config, linears=fmt is None):
        set_parameter(model, name, view)
    if fmt is not None:
        _install_packed_linears(model, engine_model, config, fmt, dtype)
        for flag, value in fmt.MODEL_FLAGS.items():
            model.__dict__[flag] = value
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
    """Count transformers base parameters whose storage (and every statistic they read, for packed
    formats) lies inside an engine tensor's storage."""
    engine_tensors = list(engine_model.parameters()) + list(engine_model.buffers())
    for p in list(engine_model.parameters()):
        for fmt in PACKED_FORMATS:
            engine_tensors += fmt.engine_statistics(p)
    ranges = []
    for t in engine_tensors:
        if t.numel():
            start = t.untyped_storage().data_ptr()
            ranges.append((start, start + t.untyped_storage().nbytes()))

    def inside(t: torch.Tensor) -> bool:
        return any(lo <= t.data_ptr() < hi for lo, hi in ranges)

    shared = separate = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        extra = [t for fmt in PACKED_FORMATS for t in fmt.trainer_statistics(p)]
        if inside(p) and all(inside(t) for t in extra):
            shared += 1
        else:
            separate += 1
    return {"shared": shared, "separate": separate}
