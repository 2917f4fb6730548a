"""Gradient checkpointing per decoder layer, optionally offloading the saved input to the CPU.

``use_gradient_checkpointing`` takes three values:

* ``"unsloth"`` - :func:`offloaded_checkpoint`: each layer runs without saving activations;
  only its input is kept, copied on a side stream into pinned host memory (asynchronously, so
  the copy overlaps the layer's compute). In the backward the input is copied back (the next
  layer down is prefetched while this one recomputes), the layer is recomputed with grad enabled
  and back-propagated. Parameter gradients (LoRA) accumulate through that inner backward.
* ``True`` - plain non-reentrant ``torch.utils.checkpoint``.
* ``False`` - no checkpointing.

On CPU tensors nothing is moved (the "offload" keeps a reference), so the same code runs in CI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint

GCMode = bool | str

_STREAMS: dict[int, torch.cuda.Stream] = {}


def normalize_gc_mode(mode: Any) -> GCMode:
    """Map user values to ``"unsloth"``, ``True`` or ``False`` (raises ValueError otherwise)."""
    if mode is None or mode is False:
        return False
    if mode is True:
        return True
    if isinstance(mode, str):
        low = mode.lower()
        if low == "unsloth":
            return "unsloth"
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no", "none", ""):
            return False
    raise ValueError(f'use_gradient_checkpointing must be "unsloth", True or False, got {mode!r}')


def _offload_stream(device: torch.device) -> torch.cuda.Stream:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _STREAMS:
        _STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _STREAMS[idx]


class OffloadedTensor:
    """A tensor parked in pinned host memory, with an asynchronous way back."""

    def __init__(self, x: torch.Tensor, prev: OffloadedTensor | None = None) -> None:
        self.device = x.device
        self.prev = prev  # the input of the layer before: prefetched during this one's backward
        self._gpu: torch.Tensor | None = None
        if x.device.type != "cuda":
            self.host = x.detach()
            return
        stream = _offload_stream(x.device)
        self.host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            self.host.copy_(x.detach(), non_blocking=True)
        x.record_stream(stream)  # the allocator must not reuse x before the copy has read it

    def prefetch(self) -> None:
        """Start copying back on the side stream (no-op on CPU or when already started)."""
        if self._gpu is not None or self.device.type != "cuda":
            return
        stream = _offload_stream(self.device)
        gpu = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))  # gpu's memory is free to write
        with torch.cuda.stream(stream):
            gpu.copy_(self.host, non_blocking=True)
        gpu.record_stream(stream)
        self._gpu = gpu

    def fetch(self) -> torch.Tensor:
        """The tensor on its device, ready to use on the current stream."""
        if self.device.type != "cuda":
            return self.host
        self.prefetch()
        torch.cuda.current_stream(self.device).wait_stream(_offload_stream(self.device))
        gpu, self._gpu = self._gpu, None
        self.host = None  # the pinned block returns to the caching host allocator
        return gpu


_ANCHORS: dict[str, torch.Tensor] = {}


def _grad_anchor(device: torch.device) -> torch.Tensor:
    """An empty leaf that requires grad: passed when the layer input does not, so the
    checkpoint's backward still runs and the layer's own parameters get their gradients."""
    key = str(device)
    if key not in _ANCHORS:
        _ANCHORS[key] = torch.empty(0, device=device, requires_grad=True)
    return _ANCHORS[key]


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, run_fn: Callable[..., torch.Tensor], chain: list, anchor: Any, x: torch.Tensor, *args: Any
    ):
        ctx.run_fn = run_fn
        ctx.args = args
        ctx.x_needs_grad = x.requires_grad
        prev = chain[-1] if chain else None
        ctx.saved = OffloadedTensor(x, prev)
        chain.append(ctx.saved)
        ctx.autocast = _autocast_state(x.device.type)
        ctx.rng = _rng_state(x.device)
        with torch.no_grad():
            return run_fn(x, *args)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        saved: OffloadedTensor = ctx.saved
        x = saved.fetch().detach()
        if saved.prev is not None:
            saved.prev.prefetch()
        x.requires_grad_(ctx.x_needs_grad)
        with torch.enable_grad(), _restore(ctx.autocast, ctx.rng, x.device):
            out = ctx.run_fn(x, *ctx.args)
        if out.requires_grad:
            torch.autograd.backward(out, dy)
        ctx.saved = None
        return (None, None, None, x.grad if ctx.x_needs_grad else None, *([None] * len(ctx.args)))


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


class _restore:
    """Context: the forward's autocast mode and RNG state (so dropout masks repeat), then back."""

    def __init__(self, autocast: tuple, rng: tuple, device: torch.device) -> None:
        self.autocast, self.rng, self.device = autocast, rng, device

    def __enter__(self) -> None:
        self.saved_rng = _rng_state(self.device)
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state(self.rng[1], self.device)
        dev, enabled, dtype = self.autocast
        self.ac = torch.autocast(dev, dtype=dtype, enabled=enabled)
        self.ac.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.ac.__exit__(*exc)
        torch.set_rng_state(self.saved_rng[0])
        if self.saved_rng[1] is not None:
            torch.cuda.set_rng_state(self.saved_rng[1], self.device)


def offloaded_checkpoint(
    run_fn: Callable[..., torch.Tensor], chain: list, x: torch.Tensor, *args: Any
) -> torch.Tensor:
    """Checkpoint ``run_fn(x, *args)`` keeping only ``x``, parked in pinned CPU memory.

    ``chain`` is a list shared by the layers of one forward pass (it links each saved input to the
    previous one for prefetching). When ``x`` does not require grad (the first layer over frozen
    embeddings) an anchor leaf makes the backward run anyway, without a gradient for ``x``.
    """
    anchor = _grad_anchor(x.device) if torch.is_grad_enabled() and not x.requires_grad else None
    return _OffloadedCheckpoint.apply(run_fn, chain, anchor, x, *args)


def checkpoint_layer(
    mode: GCMode, run_fn: Callable[..., torch.Tensor], chain: list, x: torch.Tensor, *args: Any
) -> torch.Tensor:
    """Run one layer under the given checkpointing mode."""
    if mode == "unsloth":
        return offloaded_checkpoint(run_fn, chain, x, *args)
    if mode:
        return torch.utils.checkpoint.checkpoint(run_fn, x, *args, use_reentrant=False)
    return run_fn(x, *args)
