"""Micro-batches that keep each prompt's samples together, where TRL's loss allows it.

Why: TRL shuffles the generation batch row by row before cutting it into micro-batches, so a
micro-batch of 16 from 8 prompts × 8 samples holds samples of about 7 prompts. The shared-prefix
forward (:mod:`trainserve.models.shared_prefix`) computes a prompt once per micro-batch, so it
saves a copy only for each *further* sample of that prompt in the same micro-batch: ~9 of 16
prompt copies. Shuffling whole prompt groups instead puts two full groups in each micro-batch of
16, and saves 14 of 16.

This changes nothing the optimizer sees only when the step's gradient does not depend on how the
rows are cut into micro-batches. That holds when every micro-batch of a generation is an
accumulation step of the same optimizer step (``steps_per_generation ==
gradient_accumulation_steps``) and the loss is normalised by constants or by counts over the whole
generation batch: ``grpo``, ``sapo``, ``dr_grpo`` and ``luspo`` average per row over micro-batches of
equal size; ``dapo``, ``cispo`` and ``vespo`` divide by ``num_items_in_batch``. ``bnpo`` divides by
each micro-batch's own token count, and ``top_entropy_quantile < 1`` takes a quantile per
micro-batch: there TRL's row shuffle is kept.
"""

from __future__ import annotations

from typing import Any

import torch

#: TRL loss types whose optimizer step does not depend on the micro-batch split (see above)
SPLIT_FREE_LOSSES = frozenset({"grpo", "sapo", "dr_grpo", "luspo", "dapo", "cispo", "vespo"})


def groups_may_stay_together(args: Any, loss_type: str, top_entropy_quantile: float) -> bool:
    """Whether shuffling whole prompt groups leaves every optimizer step unchanged."""
    return (
        loss_type in SPLIT_FREE_LOSSES
        and float(top_entropy_quantile) >= 1.0
        and args.steps_per_generation == args.gradient_accumulation_steps
    )


def group_order(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """A random row order that moves runs of identical prompts (TRL puts a prompt's samples next
    to each other) as wholes; one host sync."""
    n = prompt_ids.shape[0]
    starts = torch.ones(n, dtype=torch.bool, device=prompt_ids.device)
    if n > 1:
        starts[1:] = ((prompt_ids[1:] != prompt_ids[:-1]) | (prompt_mask[1:] != prompt_mask[:-1])).any(-1)
    cuts = [*starts.nonzero().flatten().tolist(), n]
    runs = list(zip(cuts, cuts[1:], strict=False))
    order = torch.randperm(len(runs)).tolist()
    return torch.tensor([i for r in order for i in range(*runs[r])], dtype=torch.long)


def reorder_rows(batch: dict[str, Any], order: torch.Tensor) -> dict[str, Any]:
    """Every per-row value of TRL's generation batch in ``order`` (tensors along their first
    dimension, lists item by item); scalars and None unchanged."""
    def apply(value: Any) -> Any:
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        if isinstance(value, torch.Tensor):
            return value[order.to(value.device)]
        return [value[i] for i in order.tolist()]

    return {key: apply(value) for key, value in batch.items()}
