"""Issue 10, item 1: no peft merge may change the base weights the colocated engine serves.

Every merge route (``merge_adapter``, ``merge_and_unload`` on the PeftModel and on its LoraModel,
one ``lora_layer.merge()``) raises before touching a weight: the engine's base tensors, base
outputs, outputs of a saved adapter and a fresh ``from_pretrained`` stay bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny_fast
from helpers import engine_tokens, sft

from trainserve import FastLanguageModel, tiny_model
from trainserve.merge_guard import SharedBaseMergeError, is_guarded
from trainserve.model_api import state_of

pytestmark = pytest.mark.engine

PROMPTS = ["The secret phrase is", "Where is the old bridge?"]


def _engine_base(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in state_of(model).engine.model.state_dict().items()
            if "lora" not in n}


def _outputs(model, lora_request=None) -> list[list[int]]:
    return [engine_tokens(model, p, n=16, lora_request=lora_request) for p in PROMPTS]


def _merge_routes(model):
    from peft.tuners.lora import LoraLayer

    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    return {
        "merge_adapter": model.merge_adapter,
        "merge_and_unload": model.merge_and_unload,
        "merge_and_unload(safe_merge)": lambda: model.merge_and_unload(safe_merge=True),
        "lora_model.merge_and_unload": model.base_model.merge_and_unload,
        "lora_layer.merge": layer.merge,
    }


def test_merges_never_change_what_the_engine_serves(tmp_path):
    model, tok = load_tiny_fast()
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    sft(model, tok, "The secret phrase is", " open sesame", steps=10)
    model.save_lora(tmp_path / "a")
    saved = model.load_lora(tmp_path / "a")
    weights = _engine_base(model)
    with model.disable_adapter():
        base = _outputs(model)
    adapter = _outputs(model, saved)
    live = _outputs(model)
    assert adapter == live and adapter != base  # the adapter matters: a merge would show

    for name, merge in _merge_routes(model).items():
        with pytest.raises(SharedBaseMergeError, match="save_lora"):
            merge()
        after = _engine_base(model)
        assert all(torch.equal(weights[k], after[k]) for k in weights), name

    with model.disable_adapter():
        assert _outputs(model) == base
    assert _outputs(model, saved) == adapter
    assert _outputs(model) == live  # the adapter is still live, not merged or unloaded
    with pytest.warns(UserWarning, match="Already unmerged"):
        model.unmerge_adapter()  # nothing was merged: a no-op, allowed

    fresh, _ = load_tiny_fast()  # a new model in this process gets the original base
    assert engine_tokens(fresh, PROMPTS[0], n=16) == base[0]


def test_adapters_added_later_are_guarded_too():
    from peft import LoraConfig

    model, _ = load_tiny_fast()
    model = FastLanguageModel.get_peft_model(model, r=8, target_modules=["q_proj"])
    model.add_adapter("other", LoraConfig(r=4, target_modules=["k_proj", "o_proj"]))
    assert is_guarded(model)
    model.set_adapter("other")
    with pytest.raises(SharedBaseMergeError):
        model.merge_and_unload(adapter_names=["other"])


def test_models_without_an_engine_merge_as_usual():
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), max_seq_length=256, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"])
    assert not is_guarded(model)
    merged = model.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
