"""The main job (``make demo``) learns its facts through the live adapter and leaves the base alone."""

from __future__ import annotations

from conftest import load_tiny_fast


def test_demo_learns_with_the_live_adapter(capsys):
    from trainserve.demo import FACTS, run_demo

    load_tiny_fast()  # the demo's engine settings are the test session's: the engine is reused
    result = run_demo(None, steps=30, every=10, lr=3e-3, seed=3407, quiet_engine=True)
    assert result["correct"] >= len(FACTS) - 1
    assert result["base_unchanged"]
    assert result["adapter_copy_ms_median"] > 0
    assert "hot swap" in capsys.readouterr().out
