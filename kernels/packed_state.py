"""What the fused LoRA path needs from a frozen weight kept in a packed (quantised) format.

bitsandbytes' NF4 weights carry a bitsandbytes ``QuantState`` (handled by :mod:`.nf4`). trainserve's
own engine formats (Marlin-layout integers, FP8) attach a :class:`PackedWeightState` to the
trainer's weight parameter instead: it knows its logical shape and how to produce the dense
weight, *transposed* — ``(in, out)`` — because that is the order both formats store, and
``x @ W_t`` needs no copy to become ``F.linear(x, W)``.
"""

from __future__ import annotations

import torch


class PackedWeightState:
    """Base class: a read-only view of an engine's packed weight for one projection."""

    #: ``(out_features, in_features)`` of the projection
    shape: torch.Size
    #: the activation dtype the engine computes in
    dtype: torch.dtype

    def dequantize_t(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight transposed, ``(in, out)`` of ``dtype``; written into ``out`` if given."""
        raise NotImplementedError

    def merge(self, others: list[PackedWeightState]) -> PackedWeightState | None:
        """One state covering ``[self, *others]`` when they are adjacent column ranges of one engine
        tensor (vLLM's fused q/k/v and gate/up), so the group dequantises in one launch; else None."""
        return None

    def tensors(self) -> list[torch.Tensor]:
        """The engine tensors this state reads (for sharing checks)."""
        raise NotImplementedError


class _PackedLinear(torch.autograd.Function):
    """``x @ W.t() + b`` for a frozen packed ``W``: the dense weight is rebuilt in the backward
    instead of being saved (weight-sized memory is held only for one GEMM at a time)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: PackedWeightState, bias: torch.Tensor | None) -> torch.Tensor:
        w_t = state.dequantize_t(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        out = x2 @ w_t if bias is None else torch.addmm(bias.to(x.dtype), x2, w_t)
        ctx.state = state
        return out.view(*x.shape[:-1], w_t.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w_t = ctx.state.dequantize_t(grad.dtype)
        return grad @ w_t.t(), None, None


def packed_linear(x: torch.Tensor, state: PackedWeightState, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A frozen packed projection with autograd through its input."""
    return _PackedLinear.apply(x, state, bias)


def packed_linear_reference(x: torch.Tensor, state: PackedWeightState,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-autograd reference: dequantise, then ``F.linear``."""
    return torch.nn.functional.linear(x, state.dequantize_t(x.dtype).t(), None if bias is None else bias.to(x.dtype))
