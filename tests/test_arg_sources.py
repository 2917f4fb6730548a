"""Arguments that used to be ignored or misread without a word (an audit of the seed arguments, 2026-12-02):
``model_name``/``revision``/``token`` types and local paths, a checkpoint missing weights, the length
cap under linear RoPE scaling and in ``get_peft_model``, ``get_peft_model``'s selections, the CPU
engine's ``gpu_memory_utilization`` and the one-time CPU quantisation warning."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
from conftest import ENGINE_KWARGS
from model_variants import tiny_llama

from trainserve import FastLanguageModel, tiny_model


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(model_name=None), TypeError, "model_name must be"),
    (dict(model_name=123), TypeError, "model_name must be"),
    (dict(model_name="  "), TypeError, "model_name must be"),
    (dict(model_name="/no/such/model/dir"), FileNotFoundError, "model_name='/no/such/model/dir' is not a directory"),
    (dict(revision="main"), ValueError, "revision='main' selects a Hub revision.*local directory"),
    (dict(revision=123), ValueError, "revision must be"),
    (dict(revision=""), ValueError, "revision must be"),
    (dict(token=123), ValueError, "token must be"),
    (dict(token=["a"]), ValueError, "token must be"),
    (dict(token=""), ValueError, "token must be"),
])
def test_model_source_arguments_are_checked_before_anything_loads(kwargs, error, match):
    args = {"model_name": tiny_model(), **kwargs}
    with pytest.raises(error, match=match):
        FastLanguageModel.from_pretrained(args.pop("model_name"), load_in_4bit=False, **args)


def test_a_model_directory_given_as_a_path_object_loads(tmp_path):
    model, _ = FastLanguageModel.from_pretrained(Path(tiny_model()), load_in_4bit=False, token=True)
    assert model.config.model_type == "qwen2"


def test_a_checkpoint_missing_a_weight_is_refused_before_the_engine_starts(tmp_path):
    from safetensors.torch import load_file, save_file

    from trainserve.engine.launch import current_engine

    out = tmp_path / "incomplete"
    shutil.copytree(tiny_model(), out)
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    before = current_engine()
    with pytest.raises(ValueError, match=r"lacks 1 weight.*model\.layers\.1\.mlp\.down_proj\.weight"):
        FastLanguageModel.from_pretrained(str(out), **ENGINE_KWARGS)
    assert current_engine() is before  # refused before an engine started


def test_the_complete_checkpoint_passes_the_weight_check():
    from transformers import AutoConfig

    from trainserve.checkpoint_check import check_checkpoint_complete, expected_tensor_names

    config = AutoConfig.from_pretrained(tiny_model())
    check_checkpoint_complete(tiny_model(), config)
    assert "model.layers.0.self_attn.q_proj.bias" in expected_tensor_names(config)  # Qwen2's q/k/v biases
    # an attention implementation this machine lacks neither breaks the check nor is changed by it
    fa2 = AutoConfig.from_pretrained(tiny_model(), attn_implementation="flash_attention_2")
    check_checkpoint_complete(tiny_model(), fa2)
    assert fa2._attn_implementation == "flash_attention_2"


def test_linear_rope_scaling_caps_max_seq_length_at_the_scaled_positions(tmp_path):
    path = tiny_llama(tmp_path / "llama")
    with pytest.warns(UserWarning, match=r"=100000 exceeds .*=1024 x the linear rope_scaling factor 2 \(2048\); using"):
        model, _ = FastLanguageModel.from_pretrained(path, load_in_4bit=False, max_seq_length=100_000,
                                                     rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert model.max_seq_length == 2048  # 1024 positions x 2
    with pytest.warns(UserWarning, match=r"\(1024\); using 1024"):  # "default" RoPE extends nothing
        model, _ = FastLanguageModel.from_pretrained(path, load_in_4bit=False, max_seq_length=8192,
                                                     rope_scaling={"rope_type": "default"})
    assert model.max_seq_length == 1024


def test_get_peft_model_caps_max_seq_length():
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False)
    with pytest.warns(UserWarning, match=r"max_seq_length=100000 exceeds the model's max_position_embeddings \(1024\)"):
        peft_model = FastLanguageModel.get_peft_model(model, r=4, max_seq_length=100_000)
    assert peft_model.max_seq_length == model.config.max_position_embeddings


@pytest.mark.parametrize("model", [None, "abc", 3])
def test_get_peft_model_needs_a_model(model):
    with pytest.raises(TypeError, match="get_peft_model's model must be"):
        FastLanguageModel.get_peft_model(model, r=4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(modules_to_save=5), "modules_to_save must be"),
    (dict(modules_to_save=[1]), "modules_to_save must be"),
    (dict(layers_to_transform=[]), "layers_to_transform must be"),  # peft reads [] as "every layer"
    (dict(layers_to_transform="abc"), "layers_to_transform must be"),
    (dict(layers_to_transform=[0, 99]), "layers_to_transform must be"),
    (dict(layers_to_transform=[True]), "layers_to_transform must be"),
    (dict(loftq_config=0), "loftq_config must be"),  # was read as "no LoftQ"
    (dict(loftq_config=[]), "loftq_config must be"),
    (dict(loftq_config=""), "loftq_config must be"),
])
def test_get_peft_model_selections_of_the_wrong_type_are_refused(kwargs, match):
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False)
    with pytest.raises(ValueError, match=match):
        FastLanguageModel.get_peft_model(model, r=4, **kwargs)
    assert not hasattr(model, "peft_config")  # refused before peft changed the model


def test_layers_to_transform_selects_layers():
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False)
    peft_model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"], layers_to_transform=1)
    names = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert names and all(".layers.1." in n for n in names)


def test_gpu_memory_utilization_on_the_cpu_engine_is_named_once(monkeypatch):
    import trainserve.arg_checks as arg_checks

    monkeypatch.setattr(arg_checks, "_CPU_WARNED", set())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            arg_checks.check_cpu_engine(fast_inference=True, cuda=False, gpu_memory_utilization=0.3,
                                        float8_kv_cache=False)
        arg_checks.check_cpu_engine(fast_inference=True, cuda=True, gpu_memory_utilization=0.3, float8_kv_cache=False)
    messages = [str(w.message) for w in seen]
    assert len(messages) == 1 and "gpu_memory_utilization=0.3 has no effect on the CPU engine" in messages[0]
    with pytest.raises(NotImplementedError, match="float8_kv_cache"):
        arg_checks.check_cpu_engine(fast_inference=True, cuda=False, gpu_memory_utilization=0.5, float8_kv_cache=True)


def test_a_failed_load_does_not_use_up_the_cpu_quantisation_warning(tmp_path, monkeypatch):
    import trainserve.precision as precision

    monkeypatch.setattr(precision, "_WARNED", set())
    empty = tmp_path / "no_config"
    empty.mkdir()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises((OSError, ValueError)):  # no config.json: transformers refuses the directory
            FastLanguageModel.from_pretrained(str(empty), load_in_4bit=True)
        assert not [w for w in seen if "need CUDA" in str(w.message)]
        FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=True)
    assert len([w for w in seen if "int4 weights need CUDA" in str(w.message)]) == 1
