"""SwiGLU ``h = silu(gate) * up`` with a fused backward.

The backward kernel reads ``dh, gate, up`` once and writes ``dgate, dup`` and, when asked, ``h``
itself (recomputed, so the MLP never stores it). With ``inplace=True`` it writes ``h`` over
``dh``, ``dgate`` over ``gate`` and ``dup`` over ``up``: each element is read before it is
written by the same program, so that is safe and saves three activation-sized buffers.
"""

from __future__ import annotations

import torch
from trainserve.kernels._triton_utils import HAS_TRITON, tl, triton, use_triton


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in the inputs' dtype (transformers' MLP does exactly this)."""
    return torch.nn.functional.silu(gate) * up


def swiglu_backward_reference(
    dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(h, dgate, dup)`` computed in (at least) fp32, cast back to the input dtype."""
    ct = torch.promote_types(gate.dtype, torch.float32)
    g = gate.to(ct)
    u = up.to(ct)
    d = dh.to(ct)
    sig = torch.sigmoid(g)
    silu = g * sig
    h = (silu.to(gate.dtype).to(ct) * u).to(gate.dtype)
    dup = (d * silu).to(up.dtype)
    dgate = (d * u * sig * (1.0 + g * (1.0 - sig))).to(gate.dtype)
    return h, dgate, dup


_BLOCK = 1024

if HAS_TRITON:

    @triton.jit
    def _swiglu_fwd_kernel(H, G, U, sh, sg, su, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * su + cols, mask=mask, other=0.0)
        # silu is rounded to the activation dtype before the product, as torch does.
        silu = (g * tl.sigmoid(g)).to(u.dtype)
        tl.store(H + row * sh + cols, (silu * u).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        DH, G, U, H_OUT, DG_OUT, DU_OUT, s_dh, s_g, s_u, s_h, s_dg, s_du, n_cols,
        WRITE_H: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        d = tl.load(DH + row * s_dh + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * s_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * s_u + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        if WRITE_H:
            h = silu.to(H_OUT.dtype.element_ty).to(tl.float32) * u
            tl.store(H_OUT + row * s_h + cols, h.to(H_OUT.dtype.element_ty), mask=mask)
        tl.store(DU_OUT + row * s_du + cols, (d * silu).to(DU_OUT.dtype.element_ty), mask=mask)
        dg = d * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(DG_OUT + row * s_dg + cols, dg.to(DG_OUT.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a (rows, cols) view with unit column stride, or None if that needs a copy."""
    if t.dim() == 2:
        r = t
    else:
        try:
            r = t.view(-1, t.shape[-1])
        except RuntimeError:
            return None
    return r if (r.stride(-1) == 1 or r.shape[-1] == 1) else None


def _rows_or_copy(t: torch.Tensor) -> torch.Tensor:
    r = _rows(t)
    return r if r is not None else t.reshape(-1, t.shape[-1]).contiguous()


def swiglu_forward_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton forward; gate/up may be row-strided views (e.g. the halves of one fused buffer).
    Returns a contiguous ``(rows, cols)`` tensor."""
    g2, u2 = _rows_or_copy(gate), _rows_or_copy(up)
    rows, cols = g2.shape
    h = torch.empty((rows, cols), dtype=gate.dtype, device=gate.device)
    if h.numel():
        _swiglu_fwd_kernel[(rows, triton.cdiv(cols, _BLOCK))](
            h, g2, u2, h.stride(0), g2.stride(0), u2.stride(0), cols, BLOCK=_BLOCK, num_warps=4
        )
    return h


def swiglu_backward(
    dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, write_h: bool = True, inplace: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(h or None, dgate, dup)`` as (rows, cols) tensors. ``inplace`` writes h over dh, dgate
    over gate and dup over up (row-strided views allowed); otherwise new tensors come back."""
    if not use_triton(dh, gate, up):
        h, dg, du = swiglu_backward_reference(dh, gate, up)
        flat = [None if t is None else t.reshape(-1, t.shape[-1]) for t in (h, dg, du)]
        return (flat[0] if write_h else None), flat[1], flat[2]
    d2, g2, u2 = _rows(dh), _rows(gate), _rows(up)
    if not (inplace and d2 is not None and g2 is not None and u2 is not None):
        d2, g2, u2 = _rows_or_copy(dh), _rows_or_copy(gate), _rows_or_copy(up)
        h_out = torch.empty_like(g2, memory_format=torch.contiguous_format) if write_h else g2
        dg_out = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
        du_out = torch.empty(u2.shape, dtype=u2.dtype, device=u2.device)
    else:
        h_out, dg_out, du_out = d2, g2, u2
    rows, cols = g2.shape
    if g2.numel():
        _swiglu_bwd_kernel[(rows, triton.cdiv(cols, _BLOCK))](
            d2, g2, u2, h_out, dg_out, du_out, d2.stride(0), g2.stride(0), u2.stride(0),
            h_out.stride(0), dg_out.stride(0), du_out.stride(0), cols,
            WRITE_H=write_h, BLOCK=_BLOCK, num_warps=4,
        )
    return (h_out if write_h else None), dg_out, du_out


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves gate and up, recomputes nothing else."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu_forward_triton(gate, up).view(gate.shape)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        _, dg, du = swiglu_backward(dh, gate, up, write_h=False)
        return dg.view(gate.shape), du.view(up.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: Triton on CUDA, the torch reference elsewhere."""
    if use_triton(gate, up) and gate.shape == up.shape and gate.dtype == up.dtype:
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
