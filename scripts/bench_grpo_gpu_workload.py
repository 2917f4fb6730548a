"""The GPU GRPO benchmark's workload, the same for every arm: prompts and reward.

Kept apart from the arms (``bench_grpo_gpu_arms.py``) so that what is measured - the prompts every
framework sees and the reward it optimises - reads in one place and cannot differ by arm.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

WORDS = ("the sky is blue and the old bridge crosses the river where a small robot writes a map of stars "
         "for the reader who asks what two plus two is and names a number").split()

def prompt_texts(model_path: str, n: int, prompt_tokens: int) -> tuple[list[str], list[int]]:
    """``n`` plain-text prompts of about ``prompt_tokens`` tokens, the same for every arm.

    Plain text, not chat messages: no chat template is involved, so all three frameworks see the
    same token ids. Lengths are counted with the checkpoint's own ``tokenizer.json``."""
    rng = random.Random(0)
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
    except Exception:
        tok = None
    texts, lengths = [], []
    for i in range(n):
        body = f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(prompt_tokens))
        if tok is not None:
            body = tok.decode(tok.encode(body).ids[:max(prompt_tokens - 3, 1)])
        text = body + " Answer:"
        texts.append(text)
        lengths.append(len(tok.encode(text).ids) if tok is not None else len(text.split()))
    return texts, lengths


def length_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """Words in the completion / 64, capped at 1. The model has random weights, so this only makes
    the run realistic (rewards are computed and logged); it is not expected to rise."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [min(len(t.split()), 64) / 64 for t in texts]
