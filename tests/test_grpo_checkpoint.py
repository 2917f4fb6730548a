"""Atomic checkpoints and ``--resume``: a resumed run continues exactly where the saved one was."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytestmark = pytest.mark.engine


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_resume_continues_the_run_exactly(tmp_path):
    from trainserve.rl.cli import GRPORunError, run_grpo

    out = tmp_path / "run"
    kwargs = dict(steps=4, seed=3, save_every=2, keep_checkpoints=0, beta=0.04, plot=False, progress=False)
    run_grpo(str(out), **kwargs)
    full = _records(out)
    final = _adapter(out / "adapter")
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert all("kl" in r for r in full)  # beta > 0: TRL's KL to the reference (adapter disabled)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-4"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging leftovers
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                 "trainer_state.json"):
        assert (out / "checkpoint-2" / name).exists(), name

    with pytest.raises(GRPORunError, match="--resume"):
        run_grpo(str(out), **kwargs)  # refuses to overwrite a run

    shutil.rmtree(out / "checkpoint-4")  # as if the process died after step 4, before saving it
    at_step_2 = _adapter(out / "checkpoint-2")
    assert any(not (at_step_2[k] == final[k]).all() for k in final)  # steps 3-4 changed the adapter
    run_grpo(str(out), resume=True, **kwargs)
    resumed = _records(out)
    again = _adapter(out / "adapter")
    for key, value in final.items():  # the resumed run ends with the same adapter
        assert (again[key] - value).abs().max().item() <= 1e-6, key
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[:2] == full[:2]
    for a, b in zip(full[2:], resumed[2:], strict=True):
        # Same adapter, optimizer, scheduler, data order and rollout seeds → the same rollouts.
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
        assert a["rewards"] == pytest.approx(b["rewards"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    from conftest import load_tiny_fast

    from trainserve import FastLanguageModel
    from trainserve.rl import GRPOTrainer, toy_config, toy_dataset, toy_reward_funcs
    from trainserve.rl.checkpoint import latest_checkpoint, load_adapter_in_place, save_checkpoint

    model, tok = load_tiny_fast()
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    args = toy_config(str(tmp_path), steps=1, seed=0, per_device_train_batch_size=8, num_generations=4,
                      save_strategy="steps", save_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=toy_reward_funcs(), args=args,
                          train_dataset=toy_dataset(16), processing_class=tok)
    trainer.train()  # saves checkpoint-1 at the end
    good = latest_checkpoint(str(tmp_path))
    assert good is not None and good.endswith("checkpoint-1")

    def crash(directory):
        with open(os.path.join(directory, "optimizer.pt"), "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", crash)
    trainer.state.global_step = 2
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(trainer, str(tmp_path))
    assert latest_checkpoint(str(tmp_path)) == good
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]

    other = FastLanguageModel.get_peft_model(load_tiny_fast()[0], r=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="does not match the model"):
        load_adapter_in_place(other, good)
