"""FP8 base weights (``load_in_fp8``): views of vLLM's online-FP8 layers.

vLLM 0.26's online FP8 methods store ``weight`` as FP8 — transposed ``(K, N)`` with per-tensor or
per-channel ``weight_scale`` (``fp8_per_tensor`` / ``fp8_per_channel``), or ``(N, K)`` with 128×128
block scales in ``weight_scale_inv`` (``fp8_per_block``). Which one a layer holds is read from
its tensors here and checked against the shapes the model expects; a layout this module does
not know is an error at load, never a silent misreading. q/k/v and gate/up shards are row ranges.
"""

from __future__ import annotations

import torch
from torch import nn

from trainserve.kernels.fp8_dequant import FP8_DTYPES, FP8QuantState
from trainserve.weights.dense import WeightLayoutError, plain
from trainserve.weights.packed_linear import PackedLinear, no_engine_statistics, packed_statistics

MODEL_FLAGS: dict[str, bool] = {}


def matches(linear: nn.Module) -> bool:
    weight = getattr(linear, "weight", None)
    return weight is not None and weight.dtype in FP8_DTYPES


def _weight_nk(linear: nn.Module, n: int) -> torch.Tensor:
    w = plain(linear.weight)
    k = int(getattr(linear, "input_size_per_partition", w.shape[1] if w.shape[0] == n else w.shape[0]))
    w_nk = w.t() if w.dim() == 2 and w.stride(0) == 1 and w.stride(1) != 1 else w
    if tuple(w_nk.shape) != (n, k):
        raise WeightLayoutError(f"FP8 engine weight {tuple(w.shape)} (strides {w.stride()}) is not the "
                                f"({n}, {k}) weight or its transpose")
    return w_nk


def _scale(linear: nn.Module, n: int, k: int) -> tuple[torch.Tensor, str, int]:
    inv = getattr(linear, "weight_scale_inv", None)
    if inv is not None:
        block = int((getattr(linear, "weight_block_size", None) or [128, 128])[0])
        if tuple(inv.shape) != (-(-n // block), -(-k // block)):
            raise WeightLayoutError(f"FP8 block scales {tuple(inv.shape)} do not match ({n}, {k}) / {block}")
        return plain(inv), "block", block
    scale = getattr(linear, "weight_scale", None)
    if scale is None:
        raise WeightLayoutError("FP8 engine layer has neither weight_scale nor weight_scale_inv")
    scale = plain(scale)
    if scale.numel() == 1:
        return scale, "tensor", 0
    if scale.numel() == n:
        return scale, "channel", 0
    raise WeightLayoutError(f"FP8 weight_scale of shape {tuple(scale.shape)} fits neither per-tensor nor per-channel")


def shard_modules(engine_linear: nn.Module, sizes: list[int], compute_dtype: torch.dtype) -> list[nn.Module]:
    """One :class:`PackedLinear` per output range ``sizes`` of ``engine_linear``."""
    n = sum(sizes)
    w_nk = _weight_nk(engine_linear, n)
    scale, kind, block = _scale(engine_linear, n, w_nk.shape[1])
    modules, n0 = [], 0
    for size in sizes:
        state = FP8QuantState(w_nk, scale, kind, n0, n0 + size, compute_dtype, block or 128)
        modules.append(PackedLinear(state, state.w))
        n0 += size
    return modules


engine_statistics = no_engine_statistics
trainer_statistics = packed_statistics
