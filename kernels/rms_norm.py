"""RMSNorm with the exact Llama/Qwen2 semantics, as a Triton kernel and its torch reference.

``y = weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``; the result has the
dtype torch's promotion of ``weight`` and ``x`` gives, as in transformers' ``Qwen2RMSNorm``.
The backward treats the cast back to ``x.dtype`` as the identity (as autograd does).
"""

from __future__ import annotations

import torch
from trainserve.kernels._triton_utils import (
    HAS_TRITON,
    device_sm_count,
    next_power_of_2,
    num_warps_for,
    tl,
    triton,
    use_triton,
)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """transformers' RMSNorm, line for line."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(
        Y, X, W, RSTD, stride_y, stride_x, n_cols, eps, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(RSTD + row, rstd)
        xn = (xf * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (w * xn).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DX, DY, X, W, RSTD, DW_PART,
        stride_dx, stride_dy, stride_x, n_rows, n_cols, rows_per_prog,
        BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        row_start = pid * rows_per_prog
        for i in range(0, rows_per_prog):
            row = (row_start + i).to(tl.int64)
            if row < n_rows:
                x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
                xf = x.to(tl.float32)
                dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                xn = xf * rstd
                dxn = dy * w
                dot = tl.sum(dxn * xn, axis=0) / n_cols
                dx = rstd * (dxn - xn * dot)
                tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    dw_acc += dy * xn.to(x.dtype).to(tl.float32)
        if COMPUTE_DW:
            tl.store(DW_PART + pid * n_cols + cols, dw_acc, mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_forward_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: returns ``(y, rstd)`` with y shaped like x."""
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block = next_power_of_2(n_cols)
    if n_rows:
        _rms_norm_fwd_kernel[(n_rows,)](
            y, x2, weight, rstd, y.stride(0), x2.stride(0), n_cols, eps,
            BLOCK=block, num_warps=num_warps_for(block),
        )
    return y.view(x.shape), rstd


def rms_norm_backward_triton(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, compute_dw: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton backward: returns ``(dx, dw or None)``."""
    x2 = _as_rows(x)
    dy2 = _as_rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    n_prog = max(1, min(n_rows, device_sm_count(x.device) * 4))
    rows_per_prog = triton.cdiv(n_rows, n_prog) if n_rows else 0
    dw_part = torch.empty((n_prog, n_cols) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    block = next_power_of_2(n_cols)
    if n_rows:
        _rms_norm_bwd_kernel[(n_prog,)](
            dx, dy2, x2, weight, rstd, dw_part,
            dx.stride(0), dy2.stride(0), x2.stride(0), n_rows, n_cols, rows_per_prog,
            BLOCK=block, COMPUTE_DW=compute_dw, num_warps=num_warps_for(block),
        )
    dw = None
    if compute_dw:
        dw = (dw_part.sum(0) if n_rows else torch.zeros(n_cols, device=x.device)).to(weight.dtype)
    return dx.view(x.shape), dw


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper around the Triton kernels (saves x and the per-row 1/rms)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = rms_norm_forward_triton(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward_triton(dy, x, weight, rstd, ctx.needs_input_grad[1])
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: Triton on CUDA, the torch reference elsewhere."""
    if use_triton(x, weight) and x.shape[-1] <= 65536:
        if not torch.is_grad_enabled():
            return rms_norm_forward_triton(x, weight, eps)[0]
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
