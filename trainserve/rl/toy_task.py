"""The built-in GRPO toy task: "mention the target word, exactly once".

Two programmatic rewards, summed by TRL:

* ``target_word`` — 1.0 if the completion contains the target word (default ``blue``) as a word.
* ``once`` — ``1 / count`` for a completion that contains the word ``count`` >= 1 times, else 0.

The tiny random model starts near 0 (it says "blue" in ~3% of its 16-token completions). At the
settings of :func:`toy_config` it learns the word within ~15 steps (reward ≈ 1.3: it now repeats
it), then to say it less often (≈ 1.6 of 2.0 after 60 steps), under a minute on a quiet 2-core
CPU; seeds 0-3 all behave so. The curve is a real signal from engine rollouts: with a stale adapter
it stays flat.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from trainserve.rl.rewards import completion_text

TARGET_WORD = "blue"

QUESTIONS = (
    "What color is the sky?",
    "Tell me a joke.",
    "What is two plus two?",
    "Name a number.",
    "What is the secret phrase?",
    "Where is the old bridge?",
    "Who reads the map of stars?",
    "What does the small robot write?",
)


def toy_dataset(size: int = 256, conversational: bool = True) -> Any:
    """A ``datasets.Dataset`` with a ``prompt`` column: chat messages or plain ``Question: … Answer:``."""
    from datasets import Dataset

    rows = []
    for i in range(size):
        question = QUESTIONS[i % len(QUESTIONS)]
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": question}]})
        else:
            rows.append({"prompt": f"Question: {question} Answer:"})
    return Dataset.from_list(rows)


def target_word_reward(word: str = TARGET_WORD) -> Callable[..., list[float]]:
    """Reward 1.0 for completions containing ``word`` as a whole word (case-insensitive), else 0.0."""
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)

    def target_word(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [1.0 if pattern.search(completion_text(c)) else 0.0 for c in completions]

    return target_word


def once_reward(word: str = TARGET_WORD) -> Callable[..., list[float]]:
    """Reward ``1 / count`` for completions that contain ``word`` ``count`` >= 1 times, else 0."""
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)

    def once(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        counts = [len(pattern.findall(completion_text(c))) for c in completions]
        return [1.0 / n if n else 0.0 for n in counts]

    return once


def toy_reward_funcs(word: str = TARGET_WORD) -> list[Any]:
    """The toy task's reward functions: ``target_word`` and ``once``."""
    return [target_word_reward(word), once_reward(word)]


def toy_config(output_dir: str, steps: int = 60, seed: int = 0, **overrides: Any) -> Any:
    """A ``trl.GRPOConfig`` tuned for the toy task on the tiny model on CPU (override any field)."""
    import torch
    from trl import GRPOConfig

    from trainserve.distributed import launcher_world

    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=steps,
        seed=seed,
        learning_rate=5e-3,
        lr_scheduler_type="linear",  # decaying to 0 keeps the end of the run stable
        num_generations=8,
        per_device_train_batch_size=32,  # 4 prompts x 8 completions per step
        max_completion_length=16,
        temperature=1.0,
        top_p=1.0,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        # under torchrun on CPU, accelerate trains data-parallel only with use_cpu=True
        use_cpu=not torch.cuda.is_available() and launcher_world() is not None,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)
