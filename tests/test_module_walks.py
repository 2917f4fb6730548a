"""ModuleWalkCache: transformers' per-micro-batch ``model.train()`` and the clip's ``model.parameters()``
come from a walk made after the backward, without changing any module's mode or the clipped set."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainserve.rl.module_walks import ModuleWalkCache


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 8)), nn.Linear(8, 2))


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_train_is_elided_only_while_every_module_is_still_training():
    model, cache = _model(), ModuleWalkCache()
    model.train()
    cache.refresh(model)
    with cache.train_call_elided(model):
        assert model.train() is model
        assert cache.elided_train_calls == 1
        model[1][0].eval()  # the second call is the model's own again (one shot)
        model.train()
        assert all(_modes(model))
    assert "train" not in model.__dict__
    assert cache.elided_train_calls == 1


def test_an_eval_submodule_makes_train_walk_as_before():
    model, cache = _model(), ModuleWalkCache()
    model.train()
    cache.refresh(model)
    model[1][0].eval()  # e.g. a callback between two micro-batches
    with cache.train_call_elided(model):
        model.train()
    assert all(_modes(model)), "train() was skipped although a submodule had left training mode"
    assert cache.elided_train_calls == 0

    model.eval()
    cache.refresh(model)
    with cache.train_call_elided(model):
        model.train()
    assert all(_modes(model)) and cache.elided_train_calls == 0


def test_train_false_and_other_models_are_never_elided():
    model, other, cache = _model(), _model(), ModuleWalkCache()
    model.train()
    other.train()
    cache.refresh(model)
    with cache.train_call_elided(model):
        model.train(False)
    assert not any(_modes(model))
    with cache.train_call_elided(other):  # not the cached model
        other[0].eval()
        other.train()
    assert all(_modes(other)) and cache.elided_train_calls == 0


def test_a_module_whose_train_does_more_than_set_flags_always_gets_the_call():
    calls = []

    class Cached(nn.Linear):  # like peft's DoRA layers, which clear a cache in train()
        def train(self, mode: bool = True):
            calls.append(mode)
            return super().train(mode)

    model, cache = nn.Sequential(nn.Linear(2, 2), Cached(2, 2)), ModuleWalkCache()
    model.train()
    cache.refresh(model)
    with cache.train_call_elided(model):
        model.train()
    assert calls == [True, True] and cache.elided_train_calls == 0


def test_cached_parameters_are_the_models_and_the_override_is_removed():
    model, cache = _model(), ModuleWalkCache()
    expected = list(model.parameters())
    with cache.parameters_cached(model):  # nothing cached yet: the model's own
        assert list(model.parameters()) == expected
    assert cache.cached_parameter_calls == 0
    cache.refresh(model)
    with cache.parameters_cached(model):
        assert list(model.parameters()) == expected
        assert list(model.parameters(recurse=False)) == []
    assert cache.cached_parameter_calls == 1
    assert "parameters" not in model.__dict__


def test_gradient_clip_through_the_cache_matches_the_plain_clip():
    model, cache = _model(), ModuleWalkCache()
    grads = [torch.randn_like(p) * 10 for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    plain = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    clipped = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    cache.refresh(model)
    with cache.parameters_cached(model):
        cached = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert torch.equal(plain, cached)
    assert all(torch.equal(a, p.grad) for a, p in zip(clipped, model.parameters(), strict=True))


@pytest.mark.engine
def test_grpo_micro_batches_keep_every_module_in_training_mode(tmp_path):
    """In a real GRPO run the elision engages, and an eval() from a callback between micro-batches
    is still undone before the next forward (a hook on the model records the probe's mode at each
    training forward; the patched layers read the LoRA weights without calling the submodules)."""
    from conftest import load_tiny_fast
    from transformers import TrainerCallback

    from trainserve import FastLanguageModel
    from trainserve.rl import GRPOTrainer, toy_config, toy_dataset, toy_reward_funcs

    model, tok = load_tiny_fast()
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    probe = next(m for n, m in model.named_modules() if n.endswith("layers.1.mlp.down_proj.lora_A"))
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(probe.training) if torch.is_grad_enabled() else None)

    class EvalBetweenMicroBatches(TrainerCallback):
        def on_substep_end(self, args, state, control, **kwargs):
            probe.eval()

    args = toy_config(str(tmp_path), steps=2, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                      num_generations=8, max_completion_length=8)
    trainer = GRPOTrainer(model=model, reward_funcs=toy_reward_funcs(), args=args, train_dataset=toy_dataset(32),
                          processing_class=tok, callbacks=[EvalBetweenMicroBatches()])
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(seen) >= 4 and all(seen), f"a training forward ran with the probe in eval mode: {seen}"
    # step 2's first micro-batch follows a step end with every module training: elided once;
    # the other three follow an eval() (real walk) or have no walk cached yet
    assert trainer._walks.elided_train_calls == 1
    assert trainer._walks.cached_parameter_calls >= 2  # one clip per optimizer step
    assert "train" not in model.__dict__ and "parameters" not in model.__dict__
