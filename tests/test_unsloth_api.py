"""Issue 12: the per-architecture classes (``FastQwen2Model`` / ``FastLlamaModel.from_pretrained``) and
the Hugging Face keywords Unsloth passes through (honoured, or refused by name)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ENGINE_KWARGS
from helpers import engine_tokens
from model_variants import tiny_llama

from trainserve import FastLanguageModel, FastLlamaModel, FastQwen2Model, tiny_model
from trainserve.engine.launch import current_engine, shutdown_engine

NO_ENGINE = dict(max_seq_length=256, load_in_4bit=False)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> str:
    return tiny_llama(tmp_path_factory.mktemp("llama"))


# ------------------------------------------------------------------ FastQwen2Model / FastLlamaModel
def test_architecture_classes_load_their_architecture(llama_path):
    with pytest.warns(UserWarning, match="max_seq_length=4096 exceeds"):  # seed 000's default, clamped
        model, tok = FastQwen2Model.from_pretrained(tiny_model(), load_in_4bit=False)
    assert model.config.model_type == "qwen2" and model.max_seq_length == 1024
    model = FastQwen2Model.get_peft_model(model, r=4, target_modules=["q_proj"])
    assert hasattr(model, "peft_config")
    llama, _ = FastLlamaModel.from_pretrained(llama_path, **NO_ENGINE)
    assert llama.config.model_type == "llama"


def test_architecture_classes_refuse_other_architectures(llama_path):
    with pytest.raises(ValueError, match="FastLlamaModel.*'llama'.*'qwen2'"):
        FastLlamaModel.from_pretrained(tiny_model(), **NO_ENGINE)
    with pytest.raises(ValueError, match="FastQwen2Model.*'qwen2'.*'llama'"):
        FastQwen2Model.from_pretrained(llama_path, **NO_ENGINE)
    with pytest.raises(ValueError, match="Qwen2 does not support the rope_scaling argument.*config.json"):
        FastQwen2Model.from_pretrained(tiny_model(), rope_scaling={"type": "linear", "factor": 2.0}, **NO_ENGINE)


def test_architecture_class_loads_a_saved_adapter(tmp_path, llama_path):
    model, tok = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"])
    model.save_pretrained_merged(tmp_path / "lora", tok, save_method="lora")
    again, _ = FastQwen2Model.from_pretrained(str(tmp_path / "lora"), **NO_ENGINE)
    assert hasattr(again, "peft_config")
    with pytest.raises(ValueError, match="FastLlamaModel"):
        FastLlamaModel.from_pretrained(str(tmp_path / "lora"), **NO_ENGINE)


@pytest.mark.engine
def test_fast_qwen2_model_with_the_engine():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, tok = FastQwen2Model.from_pretrained(tiny_model(), **ENGINE_KWARGS)
    assert len(engine_tokens(model, "The secret phrase is", n=4)) == 4


# ------------------------------------------------------------------ Hugging Face pass-through keywords
def test_torch_dtype_is_an_alias_of_dtype():
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), torch_dtype=torch.bfloat16, **NO_ENGINE)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), torch_dtype="float32", dtype=torch.float32,
                                                 **NO_ENGINE)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="torch_dtype.*disagree"):
        FastLanguageModel.from_pretrained(tiny_model(), dtype=torch.float32, torch_dtype=torch.bfloat16, **NO_ENGINE)


def test_low_cpu_mem_usage_true_is_what_trainserve_does_false_is_refused():
    FastLanguageModel.from_pretrained(tiny_model(), low_cpu_mem_usage=True, **NO_ENGINE)
    with pytest.raises(NotImplementedError, match="low_cpu_mem_usage=False"):
        FastLanguageModel.from_pretrained(tiny_model(), low_cpu_mem_usage=False, **NO_ENGINE)


def test_attn_implementation_reaches_the_model_config():
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), attn_implementation="eager", **NO_ENGINE)
    assert model.config._attn_implementation == "eager"
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), attn_implementation="sdpa", **NO_ENGINE)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attn_implementation='fastest'"):
        FastLanguageModel.from_pretrained(tiny_model(), attn_implementation="fastest", **NO_ENGINE)


@pytest.mark.engine
def test_attn_implementation_with_the_engine():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, _ = FastLanguageModel.from_pretrained(tiny_model(), attn_implementation="eager", **ENGINE_KWARGS)
    assert model.config._attn_implementation == "eager"


def _fake_hub_cache(root: Path, repo: str = "trainserve/tiny") -> Path:
    """A Hugging Face cache holding the tiny model as ``repo`` (the layout huggingface_hub writes)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    for f in Path(tiny_model()).iterdir():
        if f.is_file():
            shutil.copy(f, snapshot / f.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123456789abcdef")
    return snapshot


def test_cache_dir_and_local_files_only_resolve_one_local_snapshot(tmp_path):
    snapshot = _fake_hub_cache(tmp_path / "hub")
    model, tok = FastLanguageModel.from_pretrained("trainserve/tiny", cache_dir=tmp_path / "hub",
                                                   local_files_only=True, **NO_ENGINE)
    assert Path(model.config._name_or_path) == snapshot
    with pytest.raises(OSError, match="local_files_only=True"):
        FastLanguageModel.from_pretrained("trainserve/not-cached", cache_dir=tmp_path / "hub",
                                          local_files_only=True, **NO_ENGINE)


@pytest.mark.engine
def test_cache_dir_snapshot_is_what_the_engine_loads(tmp_path):
    snapshot = _fake_hub_cache(tmp_path / "hub")
    shutdown_engine()  # the engine of another model path: a new one
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model, _ = FastLanguageModel.from_pretrained("trainserve/tiny", cache_dir=str(tmp_path / "hub"),
                                                         local_files_only=True, **ENGINE_KWARGS)
        assert Path(current_engine().spec.model_path) == snapshot
        assert len(engine_tokens(model, "The secret phrase is", n=4)) == 4
    finally:
        shutdown_engine()


# ------------------------------------------------------------------ seed 002 arguments not covered elsewhere
def test_fix_tokenizer_sets_a_missing_pad_token(tmp_path):
    import json

    from model_variants import tiny_qwen2_with

    path = Path(tiny_qwen2_with(tmp_path / "nopad"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["pad_token"] = None  # (absent, transformers would default it to <|endoftext|>)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, tok = FastLanguageModel.from_pretrained(str(path), fix_tokenizer=True, **NO_ENGINE)
    assert tok.pad_token == tok.eos_token
    _, tok = FastLanguageModel.from_pretrained(str(path), fix_tokenizer=False, **NO_ENGINE)
    assert tok.pad_token is None


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(offload_embedding=True), NotImplementedError, "offload_embedding"),
    (dict(unsloth_tiled_mlp=True), NotImplementedError, "unsloth_tiled_mlp"),
    pytest.param(dict(float8_kv_cache=True), NotImplementedError, "float8_kv_cache",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")),
])
def test_seed_arguments_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE, **kwargs)


def test_get_peft_model_seed_arguments():
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    # loftq_config and bias: tests/test_lora_variants.py
    peft_model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_rslora=True,
                                                  target_modules=["q_proj"])
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # rank-stabilised: alpha / sqrt(r)


def test_get_peft_model_random_state_decides_the_initial_adapter():
    def lora_a(seed: int) -> torch.Tensor:
        model, _ = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
        peft_model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"], random_state=seed)
        return peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()

    assert torch.equal(lora_a(1), lora_a(1))
    assert not torch.equal(lora_a(1), lora_a(2))


def test_from_pretrained_random_state_seeds_torch():
    FastLanguageModel.from_pretrained(tiny_model(), random_state=5, **NO_ENGINE)
    assert torch.initial_seed() == 5
