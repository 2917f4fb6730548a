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
