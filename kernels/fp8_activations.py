"""The engine's FP8 activation rounding, reproduced in the trainer.

vLLM's online FP8 linear methods are W8A8: besides the FP8 weight, every GEMM quantises its
*input* to FP8 e4m3 on the fly — one scale per token for per-channel weights (``fp8_per_channel``,
llm-compressor's FP8_DYNAMIC scheme), one per group of 128 values of a token for 128×128 block
weights (``fp8_per_block``), one per tensor for per-tensor weights. A trainer that multiplies bf16
activations by the dequantised weight therefore trains a slightly different function from the one
the engine samples with; through 28 layers that difference reached 0.03 nats per token on a
random-weight 0.5B model. The trainer's forward rounds its activations exactly as the engine does
(same scale rule, same round-to-nearest-even into e4m3, same saturation), so what is trained is
what is served. The backward is straight-through: the gradient flows to the unrounded input as if
the rounding were the identity, which is what FP8 training recipes do.

:func:`quantize_activations` is the rounding itself (torch, any device), :func:`fp8_rowwise_matmul`
the fast per-token × per-channel GEMM on GPUs whose ``torch._scaled_mm`` supports row-wise scales
(Hopper and newer), :func:`fp8_rowwise_matmul_reference` its reference.
"""

from __future__ import annotations

import functools

import torch
from trainserve.kernels._triton_utils import HAS_TRITON, next_power_of_2, num_warps_for, tl, triton, use_triton

ACTIVATION_KINDS = ("token", "group", "tensor")
E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
TOKEN_MIN_SCALE = 1.0 / (E4M3_MAX * 512.0)  # vLLM's per-token kernel: scale >= 1 / (448 * 512)
GROUP_EPS = 1e-10  # vLLM's per-token-group quantiser: amax >= 1e-10
GROUP = 128
MAX_TRITON_ROW = 32768  # one program holds a whole row (token kind) in registers; longer rows use torch


