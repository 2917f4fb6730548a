"""Issue 2: bad arguments give clear errors naming the argument."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny_fast

from trainserve import FastLanguageModel, tiny_model
from trainserve.model_api import state_of


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
    # wrong types and ranges: refused by name before anything loads (they used to fail unnamed deep inside
    # transformers/vLLM, after the engine started, or be reinterpreted: "False" is truthy)
    (dict(dtype="BFloat16"), ValueError, "dtype.*'BFloat16'"),
    (dict(max_seq_length="512"), ValueError, "max_seq_length"),
    (dict(max_seq_length=512.5), ValueError, "max_seq_length"),
    (dict(gpu_memory_utilization="0.5"), ValueError, "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=True), ValueError, "gpu_memory_utilization"),
    (dict(random_state=-1), ValueError, "random_state"),
    (dict(random_state=None), ValueError, "random_state"),
    (dict(max_lora_rank=0), ValueError, "max_lora_rank"),
    (dict(max_lora_rank="64"), ValueError, "max_lora_rank"),
    (dict(max_lora_rank=1000), ValueError, "max_lora_rank"),
    (dict(max_loras=0), ValueError, "max_loras"),
    (dict(fast_inference="False"), ValueError, "fast_inference"),
    (dict(fix_tokenizer="no"), ValueError, "fix_tokenizer"),
    (dict(trust_remote_code="yes"), ValueError, "trust_remote_code"),
    (dict(float8_kv_cache=0), ValueError, "float8_kv_cache"),
    (dict(standby="no"), ValueError, "standby"),
])
def test_unsupported_from_pretrained_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(bias="all"), NotImplementedError, "bias"),
    (dict(modules_to_save=["lm_head"]), NotImplementedError, "modules_to_save"),
    (dict(use_gradient_checkpointing="sometimes"), ValueError, "use_gradient_checkpointing"),
    (dict(unknown_flag=True), TypeError, "unknown_flag"),
    (dict(lora_alpha="16"), ValueError, "lora_alpha"),
    (dict(lora_alpha=0), ValueError, "lora_alpha"),
    (dict(r=True), ValueError, "r must be"),
    (dict(use_rslora="yes"), ValueError, "use_rslora"),
    (dict(random_state=None), ValueError, "random_state"),
    (dict(target_modules=None), ValueError, "target_modules"),
    (dict(target_modules=[1]), ValueError, "target_modules"),
    (dict(max_seq_length=-1), ValueError, "max_seq_length"),
])
def test_unsupported_get_peft_model_arguments(kwargs, error, match):
    model, _ = load_tiny_fast()
    with pytest.raises(error, match=match):
        FastLanguageModel.get_peft_model(model, **{"r": 8, **kwargs})
    # refused before peft changed the model: the same model still takes a valid call, served live
    peft_model = FastLanguageModel.get_peft_model(model, r=8)
    assert state_of(model).peft_model is peft_model and state_of(model).live is not None


def test_get_peft_model_takes_from_pretrained_checkpointing_spellings():
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False)
    peft_model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"],
                                                  use_gradient_checkpointing="Unsloth")
    assert peft_model.get_base_model().model._trainserve_gc == "unsloth"


def test_fast_generate_save_lora_and_load_lora_arguments_are_checked(tmp_path):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    model, _ = load_tiny_fast()
    model = FastLanguageModel.get_peft_model(model, r=8)
    greedy = SamplingParams(max_tokens=2, temperature=0)
    with pytest.raises(TypeError, match="sampling_params"):
        model.fast_generate("Hi", {"max_tokens": 2})
    with pytest.raises(TypeError, match="lora_request"):
        model.fast_generate("Hi", greedy, lora_request="adapters/a")
    with pytest.raises(TypeError, match="save_directory"):
        model.save_lora(None)  # used to write ./None
    with pytest.raises(TypeError, match="bogus"):
        model.save_lora(tmp_path / "x", bogus=1)  # peft ignores unknown keywords
    with pytest.raises(ValueError, match="safe_serialization"):
        model.save_lora(tmp_path / "x", safe_serialization=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_lora(tmp_path / "a")
    request = model.load_lora(tmp_path / "a")
    with pytest.raises(TypeError, match="name"):
        model.load_lora(tmp_path / "a", name=5)
    with pytest.raises(TypeError, match="lora_request"):
        model.fast_generate("Hi", greedy, lora_request=[request])
    # vLLM caches adapters by id: a hand-built request reusing an id would be served the cached adapter
    model.save_lora(tmp_path / "b")
    path_b = str(tmp_path / "b")
    for forged in (LoRARequest("b", request.lora_int_id, path_b), LoRARequest("b", 777, path_b)):
        with pytest.raises(ValueError, match="load_lora"):
            model.fast_generate("Hi", greedy, lora_request=forged)
    assert model.fast_generate("Hi", greedy, lora_request=request)[0].outputs[0].token_ids


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


def test_engine_only_arguments_without_the_engine_are_named_in_a_warning():
    """Unsloth scripts switch the engine off and keep its settings: not refused, but never dropped silently."""
    import warnings

    from trainserve import FastLanguageModel, tiny_model

    with pytest.warns(UserWarning, match=r"fast_inference=False: max_lora_rank=16, standby=False only configure"):
        FastLanguageModel.from_pretrained(tiny_model(), fast_inference=False, max_lora_rank=16, standby=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        FastLanguageModel.from_pretrained(tiny_model(), fast_inference=False)  # defaults: nothing to name
    assert not [w for w in seen if "only configure the colocated" in str(w.message)]
