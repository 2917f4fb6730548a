"""Rollouts come from the live adapter: after one GRPO step the engine's logprobs are the trainer's."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny_fast

pytestmark = pytest.mark.engine

TOLERANCE = 1e-3  # fp32 on CPU: the engine and the trainer compute the same numbers


def letters(completions, **kwargs):
    """A dense reward (fraction of lowercase letters), so that the first step surely moves the adapter."""
    from trainserve.rl.rewards import completion_text

    texts = [completion_text(c) for c in completions]
    return [sum(ch.islower() for ch in t) / max(1, len(t)) for t in texts]


def _trainer(tmp_path, conversational=True, lr=1e-2, **overrides):
    from trainserve import FastLanguageModel
    from trainserve.rl import GRPOTrainer, toy_config, toy_dataset

    model, tok = load_tiny_fast()
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, random_state=1)
    args = toy_config(str(tmp_path), steps=1, seed=1, learning_rate=lr, per_device_train_batch_size=16,
                      num_generations=8, **overrides)
    trainer = GRPOTrainer(model=model, reward_funcs=[letters], args=args,
                          train_dataset=toy_dataset(32, conversational=conversational), processing_class=tok)
    return trainer, tok


def _trainer_logprobs(trainer, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The per-token logprobs TRL's loss uses, under the trainer's weights now."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, torch.ones_like(ids), len(completion))
    return logps[0]


def _lora_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_engine_logprobs_match_trainer_after_one_step(tmp_path):
    from trainserve.model_api import state_of

    trainer, tok = _trainer(tmp_path)
    live = state_of(trainer.model).live
    before = _lora_snapshot(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 1
    after = _lora_snapshot(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before), "the step did not change the adapter"

    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True) for q in ("What color is the sky?", "Hi.")]
    prompt_ids = [p for text in prompts for p in [tok(text)["input_ids"]] * 2]  # 2 samples per prompt
    trainer.model.eval()
    version = live.version
    trainer.off_policy_mask_threshold = 0.5  # TRL's off-policy mask reads the engine's logprobs: asked for
    completions, engine_logps = trainer._generate_single_turn(prompt_ids, None, {}, 2)  # the rollout hook
    assert live.version == version + 1 and live.served_version == live.version  # synced the new weights
    assert len(completions) == 4 and all(completions)
    trainer.off_policy_mask_threshold = None  # nothing else in (non-overlapped) GRPO reads them: not computed
    again, no_logps = trainer._generate_single_turn(prompt_ids, None, {}, 2)
    assert no_logps is None and len(again) == 4 and all(again)

    engine_vs_new, old_vs_new = [], []
    for prompt, completion, logps in zip(prompt_ids, completions, engine_logps, strict=True):
        new = _trainer_logprobs(trainer, prompt, completion)
        engine_vs_new.append((torch.tensor(logps) - new).abs().max().item())
        with torch.no_grad():  # the same tokens under the pre-step adapter
            params = dict(trainer.model.named_parameters())
            for n, t in before.items():
                params[n].copy_(t)
            old = _trainer_logprobs(trainer, prompt, completion)
            for n, t in after.items():
                params[n].copy_(t)
        old_vs_new.append((old - new).abs().max().item())
    assert max(engine_vs_new) <= TOLERANCE, engine_vs_new
    # A stale adapter would give the old logprobs, which are far from the new ones.
    assert min(old_vs_new) > 20 * TOLERANCE, old_vs_new


def test_plain_text_prompts_train_through_the_engine(tmp_path):
    # Also GRPOConfig's default gradient_checkpointing=True (the toy config turns it off).
    trainer, _ = _trainer(tmp_path, conversational=False, gradient_checkpointing=True)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert trainer.state.global_step == 1
    assert logs["rollout/tokens_per_s"] > 0 and logs["completions/mean_length"] > 0
    assert all(isinstance(c, str) for c in trainer._logs["completion"])
    assert all(isinstance(p, str) and p.startswith("Question:") for p in trainer._logs["prompt"])
