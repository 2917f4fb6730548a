"""Fails loudly when the installed vLLM moves an internal that trainserve.engine.vllm_compat uses."""

from __future__ import annotations

import torch
from conftest import load_tiny_fast

from trainserve.engine import vllm_compat
from trainserve.engine.launch import LIVE_LORA_IDS
from trainserve.model_api import state_of


def test_linear_weights_stay_in_plain_layout():
    model, _ = load_tiny_fast()
    engine_model = state_of(model).engine.model
    assert type(engine_model).__name__.startswith("Trainserve")
    qkv = vllm_compat.unwrap_lora_layer(engine_model.model.layers[0].self_attn.qkv_proj)
    cfg = model.config
    rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    assert tuple(qkv.weight.shape) == (rows, cfg.hidden_size)  # not repacked/emptied for oneDNN


def test_lora_slot_layout_and_manager():
    from trainserve import FastLanguageModel

    model = FastLanguageModel.get_peft_model(load_tiny_fast()[0], r=8, target_modules=["q_proj", "gate_proj"])
    engine = state_of(model).engine
    manager = vllm_compat.lora_model_manager(engine.llm)
    slots = [vllm_compat.lora_slot(manager, i) for i in LIVE_LORA_IDS]
    assert all(s is not None for s in slots) and len(set(slots)) == 2
    layers = dict(vllm_compat.lora_layers(engine.model))
    assert {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj",
            "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"} <= set(layers)
    a, b = vllm_compat.slot_tensors(layers["model.layers.0.self_attn.qkv_proj"], slots[0], 2)
    assert a.shape == (engine.spec.max_lora_rank, model.config.hidden_size)
    assert b.shape == (model.config.num_key_value_heads * model.config.head_dim, engine.spec.max_lora_rank)


def test_writing_a_slot_changes_generation():
    """The contract the live adapter relies on: in-place slot writes are what the engine uses."""
    from helpers import engine_tokens

    from trainserve import FastLanguageModel

    model = FastLanguageModel.get_peft_model(load_tiny_fast()[0], r=8, target_modules=["down_proj"])
    live = state_of(model).live
    before = engine_tokens(model, "Once upon a time")
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.normal_(0, 1.0)
    after = engine_tokens(model, "Once upon a time")
    assert live.updates >= 2 and after != before


def test_sleep_mode_allocator_helpers_are_safe_without_it() -> None:
    """Without CUDA there is no sleep-mode allocator: the helpers report nothing and do nothing."""
    assert vllm_compat.cumem_bytes_in_use() == 0
    assert vllm_compat.kv_cache_ranges() == []
    vllm_compat.release_cumem_pools()


def test_quantization_registration_api() -> None:
    """trainserve's integer formats register through vLLM's public API and are then known to it."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from trainserve.engine.quant_method import register

    for name in ("trainserve_int4", "trainserve_int8"):
        register(name)
        assert name in QUANTIZATION_METHODS
        config = get_quantization_config(name)()
        assert config.get_name() == name and config.get_config_filenames() == []


def test_prefix_cache_reset_and_logprobs_mode():
    llm = state_of(load_tiny_fast()[0]).engine.llm
    assert vllm_compat.reset_prefix_cache(llm) is True
    assert vllm_compat.reset_prefix_cache(llm, running=True) is True
    assert vllm_compat.logprobs_mode(llm) in ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")


def test_machete_support_is_refused_off_hopper():
    assert vllm_compat.machete_unsupported(4096, 4096, 64, torch.bfloat16, torch.device("cpu")) == "not a CUDA device"