def quantize_activations(x2: torch.Tensor, kind: str, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, scale)`` for a 2-D input as vLLM's dynamic quantisers compute them.

    ``kind``: ``"token"`` — scale ``(M, 1)``; ``"group"`` — scale ``(M, K // group)``;
    ``"tensor"`` — scale ``(1, 1)``. Scales are fp32; ``x ≈ x_fp8 * scale`` (per group).
    One Triton pass over the input on CUDA (token and group), the torch reference otherwise.
    """
    if kind not in ACTIVATION_KINDS:
        raise ValueError(f"unknown activation quantisation {kind!r}; expected one of {ACTIVATION_KINDS}")
    width = group if kind == "group" else x2.shape[-1]
    if kind != "tensor" and x2.dim() == 2 and x2.stride(1) == 1 and width <= MAX_TRITON_ROW and use_triton(x2):
        return _quantize_triton(x2, kind, group)
    return quantize_activations_reference(x2, kind, group)


def quantize_activations_reference(x2: torch.Tensor, kind: str,
                                   group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`quantize_activations`."""
    if kind not in ACTIVATION_KINDS:
        raise ValueError(f"unknown activation quantisation {kind!r}; expected one of {ACTIVATION_KINDS}")
    xf = x2.float()
    if kind == "group":
        m, k = xf.shape
        if k % group:
            raise ValueError(f"per-group FP8 activations need K % {group} == 0, got K={k}")
        tiles = xf.view(m, k // group, group)
        scale = tiles.abs().amax(-1).clamp_min(GROUP_EPS) / E4M3_MAX
        q = (tiles / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).view(m, k)
        return q.to(E4M3), scale
    amax = xf.abs().amax(-1, keepdim=True) if kind == "token" else xf.abs().amax().reshape(1, 1)
    scale = (amax / E4M3_MAX).clamp_min(TOKEN_MIN_SCALE)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


if HAS_TRITON:

    @triton.jit
    def _quantize_kernel(X, Q, S, sx, sq, n_cols, group, n_groups, amax_floor, scale_floor, fmax,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        cols = g * group + offs
        mask = (offs < group) & (cols < n_cols)
        x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), amax_floor)
        scale = tl.maximum(amax / fmax, scale_floor)
        q = tl.clamp(tl.math.div_rn(x, scale), -fmax, fmax)  # IEEE division, as the reference
        tl.store(Q + row * sq + cols, q.to(Q.dtype.element_ty), mask=mask)
        tl.store(S + row * n_groups + g, scale)


def _quantize_triton(x2: torch.Tensor, kind: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x2.shape
    if kind == "group":
        if k % group:
            raise ValueError(f"per-group FP8 activations need K % {group} == 0, got K={k}")
        width, amax_floor, scale_floor = group, GROUP_EPS, 0.0
    else:
        width, amax_floor, scale_floor = k, 0.0, TOKEN_MIN_SCALE
    n_groups = k // width
    q = torch.empty((m, k), dtype=E4M3, device=x2.device)
    scale = torch.empty((m, n_groups), dtype=torch.float32, device=x2.device)
    if m:
        block = next_power_of_2(width)
        _quantize_kernel[(m, n_groups)](x2, q, scale, x2.stride(0), q.stride(0), k, width, n_groups,
                                        amax_floor, scale_floor, E4M3_MAX, BLOCK=block,
                                        num_warps=num_warps_for(block))
    return q, scale


def round_activations(x2: torch.Tensor, kind: str, group: int = GROUP) -> torch.Tensor:
    """``x2`` after the engine's FP8 rounding, back in ``x2``'s dtype (the value the engine multiplies)."""
    q, scale = quantize_activations(x2, kind, group)
    if kind == "group":
        m, k = x2.shape
        return (q.float().view(m, k // group, group) * scale[..., None]).view(m, k).to(x2.dtype)
    return (q.float() * scale).to(x2.dtype)


def rowwise_supported(x2: torch.Tensor, w_nk: torch.Tensor) -> bool:
    """Whether :func:`fp8_rowwise_matmul` can use ``torch._scaled_mm`` here: CUDA, compute
    capability 9.0 or newer (row-wise scaled FP8 GEMMs), e4m3 weights, dims multiples of 16."""
    if not (x2.is_cuda and w_nk.is_cuda and w_nk.dtype == E4M3 and hasattr(torch, "_scaled_mm")):
        return False
    if not _rowwise_capable(x2.device.index if x2.device.index is not None else torch.cuda.current_device()):
        return False
    n, k = w_nk.shape
    return k % 16 == 0 and n % 16 == 0 and w_nk.stride(1) == 1


@functools.cache
def _rowwise_capable(device_index: int) -> bool:
    """Compute capability 9.0 or newer (read once per device: this is asked on every GEMM)."""
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def fp8_rowwise_matmul(x2: torch.Tensor, w_nk: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``round(x2) @ (w_nk * w_scale).T`` in ``x2``'s dtype, with ``x2`` rounded per token.

    ``w_nk``: FP8 ``(N, K)`` (row-major: its transpose is the column-major operand the FP8 GEMM
    wants, no copy); ``w_scale``: fp32, one per output row. One FP8 GEMM with row-wise scales, as
    the engine's CUTLASS kernel computes it, where :func:`rowwise_supported`; else the reference.
    """
    if not rowwise_supported(x2, w_nk):
        return fp8_rowwise_matmul_reference(x2, w_nk, w_scale)
    q, scale = quantize_activations(x2, "token")
    return torch._scaled_mm(q, w_nk.t(), scale_a=scale, scale_b=w_scale.float().reshape(1, -1).contiguous(),
                            out_dtype=x2.dtype)


def fp8_rowwise_matmul_reference(x2: torch.Tensor, w_nk: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The same product from dequantised operands: integer-exact FP8 values times fp32 scales."""
    q, scale = quantize_activations(x2, "token")
    acc = q.to(x2.dtype) @ w_nk.to(x2.dtype).t()  # FP8 values are exact in bf16/fp16/fp32
    return (acc.float() * scale * w_scale.float().reshape(1, -1)).to(x2.dtype)
