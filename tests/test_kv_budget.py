"""The GRPO trainer's KV-cache advice: when the engine's cache is far larger than the rollouts can
use, say which gpu_memory_utilization would keep 1.25x the need; silent otherwise."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from conftest import load_tiny_fast

from trainserve.engine import vllm_compat
from trainserve.model_api import state_of
from trainserve.rl import kv_budget

GIB = 2**30
QWEN2_7B = types.SimpleNamespace(num_attention_heads=28, num_key_value_heads=4, hidden_size=3584,
                                 num_hidden_layers=28)


def test_bytes_per_token_of_the_7b_shape() -> None:
    assert kv_budget.kv_bytes_per_token(QWEN2_7B, "auto", 2) == 2 * 28 * 4 * 128 * 2  # 57,344
    assert kv_budget.kv_bytes_per_token(QWEN2_7B, "fp8", 2) == 2 * 28 * 4 * 128


def test_an_oversized_cache_gets_a_lower_utilization() -> None:
    """7B on an H200 at 0.5: ~1.0M tokens of cache for a rollout of 64 x 512 tokens."""
    bpt, device = 57_344, 140 * GIB
    advice = kv_budget.kv_advice(1_000_000, 64 * 512, bpt, 0.5, device)
    assert advice is not None
    kept = 1_000_000 - advice.excess_bytes // bpt
    assert kept == pytest.approx(1.25 * 64 * 512, abs=1)
    # the suggestion frees the excess (rounded up to 0.005, so never below the 1.25x kept)
    assert advice.suggested_utilization == pytest.approx(0.5 - advice.excess_bytes / device, abs=0.005)
    assert advice.suggested_utilization >= 0.5 - advice.excess_bytes / device
    assert "gpu_memory_utilization=" in advice.message() and "now 0.5" in advice.message()


@pytest.mark.parametrize("capacity", [50_000, 64 * 512 * 2 - 1])
def test_no_advice_when_the_cache_is_not_oversized(capacity: int) -> None:
    assert kv_budget.kv_advice(capacity, 64 * 512, 57_344, 0.1, 140 * GIB) is None


def test_no_advice_for_less_than_a_gib() -> None:
    assert kv_budget.kv_advice(10_000, 1_000, 16_384, 0.3, 80 * GIB) is None  # 0.15 GiB to gain


def test_the_engine_reports_its_cache_in_tokens() -> None:
    llm = state_of(load_tiny_fast()[0]).engine.llm
    tokens = vllm_compat.kv_cache_tokens(llm)
    assert tokens > 0 and tokens % llm.llm_engine.vllm_config.cache_config.block_size == 0


def test_the_trainer_advises_only_on_cuda(monkeypatch, caplog) -> None:
    """On CUDA the trainer warns with the numbers; on the CPU (vLLM sizes its cache in bytes there)
    it says nothing."""
    state = state_of(load_tiny_fast()[0])
    args = types.SimpleNamespace(generation_batch_size=4)
    assert kv_budget.advise_kv_cache(state.engine, args, state.config) is None  # this CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(total_memory=140 * GIB))
    monkeypatch.setattr(vllm_compat, "kv_cache_tokens", lambda llm: 10_000_000)
    with caplog.at_level(logging.WARNING, logger="trainserve"):
        advice = kv_budget.advise_kv_cache(state.engine, args, state.config)
    assert advice is not None and advice.needed_tokens == 4 * state.engine.spec.max_model_len
    assert "GRPOTrainer: the engine's KV cache holds 10,000,000 tokens" in caplog.text


def test_no_advice_without_a_batch_size_or_a_cache_size(monkeypatch) -> None:
    state = state_of(load_tiny_fast()[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kv_budget.advise_kv_cache(state.engine, types.SimpleNamespace(generation_batch_size=None),
                                     state.config) is None

    def moved(llm):
        raise vllm_compat.VLLMInternalsChanged("cache_config moved")

    monkeypatch.setattr(vllm_compat, "kv_cache_tokens", moved)
    assert kv_budget.advise_kv_cache(state.engine, types.SimpleNamespace(generation_batch_size=4),
                                     state.config) is None


def test_the_grpo_trainer_asks_for_the_advice(tmp_path, monkeypatch) -> None:
    """The trainer wires the advice in: it asks once, with its engine and its resolved args."""
    from trainserve import FastLanguageModel
    from trainserve.rl import GRPOTrainer, toy_config, toy_dataset, toy_reward_funcs
    from trainserve.rl import trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "advise_kv_cache", lambda *a: calls.append(a))
    model, tok = load_tiny_fast()
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=1)
    trainer = GRPOTrainer(model=model, reward_funcs=toy_reward_funcs(), train_dataset=toy_dataset(8),
                          args=toy_config(str(tmp_path), steps=1, per_device_train_batch_size=8, num_generations=8),
                          processing_class=tok)
    state = state_of(model)
    assert calls == [(state.engine, trainer.args, state.config)]
