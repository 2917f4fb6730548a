"""Training ``embed_tokens``/``lm_head`` (seed 002's "Training Embeddings"): as in Unsloth they are
trained in full (peft ``modules_to_save``). Without the engine: train, save_lora, reload,
save_pretrained_merged. With the engine: refused before training (see trainserve/trainable_modules.py).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import sft

from trainserve import FastLanguageModel, tiny_model

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "embed_tokens", "lm_head"]
PROMPT = "The secret phrase is"


def _untied(out: Path) -> str:
    """The tiny model with its own ``lm_head`` (a copy of the embedding) and tie_word_embeddings=False."""
    from model_variants import tiny_qwen2_with
    from safetensors.torch import load_file, save_file

    path = Path(tiny_qwen2_with(out, tie_word_embeddings=False))
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


def _logits(model, tok, text: str = PROMPT + " hello world") -> torch.Tensor:
    ids = torch.tensor([tok(text).input_ids])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _load(path: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FastLanguageModel.from_pretrained(path, load_in_4bit=False, max_seq_length=256)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_embeddings_train_save_reload_and_merge_without_engine(tmp_path, tied):
    from peft.utils import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM

    base_path = tiny_model() if tied else _untied(tmp_path / "untied")
    model, tok = _load(base_path)
    targets = list(SEED_TARGETS)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=targets,
                                             use_gradient_checkpointing="unsloth", random_state=0)
    assert targets == SEED_TARGETS  # the caller's list is not rewritten
    causal = model.base_model.model
    embed, head = causal.model.embed_tokens, causal.lm_head
    assert isinstance(embed, ModulesToSaveWrapper) and isinstance(head, ModulesToSaveWrapper)
    assert embed.modules_to_save["default"].weight.requires_grad
    assert (embed.modules_to_save["default"].weight is head.modules_to_save["default"].weight) == tied
    original = embed.original_module.weight.detach().clone()
    before = _logits(model, tok)
    _, loss = sft(model, tok, PROMPT, " blue whale", steps=12, lr=5e-3)
    trained = _logits(model, tok)
    assert (trained - before).abs().max() > 1e-2
    assert torch.equal(embed.original_module.weight, original)  # the base embedding is untouched
    assert not torch.equal(embed.modules_to_save["default"].weight, original)
    with model.disable_adapter():  # peft's base-model context: the original modules again
        assert torch.allclose(_logits(model, tok), before, atol=1e-5)

    # save_lora → from_pretrained(<adapter dir>) gives the very same model, trainable again
    model.save_lora(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # (tied: peft records the embedding only; lm_head is its tied alias)
    assert {m.rsplit(".", 1)[-1] for m in saved["modules_to_save"]} == ({"embed_tokens"} if tied else
                                                                       {"embed_tokens", "lm_head"})
    reloaded, _ = _load(str(tmp_path / "adapter"))
    assert torch.allclose(_logits(reloaded, tok), trained, atol=1e-5)
    assert reloaded.base_model.model.model.embed_tokens.modules_to_save["default"].weight.requires_grad

    # save_pretrained_merged → a plain checkpoint transformers loads with the trained embedding/head
    model.save_pretrained_merged(tmp_path / "merged", tok)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert plain.config.tie_word_embeddings == tied
    assert torch.allclose(_logits(plain, tok), trained, atol=1e-4)


def test_lm_head_alone_is_trained_in_full(tmp_path):
    from peft.utils import ModulesToSaveWrapper

    model, tok = _load(_untied(tmp_path / "untied"))
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert isinstance(model.base_model.model.lm_head, ModulesToSaveWrapper)
    assert not isinstance(model.base_model.model.model.embed_tokens, ModulesToSaveWrapper)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"base_model.model.lm_head.modules_to_save.default.weight"}


def test_other_modules_to_save_are_refused_by_name():
    model, _ = _load(tiny_model())
    with pytest.raises(NotImplementedError, match="modules_to_save=\\['model.norm'\\]"):
        FastLanguageModel.get_peft_model(model, r=4, modules_to_save=["model.norm"])


@pytest.mark.engine
@pytest.mark.parametrize("kwargs", [dict(target_modules=SEED_TARGETS), dict(modules_to_save=["embed_tokens"])])
def test_with_the_engine_training_embeddings_is_refused_before_training(kwargs):
    from conftest import load_tiny_fast

    model, _ = load_tiny_fast()
    with pytest.raises(NotImplementedError, match="modules_to_save.*full_finetuning=True with fast_inference=True"):
        FastLanguageModel.get_peft_model(model, r=8, **kwargs)
    assert not hasattr(model, "peft_config")  # nothing was wrapped


@pytest.mark.parametrize("targets", [["embed_tokens"], ["embed_tokens", "lm_head"]])
def test_only_embedding_targets_say_they_are_trained_in_full_and_lora_needs_a_projection(targets):
    model, _ = _load(tiny_model())
    with pytest.raises(ValueError, match=r"trained in full, as modules_to_save.*LoRA needs at least one projection"):
        FastLanguageModel.get_peft_model(model, r=4, target_modules=targets)
    assert not hasattr(model, "peft_config")


def test_the_peft_floor_has_ensure_weight_tying():
    """``lora_config_arguments`` passes ``LoraConfig(ensure_weight_tying=...)``, new in peft 0.18.0: the
    declared floor must be at least that (an older peft would fail with a TypeError in LoraConfig)."""
    import dataclasses
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version
    from peft import LoraConfig

    from trainserve.trainable_modules import lora_config_arguments

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    peft = next(Requirement(d) for d in deps if Requirement(d).name == "peft")
    floor = min(Version(s.version) for s in peft.specifier if s.operator == ">=")
    assert floor >= Version("0.18.0"), f"pyproject.toml allows {peft}, but ensure_weight_tying needs peft>=0.18"
    used = set(lora_config_arguments(type("C", (), {"tie_word_embeddings": True})(), ["embed_tokens"]))
    assert used <= {f.name for f in dataclasses.fields(LoraConfig)}
