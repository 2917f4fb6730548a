"""Issue 10, items 3-6: from_pretrained arguments reach both sides (trainer and engine) or are refused
before the engine starts, and a failed load never leaves an engine behind.

Several tests here need an engine with other settings than the shared one; they shut the running
engine down first (a later test restarts the shared one).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from model_variants import tiny_llama, tiny_qwen2_with

from trainserve import FastLanguageModel, tiny_model
from trainserve.engine.launch import current_engine, shutdown_engine

ENGINE = dict(max_seq_length=256, load_in_4bit=False, fast_inference=True, gpu_memory_utilization=0.3,
              max_lora_rank=16)
PROMPT = "The old bridge over the river reads the map of stars and the small robot writes a secret phrase"


@pytest.fixture
def no_engine():
    """Start the test without an engine (and leave none behind)."""
    shutdown_engine()
    yield
    shutdown_engine()


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> str:
    return tiny_llama(tmp_path_factory.mktemp("llama"))


def _engine_hf_config():
    return current_engine().llm.llm_engine.model_config.hf_config


def _logprob_gap(model, tokenizer) -> tuple[float, list[float]]:
    """Max |engine - trainer| prompt-token logprob, and the trainer's logprobs."""
    from vllm import SamplingParams

    ids = tokenizer(PROMPT).input_ids
    out = model.fast_generate([ids], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    engine = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    trainer = [logp[i, t].item() for i, t in enumerate(ids[1:])]
    return max(abs(a - b) for a, b in zip(engine, trainer, strict=True)), trainer


# ---------------------------------------------------------------- item 3: RoPE scaling on both sides
LINEAR = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}


