"""The trainer's frozen projection over a packed engine weight (trainserve's integer and FP8 formats).

It is an ``nn.Linear`` so that PEFT wraps it with its plain LoRA layer and everything that looks
for linear layers finds it, but its ``weight`` parameter is the engine's packed storage viewed
as integers (never a float dtype: PEFT casts adapters to a float base weight's dtype, which for
FP8 would silently train the adapter in FP8). The packed format itself sits in
``weight.quant_state`` (a :class:`~trainserve.kernels.packed_state.PackedWeightState`), which is
where the fused LoRA kernels look for it too.
"""

from __future__ import annotations

import torch
from torch import nn

from trainserve.kernels.packed_state import PackedWeightState, packed_linear


class PackedLinear(nn.Linear):
    """``y = x W^T + b`` with ``W`` dequantised from the engine's bytes on each use."""

    def __init__(self, state: PackedWeightState, storage: torch.Tensor, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a dense weight
        self.out_features, self.in_features = int(state.shape[0]), int(state.shape[1])
        if storage.is_floating_point():
            storage = storage.view(torch.uint8) if storage.element_size() == 1 else storage.view(torch.int16)
        weight = nn.Parameter(storage, requires_grad=False)
        weight.quant_state = state
        self.weight = weight
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        #: PEFT (and the fused LoRA path) take the adapters' and activations' dtype from here
        self.compute_dtype = state.dtype

    @property
    def quant_state(self) -> PackedWeightState:
        return self.weight.quant_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight.quant_state, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"format={type(self.quant_state).__name__}, bias={self.bias is not None}"


def no_engine_statistics(engine_param: nn.Parameter) -> list[torch.Tensor]:
    """Packed formats keep everything in the engine layer's own parameters."""
    return []


def packed_statistics(param: nn.Parameter) -> list[torch.Tensor]:
    """The engine tensors a trainer weight with a packed state reads (its scales, zero points)."""
    state = getattr(param, "quant_state", None)
    return state.tensors() if isinstance(state, PackedWeightState) else []
