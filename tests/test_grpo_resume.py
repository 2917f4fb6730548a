"""Issue 10, item 2: resuming with a larger ``--steps`` extends the run like a straight run of the new total.

``run_grpo(steps=6)`` then ``run_grpo(steps=9, resume=True)`` against a straight ``run_grpo(steps=9)``:
steps 7-9 use the 9-step schedule's learning rates (not the 6-step schedule's final 0.0), the
adapter versions keep counting, and the first run's metrics are kept. Rewards differ from the
straight run after step 1 by design: steps 2-6 ran on the 6-step schedule.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.engine

RUN = dict(seed=2, batch_size=16, num_generations=4, max_completion_length=12, keep_checkpoints=0, plot=False,
           progress=False)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_resume_to_a_larger_total_continues_like_a_straight_run(tmp_path):
    from trainserve.rl.cli import run_grpo

    extended, straight = tmp_path / "extended", tmp_path / "straight"
    run_grpo(str(extended), steps=6, save_every=3, **RUN)
    first = _records(extended)
    run_grpo(str(extended), steps=9, save_every=1, resume=True, **RUN)
    run_grpo(str(straight), steps=9, save_every=3, **RUN)
    ext, ref = _records(extended), _records(straight)

    assert [r["step"] for r in ext] == [r["step"] for r in ref] == list(range(1, 10))
    assert ext[:6] == first  # the first run's lines are kept as they were
    assert first[0]["reward_mean"] == ref[0]["reward_mean"]  # same start: adapter, data, seeds
    for a, b in zip(ext[6:], ref[6:], strict=True):
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-9, abs=0.0), a["step"]
        assert a["adapter_version"] == b["adapter_version"], a["step"]
    assert ext[6]["adapter_version"] == ext[5]["adapter_version"] + 1  # versions keep counting
    # Step 7 trained (a learning rate of 0.0 would leave the adapter exactly as checkpoint-6 has it).
    at_6, at_7 = _adapter(extended / "checkpoint-6"), _adapter(extended / "checkpoint-7")
    assert any(not (at_6[k] == at_7[k]).all() for k in at_6)
    state = json.loads((extended / "checkpoint-9" / "trainer_state.json").read_text())
    assert state["global_step"] == 9 and state["max_steps"] == 9
