"""Reinforcement learning (GRPO) with rollouts from the colocated engine.

``GRPOTrainer`` is ``trl.GRPOTrainer`` with every rollout sampled by the process's vLLM engine
through the live adapter; configure it with a plain ``trl.GRPOConfig``. Names are imported lazily
(TRL is slow to import and the ``trainserve`` command imports this package to list subcommands).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GRPOTrainer": "trainserve.rl.trainer",
    "RewardFunctionError": "trainserve.rl.rewards",
    "RolloutRecord": "trainserve.rl.overlap",
    "checked_reward_func": "trainserve.rl.rewards",
    "MetricsLogger": "trainserve.rl.metrics",
    "RewardProgressBar": "trainserve.rl.metrics",
    "plot_rewards": "trainserve.rl.metrics",
    "save_checkpoint": "trainserve.rl.checkpoint",
    "latest_checkpoint": "trainserve.rl.checkpoint",
    "toy_config": "trainserve.rl.toy_task",
    "toy_dataset": "trainserve.rl.toy_task",
    "toy_reward_funcs": "trainserve.rl.toy_task",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainserve.rl' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
