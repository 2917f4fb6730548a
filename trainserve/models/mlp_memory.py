"""Whether each SwiGLU MLP saves its gate|up activation for the backward or computes it again.

Why this is a choice: gate|up, ``tokens x 2 * intermediate`` values per layer, is the largest
tensor a decoder layer keeps for its backward. At the Qwen2-7B shape a micro-batch of 16 rows of
386 tokens holds 0.44 GiB of it per layer, 12.2 GiB per forward. Computing it again in the backward
instead costs one more gate|up GEMM per layer: about 250 ms of a 7B GRPO step on an H200
(BENCHMARKS.md, eleventh series). With layer checkpointing the layer's whole forward runs again
anyway, so there is nothing to choose; without it trainserve recomputes by default, because a
colocated engine and its KV cache share the GPU with the trainer.

Between the two, ``TRAINSERVE_MLP_KEEP_GIB`` spends a fixed amount of memory where it saves the
most time: each training forward keeps gate|up for as many layers as fit in that many GiB (the
first layers of the forward take it; the token count of each micro-batch decides how many), and
recomputes it for the rest. The budget is per forward: the activations of one micro-batch are
freed by its backward before the next forward starts, which is how training loops run. Memory
the engine needs only while it generates (its KV cache, released during training by KV standby)
is what such a budget can use without raising the step's peak; how much that is depends on the
engine's settings, so the number is yours to set (docs/grpo.md, "Saved activations and memory").

Environment (read when a model is patched; a bad value raises ``ValueError`` naming the variable):

- ``TRAINSERVE_MLP_RECOMPUTE``: ``auto`` (default: recompute without layer checkpointing),
  ``0`` keep gate|up in every layer, ``1`` recompute it in every layer.
- ``TRAINSERVE_MLP_KEEP_GIB``: GiB of gate|up kept per forward where recompute is on (default 0).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_COUNTS = {"kept": 0, "recomputed": 0}


def mlp_recompute_default(mode: Any) -> bool:
    """Whether the MLPs of a model patched with checkpointing ``mode`` recompute gate|up: yes
    without layer checkpointing (``mode is False``), unless ``TRAINSERVE_MLP_RECOMPUTE`` says."""
    env = os.environ.get("TRAINSERVE_MLP_RECOMPUTE", "auto").strip().lower()
    if env in _FALSE:
        return False
    if env in _TRUE:
        return True
    if env in ("", "auto"):
        return mode is False
    raise ValueError(f"TRAINSERVE_MLP_RECOMPUTE={env!r}: use auto, 0 (keep gate|up) or 1 (recompute it)")


class GateUpKeepBudget:
    """Bytes of gate|up activations one training forward may keep; shared by a model's MLPs."""

    def __init__(self, limit_bytes: int):
        if limit_bytes < 0:
            raise ValueError(f"keep budget must be >= 0 bytes, got {limit_bytes}")
        self.limit_bytes = int(limit_bytes)
        self.left = self.limit_bytes

    def reset(self) -> None:
        """A new training forward starts: the previous micro-batch's activations are gone."""
        self.left = self.limit_bytes

    def take(self, nbytes: int) -> bool:
        """Keep a gate|up of ``nbytes`` if it fits in what is left (and charge it)."""
        if nbytes <= self.left:
            self.left -= nbytes
            return True
        return False


def keep_budget_from_env() -> GateUpKeepBudget | None:
    """The budget ``TRAINSERVE_MLP_KEEP_GIB`` asks for; None when unset or 0."""
    raw = os.environ.get("TRAINSERVE_MLP_KEEP_GIB", "").strip()
    if not raw:
        return None
    try:
        gib = float(raw)
    except ValueError:
        gib = math.nan
    if not math.isfinite(gib) or gib < 0:
        raise ValueError(f"TRAINSERVE_MLP_KEEP_GIB={raw!r}: give a number of GiB >= 0 (0 keeps none)")
    return GateUpKeepBudget(int(gib * 2**30)) if gib > 0 else None


def gate_up_bytes(x: torch.Tensor, width: int, dtype: torch.dtype | None) -> int:
    """Bytes of the gate|up activation of input ``x`` (``..., hidden``): tokens x ``width`` values
    in ``dtype`` (the projections' compute dtype; ``x``'s when None)."""
    tokens = x.numel() // max(x.shape[-1], 1)
    return tokens * width * (dtype or x.dtype).itemsize


def decide_recompute(module: torch.nn.Module, x: torch.Tensor, width: int, dtype: torch.dtype | None) -> bool:
    """Whether this MLP call (with autograd recording) recomputes gate|up in its backward: the
    module's setting, then its model's keep budget. Counted for :func:`gate_up_counts`."""
    recompute = bool(getattr(module, "_trainserve_recompute", False))
    budget = getattr(module, "_trainserve_keep", None)
    if recompute and budget is not None and budget.take(gate_up_bytes(x, width, dtype)):
        recompute = False
    _COUNTS["recomputed" if recompute else "kept"] += 1
    return recompute


def gate_up_counts() -> dict[str, int]:
    """MLP calls under autograd in this process that kept gate|up and that recomputed it (each
    fused MLP call of a training forward counts once)."""
    return dict(_COUNTS)
