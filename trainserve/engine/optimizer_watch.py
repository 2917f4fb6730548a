"""Which optimizers step the parameters a component watches.

The live adapter and the live base (full fine-tuning) both hook every optimizer's step globally
(``torch.optim.Optimizer.register_optimizer_step_*_hook``) and must react only to optimizers that
update *their* parameters. Scanning every param group on every step is wasted work in a training
loop, so the answer is cached per optimizer and recomputed only when its number of param groups
changes (``add_param_group``).
"""

from __future__ import annotations

from typing import Any


def updates_any(cache: Any, param_ids: set[int], optimizer: Any) -> bool:
    """True when ``optimizer`` updates a parameter whose ``id`` is in ``param_ids``; ``cache`` is the
    caller's ``weakref.WeakKeyDictionary`` (so optimizers are not kept alive)."""
    cached = cache.get(optimizer)
    n_groups = len(optimizer.param_groups)
    if cached is None or cached[0] != n_groups:
        found = any(id(p) in param_ids for g in optimizer.param_groups for p in g["params"])
        cached = cache[optimizer] = (n_groups, found)
    return cached[1]
