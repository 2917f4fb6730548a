"""Module walks that ``transformers.Trainer`` repeats on the host every micro-batch, done while the GPU is busy.

Why: ``Trainer.training_step`` starts every micro-batch with ``model.train()``, and gradient
clipping passes ``model.parameters()`` to accelerate. Both walk the whole module tree in Python. A
LoRA model has many small modules (peft adds ~11 per adapted linear: ModuleDicts, ParameterDicts,
dropout, A and B), so a 28-layer model with all seven projections adapted has 2,333 of them, and
one ``model.train()`` costs ~10 ms of Python, ``model.parameters()`` ~7 ms. These calls come right
after a host sync (the previous micro-batch's NaN/Inf check of its loss, the logging of metrics),
so the GPU sits idle through them: on the H200, 7B GRPO's training part showed a 12-16 ms idle gap
at every micro-batch boundary and ~11 ms before the gradient clip (BENCHMARKS.md, series 11
profile), about 50 ms of each 3.5 s step.

What changes: :class:`ModuleWalkCache` walks the tree once per micro-batch *after* its backward has
been launched, when the GPU has a backward pass queued and the host would only wait for it. The
next micro-batch's ``model.train()`` then checks the cached modules' flags (~0.1 ms) instead of
setting them again, and the clip gets the cached parameter list. Nothing is skipped that would
change a result: ``train()`` is only elided when every cached module is already in training mode
(an ``eval()`` anywhere in between, on the model or on any submodule, makes it walk as before), and
the clip sees the same parameters in the same order. A module attached after the refresh is missed
by the check only if it was also switched to eval mode since; modules are created in training
mode. A model with a module whose ``train()`` does more than set flags (peft's DoRA layers clear a
cache in it) always gets the real call. The elisions are one-shot instance attributes
(``model.train`` / ``model.parameters``), removed before the wrapped Trainer call returns, so the
model behaves as usual everywhere else.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["ModuleWalkCache"]


class ModuleWalkCache:
    """The modules and parameters of one model as of the last :meth:`refresh`."""

    def __init__(self) -> None:
        self._model: torch.nn.Module | None = None
        self._modules: list[torch.nn.Module] = []
        self._parameters: list[torch.nn.Parameter] = []
        self._flags_only = False
        self.elided_train_calls = 0  # counters, for tests and benchmarks
        self.cached_parameter_calls = 0

    def refresh(self, model: torch.nn.Module, parameters: bool = True) -> None:
        """Walk ``model`` now (call it when the GPU has queued work, e.g. right after ``backward()``).
        ``parameters=False``: the modules only (no clip follows this micro-batch); the cached
        parameter list is then dropped, never left stale."""
        self._model = model
        self._modules = list(model.modules())
        self._parameters = list(model.parameters()) if parameters else []
        # A module class whose train() does more than set flags (peft's DoRA layers clear a cache)
        # must get its call: no elision for such a model.
        safe = _flag_setting_trains()
        self._flags_only = all(getattr(t, "train", None) in safe for t in {type(m) for m in self._modules})

    def all_training(self, model: torch.nn.Module) -> bool:
        """True if ``model`` is the cached model, only sets flags in ``train()``, and every cached
        module is in training mode."""
        return (self._model is model and self._flags_only and bool(self._modules)
                and all(m.training for m in self._modules))

    @contextmanager
    def train_call_elided(self, model: torch.nn.Module) -> Iterator[None]:
        """Inside, the first ``model.train()`` returns at once if nothing has left training mode since
        the last refresh; any other call (or ``train(False)``) runs the real walk."""
        if not self.all_training(model):
            yield
            return

        def train_unless_already(mode: bool = True) -> torch.nn.Module:
            _drop(model, "train", train_unless_already)  # one shot: later calls are the model's own
            if mode and self.all_training(model):
                self.elided_train_calls += 1
                return model
            return model.train(mode)

        with _instance_attribute(model, "train", train_unless_already):
            yield

    @contextmanager
    def parameters_cached(self, model: torch.nn.Module) -> Iterator[None]:
        """Inside, ``model.parameters()`` (default arguments) returns the cached list's iterator."""
        if self._model is not model or not self._parameters:
            yield
            return
        cached = self._parameters

        def cached_parameters(recurse: bool = True) -> Iterator[torch.nn.Parameter]:
            if not recurse:
                return type(model).parameters(model, recurse)
            self.cached_parameter_calls += 1
            return iter(cached)

        with _instance_attribute(model, "parameters", cached_parameters):
            yield


@functools.cache
def _flag_setting_trains() -> frozenset[Any]:
    """``train`` methods that only set ``training`` flags when the mode does not change: torch's, and
    the overrides of transformers (which re-applies kernels on a mode change only) and DDP."""
    trains: set[Any] = {torch.nn.Module.train, torch.nn.parallel.DistributedDataParallel.train}
    try:
        from transformers import PreTrainedModel

        trains.add(PreTrainedModel.train)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return frozenset(trains)


@contextmanager
def _instance_attribute(model: torch.nn.Module, name: str, value: Any) -> Iterator[None]:
    if name in model.__dict__:  # someone else's override: leave it alone
        yield
        return
    model.__dict__[name] = value
    try:
        yield
    finally:
        _drop(model, name, value)


def _drop(model: torch.nn.Module, name: str, value: Any) -> None:
    if model.__dict__.get(name) is value:
        del model.__dict__[name]
