"""Issue 2: bad arguments give clear errors naming the argument."""

from __future__ import annotations

import pytest
from conftest import load_tiny_fast

from trainserve import FastLanguageModel, tiny_model


def test_rank_above_max_lora_rank():
    model, _ = load_tiny_fast()
    with pytest.raises(ValueError, match="max_lora_rank"):
        FastLanguageModel.get_peft_model(model, r=32)


@pytest.mark.parametrize("targets", [["q_proj", "attn_proj"], ["lm_head"], []])
def test_unknown_target_modules(targets):
    model, _ = load_tiny_fast()
    with pytest.raises(ValueError, match="target modules"):
        FastLanguageModel.get_peft_model(model, r=8, target_modules=targets)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 2])
def test_lora_dropout_range(dropout):
    model, _ = load_tiny_fast()
    with pytest.raises(ValueError, match="lora_dropout"):
        FastLanguageModel.get_peft_model(model, r=8, lora_dropout=dropout)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(load_in_8bit=True, load_in_16bit=True), ValueError, "load_in_8bit=True and load_in_16bit=True"),
    (dict(load_in_fp8="per-row"), ValueError, "load_in_fp8"),
    (dict(quant_backend="awq"), ValueError, "quant_backend"),
    (dict(qat_scheme="int4"), NotImplementedError, "qat_scheme"),
    (dict(no_such_argument=1), TypeError, "no_such_argument"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), ValueError, "rope_scaling"),
    (dict(device_map={"model": 0, "lm_head": 1}), NotImplementedError, "device_map"),
    (dict(gpu_memory_utilization=1.5), ValueError, "gpu_memory_utilization"),
    (dict(max_seq_length=0), ValueError, "max_seq_length"),
    (dict(dtype="int8"), ValueError, "dtype"),
])
def test_unsupported_from_pretrained_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(bias="all"), NotImplementedError, "bias"),
    (dict(modules_to_save=["lm_head"]), NotImplementedError, "modules_to_save"),
    (dict(use_gradient_checkpointing="sometimes"), ValueError, "use_gradient_checkpointing"),
    (dict(unknown_flag=True), TypeError, "unknown_flag"),
])
def test_unsupported_get_peft_model_arguments(kwargs, error, match):
    model, _ = load_tiny_fast()
    with pytest.raises(error, match=match):
        FastLanguageModel.get_peft_model(model, r=8, **kwargs)


def test_a_second_engine_with_other_settings_is_refused():
    load_tiny_fast()
    with pytest.raises(RuntimeError, match="one vLLM engine per process"):
        load_tiny_fast(max_lora_rank=64)


def test_fast_generate_needs_fast_inference():
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False, fast_inference=False)
    with pytest.raises(RuntimeError, match="fast_inference=True"):  # trainserve's error, not AttributeError
        model.fast_generate("Hi")
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"])
    for call in (lambda: model.fast_generate("Hi"), lambda: model.load_lora("adapters/none"),
                 lambda: model.serve(port=0)):
        with pytest.raises(RuntimeError, match="fast_inference=True"):
            call()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_max_seq_length_beyond_the_model_is_clamped_with_a_warning():
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        model, _ = FastLanguageModel.from_pretrained(tiny_model(), max_seq_length=100_000, load_in_4bit=False)
    assert model.max_seq_length == model.config.max_position_embeddings
