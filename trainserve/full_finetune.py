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
* **A step that raises** (torch then skips the post-hook) still releases the engine loop and
  resets the cache: ``LiveBase.guard`` says how.
* **Everything the engine serves moves with the base**: saved adapters (``load_lora``) and any other
  LoRA apply on top of the changed weights, and the engine no longer holds the checkpoint, so a
  later ``from_pretrained`` refuses to reuse it (``Engine.base_modified``).
"""

from __future__ import annotations

import logging
import sys
import threading
import types
import weakref
from typing import Any

from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from trainserve.engine import vllm_compat
from trainserve.engine.optimizer_watch import updates_any

logger = logging.getLogger("trainserve")
_LIVE_BASES: weakref.WeakSet[LiveBase] = weakref.WeakSet()


def _before_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    for live in list(_LIVE_BASES):
        if live.holds(optimizer):
            live.guard(optimizer, sys._getframe(1))
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
        self._guard_token = object()  # marks the optimizer.step wrappers of this LiveBase (see guard)
        self._local = threading.local()  # .guarded: steps of this thread running through such a wrapper
        self._marker = self._current_marker()
        self.steps = 0  # optimizer steps seen
        self.invalidations = 0  # prefix-cache resets done
        _LIVE_BASES.add(self)

    def holds(self, optimizer: Any) -> bool:
        """True when ``optimizer`` updates parameters of this model (cached per optimizer)."""
        return updates_any(self._optimizers, self._param_ids, optimizer)

    def guard(self, optimizer: Any, step_frame: Any) -> None:
        """Make sure this optimizer step releases the engine loop even if it raises.

        The hold taken by the pre-hook is released by the post-hook, which torch skips when the step
        raises: the engine loop would stay held by this thread, and a background loop (a server)
        and every request would wait forever. torch has no hook for a failed step, so:

        * the optimizer's ``step`` is wrapped (once per optimizer) in a ``try`` that, on failure,
          releases the hold and resets the prefix cache (the step may have written part of the
          weights). The wrapper is a bound method (LR schedulers read ``step.__func__``) calling the
          ``step`` it replaced (the class's, or an LR scheduler's own wrapper);
        * a step not running through that wrapper (the optimizer's first: the global hook only sees
          an optimizer once it steps) is watched with a one-shot ``sys.setprofile`` on torch's step
          frame ``step_frame``, whose ``return`` event also comes when it unwinds with an
          exception. Under another profiler (``sys.getprofile()`` set) it is not watched; its hold
          is then released by this thread's next optimizer step or ``fast_generate``
          (:meth:`sync`)."""
        if getattr(self._local, "guarded", 0):
            return
        inner = optimizer.step
        if getattr(inner, "_trainserve_guard", None) is not self._guard_token:
            optimizer.step = types.MethodType(self._guarded(inner, optimizer), optimizer)
        self._watch(step_frame)

    def _guarded(self, inner: Any, optimizer: Any) -> Any:
        """The ``step`` wrapper of :meth:`guard`, around ``inner`` (``optimizer.step`` before it)."""
        if isinstance(inner, types.MethodType) and inner.__self__ is optimizer:
            func = inner.__func__  # the class's step: called unbound, no second reference to the optimizer

            def call_inner(opt: Any, *args: Any, **kwargs: Any) -> Any:
                return func(opt, *args, **kwargs)
        else:  # an instance wrapper installed earlier (an LR scheduler's): call it as it is
            def call_inner(opt: Any, *args: Any, **kwargs: Any) -> Any:
                return inner(*args, **kwargs)
        live, local = weakref.ref(self), self._local

        def guarded_step(opt: Any, *args: Any, **kwargs: Any) -> Any:
            local.guarded = getattr(local, "guarded", 0) + 1
            try:
                return call_inner(opt, *args, **kwargs)
            except BaseException:
                base = live()
                if base is not None:
                    base.abandon_step()
                raise
            finally:
                local.guarded -= 1

        guarded_step._trainserve_guard = self._guard_token  # type: ignore[attr-defined]
        if getattr(inner, "_wrapped_by_lr_sched", False):  # keeps the scheduler from warning of an override
            guarded_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        return guarded_step

    def _watch(self, step_frame: Any) -> None:
        """Release the hold when ``step_frame`` returns or unwinds (see :meth:`guard`)."""
        if sys.getprofile() is not None:
            return
        live = weakref.ref(self)

        def profile(frame: Any, event: str, arg: Any) -> None:
            if frame is step_frame and event == "return":
                sys.setprofile(None)
                base = live()
                try:
                    if base is not None:
                        base.abandon_step()
                except Exception:  # raising here would replace the step's own exception
                    logger.exception("full fine-tuning: resetting the prefix cache after a failed step failed")

        sys.setprofile(profile)

    def abandon_step(self) -> None:
        """An optimizer step raised (its post-hook never ran): reset the cache, let the engine go on."""
        if self._held is not threading.current_thread():
            return
        try:
            self._invalidate()
        finally:
            self._release()

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
        if not vllm_compat.reset_prefix_cache(self.engine.llm, running=True):
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
    vllm_compat.read_head_weight_live(engine.model)
    model.requires_grad_(True)
    return LiveBase(engine, model)
