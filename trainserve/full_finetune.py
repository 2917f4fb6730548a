"""Full fine-tuning with the live engine (``full_finetuning=True, fast_inference=True``).

The trainer's parameters are views of the engine's tensors, so an optimizer step *is* the engine's
new weights: nothing is copied, no sync call exists. What has to be made correct around it:

* **The prefix cache.** vLLM keys cached KV blocks by token ids (and LoRA name), not by weights: a
  prompt whose first block (128 tokens on CPU) was seen before the step would reuse KV computed
  with the old weights. After every optimizer step that updates the model, the cache is reset.
* **Requests in flight** (only when the engine loop runs in the background, e.g. ``model.serve``):
  the optimizer step runs *between* engine steps (the loop is held for the step's duration, so no
  forward pass reads half-written weights). The reset right after it preempts every running
  request (vLLM's ``reset_prefix_cache(reset_running_requests=True)``): its KV is recomputed on the
  new weights. Tokens it generated before the step stay (they were sampled from the old weights);
  every later token is what the new weights give for the whole text so far.
* **Edits outside an optimizer** (``with torch.no_grad(): p.add_(...)``) bump the tensors' version
  counters; ``fast_generate`` checks them and resets the cache too. Fused optimizers do not bump
  those counters, which is why optimizer steps are caught by a global step hook.
* **Everything the engine serves moves with the base**: saved adapters (``load_lora``) and any other
  LoRA apply on top of the changed weights, and the engine no longer holds the checkpoint, so a
  later ``from_pretrained`` refuses to reuse it (``Engine.base_modified``).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from trainserve.engine.optimizer_watch import updates_any

_LIVE_BASES: weakref.WeakSet[LiveBase] = weakref.WeakSet()


def _before_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    for live in list(_LIVE_BASES):
        if live.holds(optimizer):
            live.before_step()


def _after_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    for live in list(_LIVE_BASES):
        if live.holds(optimizer):
            live.after_step()


_PRE_HOOK = register_optimizer_step_pre_hook(_before_optimizer_step)
_POST_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


class LiveBase:
    """Keeps the engine correct while a full fine-tuning trainer writes its weights in place."""

    def __init__(self, engine: Any, model: Any):
        self.engine = engine
        self._params = [p for p in model.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("full fine-tuning needs trainable parameters; the model has none")
        self._param_ids = frozenset(id(p) for p in self._params)
        self._optimizers: weakref.WeakKeyDictionary[Any, tuple[int, bool]] = weakref.WeakKeyDictionary()
        self._held: threading.Thread | None = None  # the thread holding the engine loop for a step
        self._marker = self._current_marker()
        self.steps = 0  # optimizer steps seen
        self.invalidations = 0  # prefix-cache resets done
        _LIVE_BASES.add(self)

    def holds(self, optimizer: Any) -> bool:
        """True when ``optimizer`` updates parameters of this model (cached per optimizer)."""
        return updates_any(self._optimizers, self._param_ids, optimizer)

    def _current_marker(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._params)

    def before_step(self) -> None:
        """Pause the engine (after the step it is running, if any) for the optimizer's writes."""
        if self._held is threading.current_thread():
            return  # an earlier step raised before its post hook: the hold is still ours
        self.engine.loop.hold()
        self._held = threading.current_thread()

    def after_step(self) -> None:
        """The weights changed: drop stale KV (preempting running requests), let the engine go on."""
        self.steps += 1
        try:
            self._invalidate()
        finally:
            self._release()

    def _release(self) -> None:
        if self._held is threading.current_thread():
            self._held = None
            self.engine.loop.release()

    def _invalidate(self) -> None:
        """Reset the prefix cache. Called with the engine loop held (or from a between-steps job)."""
        self.engine.base_modified = True
        self._marker = self._current_marker()
        if not self.engine.llm.llm_engine.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError("vLLM refused to reset its prefix cache after a full fine-tuning step")
        self.invalidations += 1

    def sync(self) -> None:
        """Before generating: reset the cache if the weights changed outside an optimizer step.

        Also releases a hold left by an optimizer step that raised in this thread."""
        self._release()
        if self._current_marker() != self._marker:
            self.engine.loop.call(self._invalidate)


def enable_full_finetuning(model: Any, engine: Any) -> LiveBase:
    """Make every base parameter of ``model`` (views of ``engine``'s tensors) trainable and keep the
    engine's prefix cache in step with the optimizer (see the module docstring)."""
    from trainserve.engine import vllm_compat

    vllm_compat.read_head_weight_live(engine.model)
    model.requires_grad_(True)
    return LiveBase(engine, model)
