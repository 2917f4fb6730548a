"""Issue 12, reload: ``from_pretrained("<saved LoRA dir>")`` loads the base named in adapter_config.json
and the adapter on top, trainable again, with and without the engine; unusable adapters are refused.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import ENGINE_KWARGS, load_tiny_fast
from helpers import engine_tokens, hf_tokens, sft

from trainserve import FastLanguageModel, tiny_model

PROMPT = "The secret phrase is"
NO_ENGINE = dict(max_seq_length=256, load_in_4bit=False)


def _trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_saved_lora_dir_loads_base_and_adapter_without_engine(tmp_path):
    model, tok = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0,
                                             target_modules=["q_proj", "v_proj", "down_proj"])
    sft(model, tok, PROMPT, " open sesame", steps=10)
    want = hf_tokens(model, tok, PROMPT)
    model.save_pretrained_merged(tmp_path / "lora", tok, save_method="lora")
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == tiny_model()

    again, tok2 = FastLanguageModel.from_pretrained(str(tmp_path / "lora"), **NO_ENGINE)
    assert hasattr(again, "peft_config")
    assert hf_tokens(again, tok2, PROMPT) == want
    assert _trainable(again) and all("lora_" in n for n in _trainable(again))
    with again.disable_adapter():
        assert hf_tokens(again, tok2, PROMPT) != want  # the adapter is what makes the difference
    sft(again, tok2, PROMPT, " purple elephant", steps=15)
    assert hf_tokens(again, tok2, PROMPT) != want  # trainable again


@pytest.mark.engine
def test_saved_lora_dir_loads_with_the_engine(tmp_path):
    model, tok = load_tiny_fast()
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    sft(model, tok, PROMPT, " open sesame", steps=10)
    want = engine_tokens(model, PROMPT)
    model.save_lora(tmp_path / "lora")

    again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "lora"), **ENGINE_KWARGS)
    assert engine_tokens(again, PROMPT) == want  # the live adapter of the reloaded model
    with again.disable_adapter():
        assert engine_tokens(again, PROMPT) != want
    sft(again, tok, PROMPT, " purple elephant", steps=15)
    assert engine_tokens(again, PROMPT) != want  # training continues, served live


def _adapter_copy(tmp_path, **edits):
    model, tok = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"])
    model.save_pretrained_merged(tmp_path / "orig", tok, save_method="lora")
    out = tmp_path / "edited"
    shutil.copytree(tmp_path / "orig", out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(edits)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return str(out)


def test_saved_lora_dir_with_a_missing_base_is_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="base_model_name_or_path"):
        FastLanguageModel.from_pretrained(_adapter_copy(tmp_path, base_model_name_or_path=str(tmp_path / "gone")),
                                          **NO_ENGINE)
    shutil.rmtree(tmp_path / "orig")
    shutil.rmtree(tmp_path / "edited")
    with pytest.raises(ValueError, match="without base_model_name_or_path"):
        FastLanguageModel.from_pretrained(_adapter_copy(tmp_path, base_model_name_or_path=None), **NO_ENGINE)


def test_saved_lora_settings_that_cannot_be_recreated_are_refused(tmp_path):
    with pytest.raises(NotImplementedError, match="rank_pattern"):
        FastLanguageModel.from_pretrained(_adapter_copy(tmp_path, rank_pattern={"q_proj": 2}), **NO_ENGINE)


def _drop_tensors(adapter_dir, suffixes: tuple[str, ...]) -> list[str]:
    from safetensors.torch import load_file, save_file

    path = str(adapter_dir / "adapter_model.safetensors")
    tensors = load_file(path)
    dropped = sorted(k for k in tensors if k.endswith(suffixes))
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, path, metadata={"format": "pt"})
    return dropped


@pytest.mark.parametrize(("kwargs", "suffixes"), [
    (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]), ("embed_tokens.weight",)),
    (dict(target_modules=["q_proj"], bias="lora_only"), ("layers.0.self_attn.q_proj.base_layer.bias",)),
])
def test_a_saved_adapter_missing_its_full_copies_or_biases_is_refused(tmp_path, kwargs, suffixes):
    """Tensors of ``modules_to_save`` or ``bias`` missing from the file are refused by name, not left
    at their initial values (the base's embedding or bias)."""
    model, tok = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    model = FastLanguageModel.get_peft_model(model, r=4, **kwargs)
    model.save_pretrained_merged(tmp_path / "lora", tok, save_method="lora")
    dropped = _drop_tensors(tmp_path / "lora", suffixes)
    with pytest.raises(ValueError, match="does not fit its base model.*missing.*" + dropped[0].replace(".", r"\.")):
        FastLanguageModel.from_pretrained(str(tmp_path / "lora"), **NO_ENGINE)


@pytest.mark.parametrize("padded", [False, True], ids=["grown", "in-padding-rows"])
def test_new_tokens_with_one_of_an_untied_embedding_and_head_trained_are_refused_on_reload(tmp_path, padded):
    """Untied base, new tokens, only ``lm_head`` trained: the embedding's new rows were initialised by
    add_new_tokens and not saved, so a reload cannot re-create them; refused by name. Also when the
    checkpoint pads its embedding beyond the tokenizer (the new ids then need no growth)."""
    from test_trainable_embeddings import _untied
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainserve import add_new_tokens

    base = _untied(tmp_path / "untied")
    if padded:
        plain, plain_tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
        plain.resize_token_embeddings(len(plain_tok) + 64, mean_resizing=False)
        plain.save_pretrained(tmp_path / "padded")
        plain_tok.save_pretrained(tmp_path / "padded")
        base = str(tmp_path / "padded")
    model, tok = FastLanguageModel.from_pretrained(base, **NO_ENGINE)
    add_new_tokens(model, tok, ["<|alpha|>", "<|beta|>"])
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "lm_head"])
    model.save_pretrained_merged(tmp_path / "lora", tok, save_method="lora")
    with pytest.raises(NotImplementedError, match=r"saved the trained \['lm_head'\] only.*\['embed_tokens'\]"):
        FastLanguageModel.from_pretrained(str(tmp_path / "lora"), **NO_ENGINE)
