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
    #: True when the engine does more than ``x @ dequantised W`` (FP8 formats round their inputs
    #: too): GEMMs then go through :meth:`matmul` / :meth:`grad_matmul`, never through a dense
    #: weight a caller dequantised and multiplied itself
    own_matmuls: bool = False

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ W.T`` for a 2-D input, computed as the engine computes it."""
        return x2 @ self.dequantize_t(x2.dtype)

    def grad_matmul(self, dout: torch.Tensor) -> torch.Tensor:
        """``dout @ W``: the input gradient (straight through any input rounding of :meth:`matmul`)."""
        return dout @ self.dequantize_t(dout.dtype).t()

    def round_input(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2`` (2-D) as the engine rounds it before this GEMM; unchanged unless ``own_matmuls``."""
        return x2

    def round_input_straight_through(self, x: torch.Tensor) -> torch.Tensor:
        """For plain-autograd references: ``x`` rounded as by :meth:`round_input` in the forward,
        the identity in the backward."""
        if not self.own_matmuls:
            return x
        return x + (self.round_input(x.reshape(-1, x.shape[-1])).view(x.shape) - x).detach()

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
        x2 = x.reshape(-1, x.shape[-1])
        if state.own_matmuls:
            out = state.matmul(x2)
            if bias is not None:
                out = out + bias.to(out.dtype)
        else:
            w_t = state.dequantize_t(x.dtype)
            out = x2 @ w_t if bias is None else torch.addmm(bias.to(x.dtype), x2, w_t)
        ctx.state = state
        return out.view(*x.shape[:-1], out.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return ctx.state.grad_matmul(grad.reshape(-1, grad.shape[-1])).view(*grad.shape[:-1], -1), None, None


def packed_linear(x: torch.Tensor, state: PackedWeightState, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A frozen packed projection with autograd through its input."""
    return _PackedLinear.apply(x, state, bias)


def packed_linear_reference(x: torch.Tensor, state: PackedWeightState,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-autograd reference: dequantise, then ``F.linear`` (inputs rounded first, straight
    through, for states whose engine rounds them)."""
    x = state.round_input_straight_through(x)
    return torch.nn.functional.linear(x, state.dequantize_t(x.dtype).t(), None if bias is None else bias.to(x.dtype))
