"""Micro-batches that keep each prompt's samples together (trainserve.rl.group_batches): which
settings allow it, that the order moves whole groups, and, in a real GRPO step, that every
micro-batch holds whole groups, computes each prompt once, and ends in the optimizer step the
row-shuffled split gives."""

from __future__ import annotations

import types

import pytest
import torch

from trainserve.rl.group_batches import group_order, groups_may_stay_together, reorder_rows


def _args(spg: int, gas: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(steps_per_generation=spg, gradient_accumulation_steps=gas)


def test_only_split_free_settings_keep_groups_together() -> None:
    assert groups_may_stay_together(_args(4, 4), "dapo", 1.0)
    assert groups_may_stay_together(_args(2, 2), "grpo", 1.0)
    assert not groups_may_stay_together(_args(4, 4), "bnpo", 1.0)  # per-micro-batch token count
    assert not groups_may_stay_together(_args(4, 4), "dapo", 0.8)  # per-micro-batch entropy quantile
    assert not groups_may_stay_together(_args(4, 2), "dapo", 1.0)  # two optimizer steps per generation
    assert not groups_may_stay_together(_args(4, 4), "some_future_loss", 1.0)


def test_group_order_moves_runs_of_equal_prompts_as_wholes() -> None:
    torch.manual_seed(0)
    prompts = torch.tensor([[0, 5, 6]] * 3 + [[7, 8, 9]] * 3 + [[0, 5, 7]] * 2 + [[1, 1, 1]])
    mask = (prompts != 0).long()
    seen = set()
    for _ in range(20):
        order = group_order(prompts, mask).tolist()
        assert sorted(order) == list(range(9))
        runs = [tuple(order[i:j]) for i, j in _cuts(prompts[order])]
        assert sorted(runs) == [(0, 1, 2), (3, 4, 5), (6, 7), (8,)]
        seen.add(tuple(order))
    assert len(seen) > 3  # random group order


def _cuts(rows: torch.Tensor) -> list[tuple[int, int]]:
    cuts = [0] + [i for i in range(1, len(rows)) if not torch.equal(rows[i], rows[i - 1])] + [len(rows)]
    return list(zip(cuts, cuts[1:], strict=False))


def test_reorder_rows_moves_every_per_row_value() -> None:
    batch = {"a": torch.arange(4) * 10, "b": ["w", "x", "y", "z"], "n": torch.tensor(7), "none": None,
             "m": torch.arange(8).view(4, 2)}
    out = reorder_rows(batch, torch.tensor([2, 0, 3, 1]))
    assert out["a"].tolist() == [20, 0, 30, 10] and out["b"] == ["y", "w", "z", "x"]
    assert out["n"].item() == 7 and out["none"] is None and out["m"][0].tolist() == [4, 5]


@pytest.mark.engine
def test_grpo_micro_batches_hold_whole_groups_and_match_the_row_shuffle(tmp_path, monkeypatch) -> None:
    from conftest import load_tiny_fast

    from trainserve import FastLanguageModel
    from trainserve.models import shared_prefix as sp
    from trainserve.rl import GRPOTrainer, toy_config, toy_dataset
    from trainserve.rl.toy_task import completion_text

    def varied(completions, **kwargs):  # advantages of both signs in every group
        return [float(sum(map(ord, completion_text(c))) % 5) for c in completions]

    monkeypatch.setattr(sp, "MIN_SHARED", 2)  # the toy prompts are short
    monkeypatch.setenv("TRAINSERVE_SHARED_PREFIX", "1")  # on the CPU only when asked for
    model, tok = load_tiny_fast()
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def one_step(together: bool, out: str, loss_type: str = "dapo") -> tuple[dict, list]:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in lora:
                    p.copy_(lora[n])
        args = toy_config(str(tmp_path / out), steps=1, per_device_train_batch_size=8,
                          gradient_accumulation_steps=2, num_generations=4, max_completion_length=8,
                          optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", loss_type=loss_type)
        trainer = GRPOTrainer(model=model, reward_funcs=[varied], args=args,
                              train_dataset=toy_dataset(32), processing_class=tok)
        assert trainer._groups_together == (loss_type != "bnpo")
        trainer._groups_together = together
        micro_batches = []
        prepare = trainer._prepare_inputs

        def recording(batch):
            inputs = prepare(batch)
            micro_batches.append(inputs["prompt_ids"].clone())
            return inputs

        trainer._prepare_inputs = recording
        trainer.train()
        return {n: p.detach().clone() for n, p in model.named_parameters() if n in lora}, micro_batches

    before = sp.shared_prefix_stats().get("forwards", 0)
    grouped, mbs = one_step(True, "grouped")
    assert len(mbs) == 2
    for prompts in mbs:  # every prompt of a micro-batch appears num_generations times in it (or a
        _, counts = torch.unique(prompts, dim=0, return_counts=True)  # multiple: the toy repeats)
        assert all(c % 4 == 0 for c in counts.tolist()), counts
    assert sp.shared_prefix_stats()["forwards"] >= before + 2  # each micro-batch shared its prompts
    rows, _ = one_step(False, "rows")
    moved = 0
    for n in lora:
        step = grouped[n] - lora[n]
        moved += int(step.abs().max() > 0)
        assert (grouped[n] - rows[n]).norm() <= 1e-4 * step.norm() + 1e-7, n
    assert moved > 0
