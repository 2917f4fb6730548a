"""Rotary position embedding applied in place to q and k (GQA: different head counts).

Layout is ``(batch, seq, heads, head_dim)``, the natural view of a projection's output, and
``cos``/``sin`` are transformers' tables of shape ``(batch or 1, seq, head_dim)`` whose two halves
repeat (only the first half is read). The rotation is the "rotate_half" convention:
``out1 = x1*cos - x2*sin``, ``out2 = x2*cos + x1*sin``. Its backward is the inverse rotation,
done in place on the incoming gradients.
"""

from __future__ import annotations

import torch
from trainserve.kernels._triton_utils import HAS_TRITON, next_power_of_2, tl, triton, use_triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    return (x * cos.unsqueeze(2)) + (rotate_half(x) * sin.unsqueeze(2))


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place reference for ``(B, S, H, D)`` q/k and ``(B|1, S, D)`` cos/sin."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


if HAS_TRITON:

    @triton.jit
    def _rope_heads(
        X, x_base, stride_h, n_heads, c, s, offs_d, HALF, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        offs_h = tl.arange(0, BLOCK_H)
        for h0 in range(0, n_heads, BLOCK_H):
            hh = h0 + offs_h
            mask = (hh[:, None] < n_heads) & (offs_d[None, :] < HALF)
            ptr1 = X + x_base + hh[:, None] * stride_h + offs_d[None, :]
            x1 = tl.load(ptr1, mask=mask, other=0.0)
            x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0)
            x1f = x1.to(tl.float32)
            x2f = x2.to(tl.float32)
            o1 = x1f * c[None, :] - x2f * s[None, :]
            o2 = x2f * c[None, :] + x1f * s[None, :]
            tl.store(ptr1, o1.to(x1.dtype), mask=mask)
            tl.store(ptr1 + HALF, o2.to(x1.dtype), mask=mask)

    @triton.jit
    def _rope_kernel(
        Q, K, COS, SIN, seq_len, n_qh, n_kh, HALF,
        sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sc_b, sc_s,
        SIGN: tl.constexpr, HAS_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        tok = tl.program_id(0).to(tl.int64)
        b = tok // seq_len
        t = tok % seq_len
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HALF
        c = tl.load(COS + b * sc_b + t * sc_s + offs_d, mask=dmask, other=0.0).to(tl.float32)
        s = tl.load(SIN + b * sc_b + t * sc_s + offs_d, mask=dmask, other=0.0).to(tl.float32) * SIGN
        _rope_heads(Q, b * sq_b + t * sq_s, sq_h, n_qh, c, s, offs_d, HALF, BLOCK_H, BLOCK_D)
        if HAS_K:
            _rope_heads(K, b * sk_b + t * sk_s, sk_h, n_kh, c, s, offs_d, HALF, BLOCK_H, BLOCK_D)


def _check_layout(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"rope expects (batch, seq, heads, head_dim) tensors, got shape {tuple(x.shape)}")
    return x


def _tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def rope_inplace_triton(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False
) -> None:
    """Rotate q (and k, if given) in place; ``inverse`` rotates by -theta (the backward)."""
    _check_layout(q)
    if q.stride(-1) != 1 or (k is not None and k.stride(-1) != 1):
        raise ValueError("rope_inplace_triton needs a unit stride on head_dim")
    bsz, seq, n_qh, dim = q.shape
    kk = q if k is None else _check_layout(k)
    n_kh = kk.shape[2]
    half = dim // 2
    cos, sin = _tables(cos, sin)
    sc_b = cos.stride(0) if cos.shape[0] > 1 else 0
    block_d = next_power_of_2(half)
    block_h = max(1, min(next_power_of_2(max(n_qh, n_kh)), max(1, 4096 // block_d)))
    n_tok = bsz * seq
    if n_tok:
        _rope_kernel[(n_tok,)](
            q, kk, cos, sin, seq, n_qh, n_kh, half,
            q.stride(0), q.stride(1), q.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
            sc_b, cos.stride(1),
            SIGN=-1.0 if inverse else 1.0, HAS_K=k is not None, BLOCK_H=block_h, BLOCK_D=block_d,
            num_warps=4,
        )


def dense_unit_stride(t: torch.Tensor) -> bool:
    """A permutation of a dense block (no element aliased) with unit stride on the last dim."""
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        return False
    expected = 1
    for d in sorted(range(t.dim()), key=lambda d: t.stride(d)):
        if t.shape[d] == 1:
            continue
        if t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def rope_inplace_(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False
) -> None:
    """In-place rotation without autograd: Triton on CUDA, the reference copied back elsewhere."""
    tensors = [q] if k is None else [q, k]
    if use_triton(*tensors, cos, sin) and all(t.stride(-1) == 1 for t in tensors) and q.shape[-1] % 2 == 0:
        rope_inplace_triton(q, k, cos, sin, inverse)
        return
    s = -sin if inverse else sin
    for t in tensors:
        t.copy_(_rotate(t, cos, s))


class RopeInplaceFunction(torch.autograd.Function):
    """In-place rotary on one tensor (autograd allows one output when the input is a view);
    the backward rotates the gradient back, in place when it owns its memory."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        rope_inplace_(x, None, cos, sin)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, dx: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dx = dx if dense_unit_stride(dx) else dx.contiguous()
        rope_inplace_(dx, None, cos, sin, inverse=True)
        return dx, None, None


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding on ``(B, S, H, D)`` q/k. On CUDA q and k are modified in place (and
    returned); elsewhere new tensors come back from the reference."""
    if use_triton(q, k, cos, sin) and q.stride(-1) == 1 and k.stride(-1) == 1 and q.shape[-1] % 2 == 0:
        return RopeInplaceFunction.apply(q, cos, sin), RopeInplaceFunction.apply(k, cos, sin)
    return rope_reference(q, k, cos, sin)
