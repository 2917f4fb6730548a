"""Issue 2: one copy of base weights, the live adapter, versions — on the real vLLM engine."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import load_tiny_fast
from helpers import engine_tokens, greedy, hf_tokens, sft

from trainserve import FastLanguageModel
from trainserve.model_api import state_of
from trainserve.weights import shared_storage_report

PROMPT = "The secret phrase is"
TARGET = " open the blue door slowly."
OTHER = " seven apples under the bridge."
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft(model, r=8, **kw):
    return FastLanguageModel.get_peft_model(model, r=r, lora_alpha=16, lora_dropout=0, bias="none",
                                            target_modules=ALL7, use_gradient_checkpointing="unsloth",
                                            random_state=3407, **kw)


def test_every_base_parameter_is_a_view_of_the_engine():
    model, _ = load_tiny_fast()
    report = shared_storage_report(model, state_of(model).engine.model)
    assert report["separate"] == 0
    assert report["shared"] == len(list(model.parameters()))


def test_changing_a_base_weight_through_the_trainer_changes_the_engine():
    model, tok = load_tiny_fast()
    before = engine_tokens(model, PROMPT)
    assert hf_tokens(model, tok, PROMPT) == before  # same weights, same greedy output
    weight = model.model.layers[1].mlp.down_proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(-3.0)
    try:
        changed = engine_tokens(model, PROMPT)
        assert changed != before
        assert hf_tokens(model, tok, PROMPT) == changed
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert engine_tokens(model, PROMPT) == before


def test_train_then_generate_matches_hf_and_differs_from_base():
    model, tok = load_tiny_fast()
    model = peft(model)
    base_before = engine_tokens(model, PROMPT)
    _, loss = sft(model, tok, PROMPT, TARGET, steps=30)
    assert loss < 0.2
    live = engine_tokens(model, PROMPT)  # no lora_request, no save: the live adapter
    assert live == hf_tokens(model, tok, PROMPT)
    target_ids = tok(TARGET).input_ids
    assert live[: len(target_ids)] == target_ids
    with model.disable_adapter():
        base = engine_tokens(model, PROMPT)
        assert base == hf_tokens(model, tok, PROMPT)
    assert base == base_before
    assert base[: len(target_ids)] != target_ids
    assert state_of(model).live.last_update_ms > 0


def test_saved_version_keeps_serving_while_live_moves_on(tmp_path):
    model, tok = load_tiny_fast()
    model = peft(model)
    opt, _ = sft(model, tok, PROMPT, TARGET, steps=30)
    model.save_lora(tmp_path / "v1")
    saved = model.load_lora(tmp_path / "v1")
    assert model.load_lora(tmp_path / "v1") == saved  # same content, same request
    sft(model, tok, PROMPT, OTHER, steps=40, optimizer=opt)
    target_ids, other_ids = tok(TARGET).input_ids, tok(OTHER).input_ids
    live = engine_tokens(model, PROMPT)
    assert live[: len(other_ids)] == other_ids
    old = engine_tokens(model, PROMPT, lora_request=saved)
    assert old[: len(target_ids)] == target_ids
    # Saving the new weights to the same directory gives a new version, not the cached old one.
    model.save_lora(tmp_path / "v1")
    renewed = model.load_lora(tmp_path / "v1")
    assert renewed.lora_int_id != saved.lora_int_id
    assert engine_tokens(model, PROMPT, lora_request=renewed)[: len(other_ids)] == other_ids


def test_prompt_forms_and_batch():
    model, tok = load_tiny_fast()
    ids = tok(PROMPT).input_ids
    from_str = engine_tokens(model, PROMPT)
    assert list(model.fast_generate(ids, sampling_params=greedy())[0].outputs[0].token_ids) == from_str
    outs = model.fast_generate([PROMPT, ids, "Question: What is two plus two? Answer:"], sampling_params=greedy())
    assert [list(o.outputs[0].token_ids) for o in outs][:2] == [from_str, from_str]
    assert len(model.fast_generate(PROMPT, sampling_params=greedy())) == 1
    with pytest.raises(TypeError):
        model.fast_generate([1.5], sampling_params=greedy())


def test_request_in_flight_finishes_on_the_version_it_started_with():
    """Background loop: a long generation started on version N is not disturbed by version N+1."""
    model, tok = load_tiny_fast()
    model = peft(model)
    opt, _ = sft(model, tok, PROMPT, TARGET, steps=25)
    engine = state_of(model).engine
    long = greedy(200)
    req_v1 = state_of(model).live.sync_request()
    reference = engine.loop.generate([PROMPT], long, lora_request=req_v1)[0].outputs[0].token_ids
    engine.loop.start_background()
    try:
        stream = engine.loop.submit(PROMPT, long, lora_request=req_v1)
        sft(model, tok, PROMPT, OTHER, steps=10, optimizer=opt)
        req_v2 = state_of(model).live.sync_request()  # written between steps into the other slot
        assert req_v2.lora_int_id != req_v1.lora_int_id
        new = model.fast_generate([PROMPT], sampling_params=greedy())[0].outputs[0].token_ids
        assert stream.result(timeout=120).outputs[0].token_ids == reference
        assert list(new) != list(reference[: len(new)])
    finally:
        engine.loop.stop_background()


def test_concurrent_callers_share_one_engine():
    model, _ = load_tiny_fast()
    expected = engine_tokens(model, PROMPT)
    results, errors = [], []

    def worker():
        try:
            results.append(engine_tokens(model, PROMPT))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert results == [expected] * 4


def test_newer_peft_model_takes_over_the_live_slots():
    from trainserve.engine.live_adapter import LiveAdapterRevoked

    first = peft(load_tiny_fast()[0])
    engine_tokens(first, PROMPT)
    second = peft(load_tiny_fast()[0])
    engine_tokens(second, PROMPT)
    with pytest.raises(LiveAdapterRevoked):
        engine_tokens(first, PROMPT)


def test_an_unloaded_adapter_is_refused_not_reloaded(tmp_path):
    model, tok = load_tiny_fast()
    model = peft(model)
    sft(model, tok, PROMPT, TARGET, steps=5)
    model.save_lora(tmp_path / "a")
    request = model.load_lora(tmp_path / "a")
    engine_tokens(model, PROMPT, lora_request=request)
    state_of(model).registry.unload(request)
    with pytest.raises(ValueError, match="unloaded"):
        engine_tokens(model, PROMPT, lora_request=request)


def test_a_failing_output_consumer_ends_its_request_not_the_engine():
    model, _ = load_tiny_fast()
    loop = state_of(model).engine.loop

    def explode(_output):
        raise RuntimeError("consumer went away")

    stream = loop.submit(PROMPT, greedy(50), on_output=explode)
    loop.generate([PROMPT], greedy(4))  # steps the engine: the other request's consumer fails meanwhile
    with pytest.raises(RuntimeError, match="consumer went away"):
        stream.result(timeout=60)
    assert engine_tokens(model, PROMPT) == engine_tokens(model, PROMPT)  # the engine still serves
    assert loop.num_unfinished == 0


def test_fused_optimizer_steps_reach_the_engine():
    """Fused AdamW writes parameters without bumping their version counters."""
    model, tok = load_tiny_fast()
    model = peft(model)
    before = engine_tokens(model, PROMPT)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(params, lr=3e-3, fused=True)
    except RuntimeError as exc:  # a torch build without the fused CPU kernel
        pytest.skip(f"fused AdamW unavailable: {exc}")
    versions = [p._version for p in params]
    sft(model, tok, PROMPT, TARGET, steps=30, optimizer=opt)
    if [p._version for p in params] != versions:
        pytest.skip("this torch's fused AdamW bumps version counters; nothing to test")
    after = engine_tokens(model, PROMPT)
    assert after != before and after == hf_tokens(model, tok, PROMPT)