@pytest.mark.engine
@pytest.mark.parametrize("rope_scaling, expected", [
    ({"type": "linear", "factor": 4}, LINEAR),                                       # Unsloth / HF 4.x legacy
    ({"rope_type": "linear", "factor": 4.0}, LINEAR),                                # HF 4.x
    ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, LINEAR),         # HF 5 rope_parameters
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, None),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}, None),
])
def test_rope_scaling_reaches_trainer_and_engine_identically(llama_path, rope_scaling, expected):
    from transformers import AutoModelForCausalLM

    running = current_engine()  # the three linear spellings share one engine; anything else needs its own
    if running is None or running.spec.rope_parameters is None or expected is None or json.loads(
            running.spec.rope_parameters) != expected or running.spec.model_path != llama_path:
        shutdown_engine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, tok = FastLanguageModel.from_pretrained(llama_path, rope_scaling=rope_scaling, **ENGINE)
    trainer_rope = dict(model.config.rope_parameters)
    engine_rope = dict(_engine_hf_config().rope_parameters)
    if expected is not None:
        assert trainer_rope == expected
    assert engine_rope == trainer_rope
    assert model.model.rotary_emb.rope_type == trainer_rope["rope_type"]
    gap, trainer = _logprob_gap(model, tok)
    assert gap <= 1e-4, f"engine and trainer disagree by {gap} (fp32 on CPU: the same numbers)"
    unscaled = AutoModelForCausalLM.from_pretrained(llama_path)  # the scaling must matter on this prompt
    ids = torch.tensor([tok(PROMPT).input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(unscaled(ids).logits[0].float(), -1)
    plain = [logp[i, t].item() for i, t in enumerate(ids[0, 1:].tolist())]
    assert max(abs(a - b) for a, b in zip(plain, trainer, strict=True)) > 1e-3


@pytest.mark.parametrize("rope_scaling", [
    {"type": "dynamic", "factor": 2.0},                      # vLLM and transformers scale it differently
    {"rope_type": "linear"},                                 # no factor
    {"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0},   # key linear does not take
    {"type": "linear", "rope_type": "yarn", "factor": 2.0},  # two different types
    {"rope_type": "linear", "factor": 0.5},
    {"factor": 2.0},                                         # no type
    "linear",
])
def test_bad_rope_scaling_is_refused_before_the_engine_starts(no_engine, llama_path, rope_scaling):
    with pytest.raises(ValueError, match="rope_scaling"):
        FastLanguageModel.from_pretrained(llama_path, rope_scaling=rope_scaling, **ENGINE)
    assert current_engine() is None


def test_unsupported_rope_in_the_checkpoint_config_is_refused_before_the_engine_starts(no_engine, tmp_path):
    path = tiny_llama(tmp_path / "dyn", rope={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="'dynamic'"):
        FastLanguageModel.from_pretrained(path, **ENGINE)
    assert current_engine() is None


# ---------------------------------------------------------------- item 4: engine-side arguments
@pytest.mark.engine
def _hub_cache_with_tag(cache, repo: str, tag: str, files: str) -> None:
    """A Hugging Face cache (the layout ``snapshot_download`` reads offline) holding ``files`` as ``repo`` at
    ``tag``: what a download of that revision leaves behind."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / tag).write_text(commit)
    shutil.copytree(files, root / "snapshots" / commit)


def test_hub_arguments_reach_the_engine(no_engine, llama_path, tmp_path):
    # a Hub id at a tag, resolved offline from the cache (a local directory with revision is refused)
    _hub_cache_with_tag(tmp_path / "hub", "trainserve/tiny-llama", "v1.0", llama_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        FastLanguageModel.from_pretrained("trainserve/tiny-llama", revision="v1.0", token="hf_secret_value",
                                          cache_dir=str(tmp_path / "hub"), local_files_only=True,
                                          trust_remote_code=True, disable_log_stats=False, **ENGINE)
    engine = current_engine()
    model_config = engine.llm.llm_engine.model_config
    assert model_config.revision == "v1.0" and model_config.tokenizer_revision == "v1.0"
    assert model_config.trust_remote_code is True
    assert model_config.hf_token == "hf_secret_value"
    assert engine.llm.llm_engine.log_stats is True  # disable_log_stats=False
    assert "hf_secret_value" not in repr(engine.spec)
    _hub_cache_with_tag(tmp_path / "hub2", "trainserve/tiny-llama", "v2.0", llama_path)
    with pytest.raises(RuntimeError, match="revision") as info:  # a different revision needs a new engine
        FastLanguageModel.from_pretrained("trainserve/tiny-llama", revision="v2.0", token="hf_other_secret",
                                          cache_dir=str(tmp_path / "hub2"), local_files_only=True, **ENGINE)
    assert "secret" not in str(info.value)


def test_use_gradient_checkpointing_is_validated():
    with pytest.raises(ValueError, match="use_gradient_checkpointing"):
        FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False, use_gradient_checkpointing="bogus")
    with pytest.raises(ValueError, match="disable_log_stats"):
        FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False, disable_log_stats="no")


def _saved_tensors_in_training_step(model) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    ids = torch.randint(3, 500, (1, 32), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return count


def test_full_finetuning_uses_from_pretrained_gradient_checkpointing():
    models = {gc: FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False, full_finetuning=True,
                                                    use_gradient_checkpointing=gc)[0] for gc in (True, False)}
    assert models[True].model._trainserve_gc is True and models[False].model._trainserve_gc is False
    # Checkpointing keeps only each layer's input for the backward: far fewer saved tensors.
    assert _saved_tensors_in_training_step(models[True]) < _saved_tensors_in_training_step(models[False])
    assert all(p.grad is not None for p in models[True].parameters() if p.requires_grad)


def test_get_peft_model_on_a_full_finetuning_model_is_refused_without_the_engine_too():
    """peft would freeze every base weight: full_finetuning=True would silently become LoRA."""
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False, full_finetuning=True)
    with pytest.raises(ValueError, match="full_finetuning=True"):
        FastLanguageModel.get_peft_model(model, r=4)
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model, "peft_config")


# ---------------------------------------------------------------- item 5: failed loads leave no engine
# Qwen2 with YaRN in its config.json loads (trainer = engine): tests/test_rope_yarn.py


def test_mixed_sliding_window_layers_are_refused_before_the_engine_starts(no_engine, tmp_path):
    path = tiny_qwen2_with(tmp_path / "sw", use_sliding_window=True, sliding_window=64, max_window_layers=1,
                           layer_types=None)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        FastLanguageModel.from_pretrained(path, **ENGINE)
    assert current_engine() is None


@pytest.mark.engine
def test_a_load_failing_after_the_engine_started_shuts_it_down(no_engine, monkeypatch):
    from trainserve.models.qwen2 import FastQwen2Model

    def boom(cls, model, use_gradient_checkpointing="unsloth"):
        raise RuntimeError("patching failed")

    with monkeypatch.context() as patch:
        patch.setattr(FastQwen2Model, "patch_model", classmethod(boom))
        with pytest.raises(RuntimeError, match="patching failed"):
            FastLanguageModel.from_pretrained(tiny_model(), **ENGINE)
    assert current_engine() is None
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), **ENGINE)  # no "already running" error
    running = current_engine()
    with monkeypatch.context() as patch:  # a load that reused the running engine leaves it running
        patch.setattr(FastQwen2Model, "patch_model", classmethod(boom))
        with pytest.raises(RuntimeError, match="patching failed"):
            FastLanguageModel.from_pretrained(tiny_model(), **ENGINE)
    assert current_engine() is running


# ---------------------------------------------------------------- item 6: smaller ones
def test_harmless_seed_values_are_accepted():
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False, use_exact_model_name=True,
                                                 float32_mixed_precision=False, device_map={"": "cpu"})
    assert model.device.type == "cpu"
    with pytest.raises(NotImplementedError, match="float32_mixed_precision"):
        FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False, float32_mixed_precision=True)
    with pytest.raises(NotImplementedError, match="use_exact_model_name"):
        FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False, use_exact_model_name="yes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("device_map", ["cuda", {"": 0}, {"": "cuda:0"}])
def test_device_map_naming_cuda_is_refused_without_cuda(device_map):
    with pytest.raises(ValueError, match="device_map"):
        FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False, device_map=device_map)


def test_embedding_and_head_targets_are_trained_in_full_as_in_unsloth():
    """``embed_tokens``/``lm_head`` in target_modules become modules_to_save (tests/test_trainable_embeddings.py)."""
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), load_in_4bit=False)
    with pytest.raises(ValueError, match="target modules is empty"):  # nothing left for LoRA
        FastLanguageModel.get_peft_model(model, r=4, target_modules=["embed_tokens"])
    peft_model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "lm_head"])
    assert peft_model.peft_config["default"].target_modules == {"q_proj"}


def test_saved_adapter_on_lm_head_is_called_unsupported(tmp_path):
    from transformers import AutoConfig

    from trainserve.adapters import AdapterError, validate_adapter_dir

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head"]}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="not supported") as info:
        validate_adapter_dir(tmp_path, AutoConfig.from_pretrained(tiny_model()), 16)
    assert "do not exist" not in str(info.value)


@pytest.mark.parametrize("text, match", [
    ("[]", "must hold a JSON object, got list"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply to read"),
    ('"lora"', "must hold a JSON object, got str"),
])
def test_a_malformed_adapter_config_is_an_adapter_error(tmp_path, text, match):
    from transformers import AutoConfig

    from trainserve.adapters import AdapterError, validate_adapter_dir

    (tmp_path / "adapter_config.json").write_text(text)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match=match):
        validate_adapter_dir(tmp_path, AutoConfig.from_pretrained(tiny_model()), 16)
