"""load_lora serves private, bounded copies: files saved later to the same directory never reach an
older request, a copy dropped from the bound is made again only from unchanged files, and a
request whose files changed is refused by name while the engine keeps serving."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_tiny_fast
from helpers import engine_tokens

from trainserve import FastLanguageModel
from trainserve.adapter_paths import AdapterError
from trainserve.model_api import state_of

pytestmark = pytest.mark.engine

PROMPT = "The secret phrase is"


def _randomise(model, seed: int) -> None:
    """Give the adapter distinct, non-zero weights (peft starts B at zero: no effect on outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _drop_from_engine(model, request) -> None:
    """What vLLM does to the least recently used adapter past max_cpu_loras: it forgets the weights
    and reads ``request.lora_path`` again at the next request that needs them."""
    engine = state_of(model).engine
    engine.loop.call(lambda: engine.llm.llm_engine.remove_lora(request.lora_int_id))


@pytest.fixture(scope="module")
def model():
    m, _ = load_tiny_fast()
    return FastLanguageModel.get_peft_model(m, r=8, lora_alpha=16, random_state=0)


def test_an_old_request_keeps_its_weights_after_its_directory_is_overwritten(model, tmp_path):
    _randomise(model, 1)
    model.save_lora(tmp_path / "out")
    first = model.load_lora(tmp_path / "out")
    first_tokens = engine_tokens(model, PROMPT, lora_request=first)
    _randomise(model, 2)
    model.save_lora(tmp_path / "out")  # the next epoch, saved to the same directory
    second = model.load_lora(tmp_path / "out")
    assert second.lora_int_id != first.lora_int_id
    assert Path(first.lora_path).resolve().parent != (tmp_path / "out").resolve().parent  # a private copy
    second_tokens = engine_tokens(model, PROMPT, lora_request=second)
    assert second_tokens != first_tokens
    _drop_from_engine(model, first)
    assert engine_tokens(model, PROMPT, lora_request=first) == first_tokens  # not the newer files


def test_copies_are_bounded_and_made_again_only_from_unchanged_files(model, tmp_path):
    copies = state_of(model).registry.copies
    keep = copies.keep
    copies.keep = 1
    try:
        _randomise(model, 3)
        model.save_lora(tmp_path / "a")
        a = model.load_lora(tmp_path / "a")
        a_tokens = engine_tokens(model, PROMPT, lora_request=a)
        _randomise(model, 4)
        model.save_lora(tmp_path / "b")
        b = model.load_lora(tmp_path / "b")
        assert copies.count() == 1 and not os.path.isdir(a.lora_path)  # a's copy was dropped

        _drop_from_engine(model, a)
        remade = copies.remade
        assert engine_tokens(model, PROMPT, lora_request=a) == a_tokens  # made again from unchanged files
        assert copies.remade == remade + 1 and copies.count() == 1

        engine_tokens(model, PROMPT, lora_request=b)  # b's turn: a's copy is dropped again
        _drop_from_engine(model, a)
        shutil.copyfile(tmp_path / "b" / "adapter_model.safetensors", tmp_path / "a" / "adapter_model.safetensors")
        with pytest.raises(AdapterError, match=r"changed since.*load_lora\("):
            engine_tokens(model, PROMPT, lora_request=a)
        assert engine_tokens(model, PROMPT, lora_request=b)  # the engine keeps serving the others
        again = model.load_lora(tmp_path / "a")  # what the error says to do: the files now there
        assert again.lora_int_id == b.lora_int_id  # same content as b, same request

        _drop_from_engine(model, a)
        shutil.rmtree(tmp_path / "a")
        with pytest.raises(AdapterError, match="no longer exists"):
            engine_tokens(model, PROMPT, lora_request=a)
        assert engine_tokens(model, PROMPT)  # the live adapter too
    finally:
        copies.keep = keep


def test_a_copy_in_use_is_never_dropped(model, tmp_path):
    """Dropping runs between engine steps and skips adapters of unfinished requests."""
    copies = state_of(model).registry.copies
    engine = state_of(model).engine
    _randomise(model, 5)
    model.save_lora(tmp_path / "c")
    c = model.load_lora(tmp_path / "c")
    keep = copies.keep
    copies.keep = 1
    try:
        busy = engine.loop.in_use_lora_ids
        engine.loop.in_use_lora_ids = lambda: {c.lora_int_id}  # as if a request with c were unfinished
        copies._in_use = engine.loop.in_use_lora_ids
        try:
            _randomise(model, 6)
            model.save_lora(tmp_path / "d")
            d = model.load_lora(tmp_path / "d")
            assert os.path.isdir(c.lora_path)
            state_of(model).registry.unload(c)  # unloaded while a request still runs on it
            assert os.path.isdir(c.lora_path)
        finally:
            engine.loop.in_use_lora_ids = busy
            copies._in_use = busy
        engine.loop.call(copies.trim)
        assert not os.path.isdir(c.lora_path) and os.path.isdir(d.lora_path) and copies.count() == 1
    finally:
        copies.keep = keep


def test_a_bad_adapter_leaves_no_copy_behind(model, tmp_path):
    copies = state_of(model).registry.copies
    before = sorted(os.listdir(copies.root))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=str(tmp_path / "bad")):  # names the user's directory
        model.load_lora(tmp_path / "bad")
    assert sorted(os.listdir(copies.root)) == before
