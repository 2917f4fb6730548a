"""Per-step GRPO metrics: ``metrics.jsonl`` (one JSON object per logged step) and a ``reward.png`` plot.

:class:`MetricsLogger` is a ``transformers`` callback that turns the logs TRL's GRPO trainer emits
(reward, per-function rewards, KL, loss, completion length, and the rollout timings that
:class:`trainserve.rl.GRPOTrainer` adds) into stable field names. On resume it drops lines past
the checkpoint's step, so the file always describes one consistent run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "reward.png"

# metrics.jsonl field ← TRL / trainserve log key
_FIELDS = {
    "reward_mean": "reward",
    "reward_std": "reward_std",
    "kl": "kl",
    "loss": "loss",
    "rollout_tokens_per_s": "rollout/tokens_per_s",
    "rollout_seconds": "rollout/seconds",
    "adapter_swap_ms": "rollout/adapter_swap_ms",
    "adapter_version": "rollout/adapter_version",
    # overlap=True only (trainserve.rl.overlap): how stale the batch was and how long the trainer waited
    "rollout_wait_s": "rollout/wait_seconds",
    "policy_step": "rollout/policy_step",
    "staleness": "rollout/staleness",
    "is_ratio_mean": "sampling/importance_sampling_ratio/mean",
    "is_ratio_min": "sampling/importance_sampling_ratio/min",
    "is_ratio_max": "sampling/importance_sampling_ratio/max",
    "sampling_logp_diff_mean": "sampling/sampling_logp_difference/mean",
    "completion_length_mean": "completions/mean_length",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "entropy": "entropy",
}


def metrics_record(step: int, logs: dict[str, Any], wall_time_s: float) -> dict[str, Any]:
    """The ``metrics.jsonl`` line for one logged step (fields missing from ``logs`` are left out)."""
    record: dict[str, Any] = {"step": int(step), "wall_time_s": round(float(wall_time_s), 3)}
    for field, key in _FIELDS.items():
        if key in logs and logs[key] is not None:
            record[field] = float(logs[key])
    record["rewards"] = {key[len("rewards/"):-len("/mean")]: float(value) for key, value in logs.items()
                         if key.startswith("rewards/") and key.endswith("/mean")}
    return record


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (empty if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger(TrainerCallback):
    """Append one line per logged training step to ``<out_dir>/metrics.jsonl``."""

    def __init__(self, out_dir: str, filename: str = METRICS_FILE):
        self.path = os.path.join(out_dir, filename)
        self._t0 = time.perf_counter()
        self._offset = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:  # data parallel: rank 0 writes the file
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        step = state.global_step  # > 0 when resuming: keep the lines up to the checkpoint
        kept = [r for r in read_metrics(self.path) if r["step"] <= step] if step else []
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)
        self._offset = kept[-1]["wall_time_s"] if kept else 0.0
        self._t0 = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not logs or "reward" not in logs or not state.is_world_process_zero:
            return  # eval and end-of-training summaries carry no reward
        record = metrics_record(state.global_step, logs, self._offset + time.perf_counter() - self._t0)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class RewardProgressBar(TrainerCallback):
    """A tqdm bar over training steps showing reward, rollout tok/s and adapter-swap time."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="grpo", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A step that is logged advances the bar in on_log, with that step's reward (one render per step).
        if self.bar is not None and not control.should_log:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if self.bar is None:
            return
        if logs and "reward" in logs:
            self.bar.set_postfix(reward=f"{logs['reward']:.3f}",
                                 tok_s=f"{logs.get('rollout/tokens_per_s', 0.0):.0f}",
                                 swap_ms=f"{logs.get('rollout/adapter_swap_ms', 0.0):.2f}", refresh=False)
        if state.global_step > self.bar.n:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is None:
            return
        bar, self.bar = self.bar, None
        if bar.total and bar.n >= bar.total and not bar.disable:
            # Finished: the last render already shows it. tqdm's close() would render the bar once more
            # (with the overall rate), a second final bar in logs and pipes.
            if bar.last_print_n < bar.n:  # the last update came too soon after the one before to be drawn
                bar.refresh()
            bar.fp.write("\n")
            bar.fp.flush()
            bar.disable = True
        bar.close()


# Colours: the reward mean and its band, its moving average, then one per reward function in the
# order of their sorted names (the same function keeps its colour between plots of one task).
_MEAN_COLOUR, _SMOOTH_COLOUR = "C0", "C1"
_FUNCTION_COLOURS = ("C2", "C3", "C4", "C5", "C6", "C8", "C9", "C7")


def plot_rewards(metrics_path: str, out_path: str, title: str = "GRPO reward",
                 reward_range: tuple[float, float] | None = None) -> str:
    """Plot reward mean (± std, moving average) and per-function means per step; return ``out_path``.

    The ± std band is clipped at ``reward_range`` (the lowest and highest reward a completion can get);
    without it, at 0 from below when no mean is negative.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path} has no metrics to plot")
    steps = [r["step"] for r in records]
    mean = [r.get("reward_mean", float("nan")) for r in records]
    std = [r.get("reward_std", 0.0) for r in records]
    if reward_range is not None:
        low, high = reward_range
    else:
        low = 0.0 if all(not m < 0 for m in mean) else float("-inf")
        high = float("inf")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.fill_between(steps, [max(low, m - s) for m, s in zip(mean, std, strict=True)],
                    [min(high, m + s) for m, s in zip(mean, std, strict=True)], color=_MEAN_COLOUR,
                    alpha=0.15, label="reward ± std")
    ax.plot(steps, mean, lw=1.0, alpha=0.6, color=_MEAN_COLOUR, label="reward (mean)")
    window = max(1, len(records) // 10)
    if window > 1:
        smooth = [sum(mean[max(0, i - window + 1):i + 1]) / len(mean[max(0, i - window + 1):i + 1])
                  for i in range(len(mean))]
        ax.plot(steps, smooth, lw=2.2, color=_SMOOTH_COLOUR, label=f"reward ({window}-step average)")
    names = sorted({name for r in records for name in r.get("rewards", {})})
    if len(names) > 1:
        for i, name in enumerate(names):
            ax.plot(steps, [r.get("rewards", {}).get(name, float("nan")) for r in records], lw=1.0, ls="--",
                    color=_FUNCTION_COLOURS[i % len(_FUNCTION_COLOURS)], label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
