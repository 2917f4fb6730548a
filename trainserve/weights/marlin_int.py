"""trainserve's integer formats (``load_in_4bit``, ``load_in_8bit``): views of the engine's packed layers.

The engine's layers quantised by :mod:`trainserve.engine.quant_method` hold ``qweight``,
``scales`` and ``qzeros`` for the whole fused layer, in Marlin's layout or (4-bit on Hopper)
Machete's; each projection of the trainer is a column range of them
(:func:`trainserve.kernels.marlin_layout.column_slice`, or a block offset into the Machete
tensors), so q/k/v and gate/up keep one copy and a fused group still dequantises in one launch.
"""

from __future__ import annotations

import torch
from torch import nn

from trainserve.engine.quant_method import layer_format, layer_tensors
from trainserve.kernels.machete_dequant import MacheteQuantState, MacheteTensors
from trainserve.kernels.marlin_dequant import MarlinQuantState
from trainserve.weights.packed_linear import PackedLinear, no_engine_statistics, packed_statistics

MODEL_FLAGS: dict[str, bool] = {}


def matches(linear: nn.Module) -> bool:
    """True for an engine layer quantised by trainserve's integer method."""
    return layer_format(linear) is not None


def shard_modules(engine_linear: nn.Module, sizes: list[int], compute_dtype: torch.dtype) -> list[nn.Module]:
    """One :class:`PackedLinear` per output range ``sizes`` of ``engine_linear``."""
    fmt = layer_format(engine_linear)
    parent = layer_tensors(engine_linear)
    n_total, k = engine_linear.trainserve_shape
    if sum(sizes) != n_total:
        raise RuntimeError(f"engine layer has {n_total} outputs, the model expects {sizes}")
    modules, n0 = [], 0
    for size in sizes:
        if isinstance(parent, MacheteTensors):
            state = MacheteQuantState(parent, n0, n0 + size, engine_linear.scales.dtype)
            modules.append(PackedLinear(state, state.storage()))
        else:
            state = MarlinQuantState(parent, fmt, n0, n0 + size, k, engine_linear.scales.dtype)
            modules.append(PackedLinear(state, state.view.qweight))
        n0 += size
    return modules


engine_statistics = no_engine_statistics
trainer_statistics = packed_statistics
