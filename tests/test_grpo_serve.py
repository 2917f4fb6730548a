"""GRPO while serving: the HTTP model ``live`` answers with the newest optimizer step during training."""

from __future__ import annotations

import httpx
import pytest
from conftest import load_tiny_fast
from server_support import VERSION

pytestmark = pytest.mark.engine


def test_live_adapter_is_served_during_grpo(tmp_path):
    from transformers import TrainerCallback

    from trainserve import FastLanguageModel
    from trainserve.model_api import state_of
    from trainserve.rl import GRPOTrainer, toy_config, toy_dataset, toy_reward_funcs

    model, tok = load_tiny_fast()
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    live = state_of(model).live
    args = toy_config(str(tmp_path), steps=3, seed=0, per_device_train_batch_size=8, num_generations=4)
    seen: list[tuple[str, str]] = []
    handle = model.serve(port=0, background=True)

    class AskLive(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            response = httpx.post(f"{handle.url}/v1/completions", timeout=60, json={
                "model": "live", "prompt": "Question: What color is the sky? Answer:", "max_tokens": 4})
            response.raise_for_status()
            seen.append((response.headers[VERSION], f"live@v{live.version}"))

    try:
        trainer = GRPOTrainer(model=model, reward_funcs=toy_reward_funcs(), args=args,
                              train_dataset=toy_dataset(16), processing_class=tok, callbacks=[AskLive()])
        trainer.train()
    finally:
        handle.stop()
    assert trainer.state.global_step == 3 and len(seen) == 3
    served = [int(v.rsplit("@v", 1)[1]) for v, _ in seen]
    assert all(b > a for a, b in zip(served, served[1:], strict=False)), seen  # a new version every step
    assert all(v == expected for v, expected in seen), seen  # ... and it is the trainer's newest one
