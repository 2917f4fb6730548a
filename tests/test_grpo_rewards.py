"""Reward-function validation, and the GRPOTrainer's argument checks and fallback."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch

from trainserve.rl.rewards import RewardFunctionError, checked_reward_func, validate_rewards

COMPLETIONS = ["a blue sky", [{"role": "assistant", "content": "no"}], "x"]


def good(completions, **kwargs):
    return [1.0, 0, None]


def raises(completions, **kwargs):
    raise KeyError("answer")


def short(completions, **kwargs):
    return [1.0]


def nan(completions, **kwargs):
    return [0.5, math.nan, 1.0]


def inf(completions, **kwargs):
    return np.array([0.5, 1.0, np.inf])


def text(completions, **kwargs):
    return [1.0, "high", 0.0]


def scalar(completions, **kwargs):
    return 1.0


def test_valid_rewards_pass_through_with_none_kept():
    wrapped = checked_reward_func(good, "good")
    assert wrapped.__name__ == "good"
    assert wrapped(prompts=["p"] * 3, completions=COMPLETIONS) == [1.0, 0.0, None]
    assert validate_rewards("t", torch.tensor([1.0, 2.0, 3.0]), COMPLETIONS) == [1.0, 2.0, 3.0]
    assert validate_rewards("n", np.array([0.0, 1.0, 2.0]), COMPLETIONS) == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("func", "needle"),
    [
        (raises, "raised KeyError: 'answer'"),
        (short, "returned 1 rewards for 3 completions"),
        (nan, "returned nan for completion 1"),
        (inf, "returned inf for completion 2 'x'"),
        (text, "returned 'high' (str) for completion 1"),
        (scalar, "must return a list"),
    ],
)
def test_bad_reward_raises_error_naming_the_function(func, needle):
    wrapped = checked_reward_func(func, func.__name__)
    with pytest.raises(RewardFunctionError) as info:
        wrapped(prompts=["p"] * 3, completions=COMPLETIONS)
    message = str(info.value)
    assert f"reward function {func.__name__!r}" in message
    assert needle in message
    assert info.value.reward_func_name == func.__name__
    if func is raises:
        assert isinstance(info.value.__cause__, KeyError)


def test_async_reward_stays_async_and_is_checked():
    async def judge(completions, **kwargs):
        return [0.0, float("nan"), 1.0]

    wrapped = checked_reward_func(judge, "judge")
    assert asyncio.iscoroutinefunction(wrapped)
    with pytest.raises(RewardFunctionError, match="'judge' returned nan"):
        asyncio.run(wrapped(prompts=["p"] * 3, completions=COMPLETIONS))


def test_use_vllm_is_rejected_before_anything_starts():
    from trl import GRPOConfig

    from trainserve.rl import GRPOTrainer

    args = GRPOConfig(output_dir="/tmp/unused", use_vllm=True, bf16=False, report_to=[])
    with pytest.raises(ValueError, match="already generates with the colocated engine"):
        GRPOTrainer(model=object(), reward_funcs=[good], args=args)


def _args(tmp_path, **overrides):
    from trainserve.rl.toy_task import toy_config

    return toy_config(str(tmp_path), steps=1, seed=0, **{"per_device_train_batch_size": 8,
                                                         "num_generations": 4, **overrides})


@pytest.mark.engine
@pytest.mark.parametrize("func", [raises, short, nan], ids=["raises", "wrong-length", "nan"])
def test_bad_reward_stops_training_with_a_clear_error(tmp_path, func):
    from conftest import load_tiny_fast

    from trainserve import FastLanguageModel
    from trainserve.rl import GRPOTrainer, toy_dataset, toy_reward_funcs

    model, tok = load_tiny_fast()
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    funcs = [*toy_reward_funcs(), func]
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=_args(tmp_path),
                          train_dataset=toy_dataset(16), processing_class=tok)
    with pytest.raises(RewardFunctionError, match=f"reward function '{func.__name__}'"):
        trainer.train()
    assert trainer.state.global_step == 0  # nothing was trained on a silently zeroed reward


@pytest.mark.engine
def test_fast_model_needs_an_adapter_and_peft_config_is_served_live(tmp_path):
    from conftest import load_tiny_fast
    from peft import LoraConfig

    from trainserve.model_api import state_of
    from trainserve.rl import GRPOTrainer, toy_dataset, toy_reward_funcs

    model, tok = load_tiny_fast()
    with pytest.raises(ValueError, match="trains a LoRA adapter"):
        GRPOTrainer(model=model, reward_funcs=toy_reward_funcs(), args=_args(tmp_path),
                    train_dataset=toy_dataset(16), processing_class=tok)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    trainer = GRPOTrainer(model=model, reward_funcs=toy_reward_funcs(), args=_args(tmp_path),
                          train_dataset=toy_dataset(16), processing_class=tok, peft_config=config)
    state = state_of(trainer.model)
    assert state.peft_model is trainer.model and state.live.engine.live_owner is state.live


def test_model_without_engine_falls_back_to_trl_generation(tmp_path, tiny_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainserve.rl import GRPOTrainer, toy_dataset, toy_reward_funcs

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tok = AutoTokenizer.from_pretrained(tiny_path)
    with pytest.warns(UserWarning, match="no colocated vLLM engine"):
        trainer = GRPOTrainer(model=model, reward_funcs=toy_reward_funcs(),
                              args=_args(tmp_path, max_completion_length=4), train_dataset=toy_dataset(16),
                              processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    trainer.train()
    assert trainer.state.global_step == 1
    assert "rollout/tokens_per_s" not in trainer.state.log_history[0]  # TRL's own generate ran
