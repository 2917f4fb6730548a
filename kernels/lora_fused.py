"""Fused LoRA projections with hand-written backward: ``Y = X W^T + b + s (X A^T) B^T``.

Several projections of one input run as one: q/k/v (and gate/up) use one GEMM over the
concatenated frozen weights (:func:`~trainserve.kernels.lora_params.fused_weight`) and one pair of
skinny GEMMs for all their LoRA terms (``A`` stacked, ``B`` block-diagonal). NF4 weights are
dequantised right before each GEMM and dropped right after, in the forward and again in the
backward; nothing weight-sized is saved. The projections save their input and the small
``X A^T``; the MLP also saves the fused gate|up activation (or recomputes it) and recomputes
``silu(gate) * up`` in its backward, where the SwiGLU kernel writes ``d gate | d up`` over that same
buffer. The MLP's LoRA terms on gate|up and on the down projection's input gradient are added
inside the SwiGLU kernels (:mod:`.swiglu_lora`), not by GEMMs that rewrite activation-sized buffers.

Launch count matters as much as FLOPs at these sizes (a decoder layer is ~1 ms of GPU work), so
every step here is one GEMM or one kernel over the whole group.
"""

from __future__ import annotations

import torch
from trainserve.kernels.lora_params import (
    LoraWeights,
    dense_weight,
    engine_grad_matmul,
    engine_matmul,
    engine_matmul_free,
    fused_bias,
    fused_weight,
    get_lora_parameters,
    lora_linear_reference,
    lora_mlp_reference,
)
from trainserve.kernels.rope import rope_inplace_
from trainserve.kernels.swiglu_lora import swiglu_lora_backward, swiglu_lora_forward

__all__ = [
    "LoraWeights", "get_lora_parameters", "lora_projections", "lora_linear", "lora_mlp",
    "lora_linear_reference", "lora_mlp_reference", "dense_weight",
]


class _Group:
    """The LoRA terms of a group of projections: ``A`` stacked ``(R, in)`` and ``B``
    block-diagonal ``(N, R)`` with each block pre-multiplied by its scaling."""

    def __init__(self, ps: list[LoraWeights], dtype: torch.dtype) -> None:
        self.ps = ps
        have = [p for p in ps if p.lora_a is not None]
        self.active = bool(have)
        #: each projection's block of columns in ``a``/``b`` (0 without LoRA), in order
        self.ranks = tuple(p.rank if p.lora_a is not None else 0 for p in ps)
        if not self.active:
            return
        a_list = [p.lora_a for p in have]
        self.a = (a_list[0] if len(a_list) == 1 else torch.cat(a_list)).to(dtype)
        bdt, dev = have[0].lora_b.dtype, have[0].lora_b.device
        blocks = [p.lora_b if p.lora_a is not None else torch.zeros(p.out_features, 0, dtype=bdt, device=dev)
                  for p in ps]
        scales = {p.scaling for p in have}
        if len(scales) == 1:
            b = (blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)).to(dtype)
            s = scales.pop()
            self.b = b if s == 1.0 else b * s  # never in place: b may be the parameter itself
        else:
            self.b = torch.block_diag(*[blk.to(dtype) * p.scaling for blk, p in zip(blocks, ps, strict=True)])

    def grads(self, dxa: torch.Tensor, x2: torch.Tensor, dout: torch.Tensor, xa: torch.Tensor,
              need: list[bool]) -> list[torch.Tensor | None]:
        """``[dA_0, dB_0, dA_1, ...]`` from ``dxa = dout @ B`` (scaled) and the saved ``xa``."""
        out: list[torch.Tensor | None] = []
        da_all = (dxa.t() @ x2) if any(need[0::2]) else None
        db_all = (dout.t() @ xa) if any(need[1::2]) else None
        row = col = 0
        for i, p in enumerate(self.ps):
            n, r = p.out_features, p.rank
            if p.lora_a is None:
                out += [None, None]
                row += n
                continue
            da = db = None
            if need[2 * i]:
                da = da_all[col : col + r]
                if da.dtype != p.lora_a.dtype:
                    da = da.to(p.lora_a.dtype)
            if need[2 * i + 1]:
                db = db_all[row : row + n, col : col + r]
                if p.scaling != 1.0:
                    db = db * p.scaling
                if db.dtype != p.lora_b.dtype:
                    db = db.to(p.lora_b.dtype)
            out += [da, db]
            row += n
            col += r
        return out


def _linear_group(
    x2: torch.Tensor, ps: list[LoraWeights], w: torch.Tensor | None = None, group: _Group | None = None,
    xa: torch.Tensor | None = None, add_lora: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, _Group]:
    """``x2 @ W^T + b + (x2 A^T) B^T`` for the group; ``w``/``group``/``xa`` reuse earlier work.
    ``add_lora=False`` leaves the LoRA term out of the output (the caller's kernel adds it) but
    still computes ``x2 A^T``."""
    dt = x2.dtype
    bias = fused_bias(ps, dt)
    out = engine_matmul(x2, ps)  # FP8: the engine's input rounding, not a plain dense GEMM
    if out is not None:
        if bias is not None:
            out.add_(bias)
    else:
        if w is None:
            w = fused_weight(ps, dt)
        out = x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())
        del w
    if group is None:
        group = _Group(ps, dt)
    if group.active:
        if xa is None:
            xa = x2 @ group.a.t()
        if add_lora:
            out.addmm_(xa, group.b.t())
    return out, xa, group


def _linear_group_backward(
    dout: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor | None, group: _Group, need_x: bool,
    need_ab: list[bool], w: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    dx = None
    dxa = dout @ group.b if group.active and (need_x or any(need_ab[0::2])) else None
    if need_x:
        dx = engine_grad_matmul(dout, group.ps)
        if dx is None:
            if w is None:
                w = fused_weight(group.ps, dout.dtype)
            dx = dout @ w
            del w
        if dxa is not None:
            dx.addmm_(dxa, group.a)
    grads = group.grads(dxa, x2, dout, xa, need_ab) if group.active else [None] * len(need_ab)
    return dx, grads


def _projections_forward(
    x2: torch.Tensor, ps: list[LoraWeights], rope: tuple | None
) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor | None, _Group, list[int]]:
    out, xa, group = _linear_group(x2, ps)
    widths = [p.out_features for p in ps]
    if rope is not None:
        cos, sin, bsz, seq, dim = rope
        rope_inplace_(_heads(out, 0, widths[0], bsz, seq, dim),
                      _heads(out, widths[0], widths[1], bsz, seq, dim), cos, sin)
    if len(ps) == 1:
        return out, xa, group, widths
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return tuple(out[:, s : s + w] for s, w in zip(starts, widths, strict=True)), xa, group, widths


class LoraProjectionsFunction(torch.autograd.Function):
    """Projections of one 2-D input as one GEMM; outputs are column blocks of one buffer.

    With ``rope = (cos, sin, batch, seq, head_dim)`` outputs 0 and 1 (q and k) are rotated in
    place before they are returned, and rotated back in the gradient buffer in the backward.
    """

    @staticmethod
    def forward(
        ctx, x2: torch.Tensor, ps: list[LoraWeights], rope: tuple | None, *lora_ab: torch.Tensor | None
    ):
        outs, xa, group, widths = _projections_forward(x2, ps, rope)
        ctx.group, ctx.rope, ctx.widths = group, rope, widths
        ctx.save_for_backward(x2, xa)
        return outs

    @staticmethod
    def backward(ctx, *douts: torch.Tensor | None):
        x2, xa = ctx.saved_tensors
        widths = ctx.widths
        if len(douts) == 1:
            dout = douts[0].contiguous()
        else:
            parts = [d if d is not None else torch.zeros(x2.shape[0], w, dtype=x2.dtype, device=x2.device)
                     for d, w in zip(douts, widths, strict=True)]
            dout = torch.cat(parts, dim=1)  # a fresh buffer: rotating in place below is safe
        if ctx.rope is not None:
            cos, sin, bsz, seq, dim = ctx.rope
            rope_inplace_(_heads(dout, 0, widths[0], bsz, seq, dim),
                          _heads(dout, widths[0], widths[1], bsz, seq, dim), cos, sin, inverse=True)
        need_ab = list(ctx.needs_input_grad[3:])
        dx, grads = _linear_group_backward(dout, x2, xa, ctx.group, ctx.needs_input_grad[0], need_ab)
        return (dx, None, None, *grads)


def _heads(buf: torch.Tensor, start: int, width: int, bsz: int, seq: int, dim: int) -> torch.Tensor:
    return buf[:, start : start + width].view(bsz, seq, width // dim, dim)


def _lora_tensors(ps: list[LoraWeights]) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    for p in ps:
        out += [p.lora_a, p.lora_b]
    return out


def lora_projections(
    x: torch.Tensor, ps: list[LoraWeights], rope: tuple[torch.Tensor, torch.Tensor, int] | None = None
) -> tuple[torch.Tensor, ...]:
    """Apply each projection in ``ps`` to ``x`` (``(..., in)``); one tensor per projection.

    ``rope = (cos, sin, head_dim)`` (x must be ``(B, S, in)``) rotates outputs 0 and 1 (q, k)
    inside the same autograd node, in place. The outputs are column blocks of one buffer (views):
    read them, do not modify them in place.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    cd = ps[0].compute_dtype
    if cd is not None and x2.dtype != cd:
        x2 = x2.to(cd)
    rope_args = None
    if rope is not None:
        if x.dim() != 3 or len(ps) < 2:
            raise ValueError("rope needs a (batch, seq, hidden) input and q, k projections")
        rope_args = (rope[0], rope[1], x.shape[0], x.shape[1], rope[2])
    if torch.is_grad_enabled():
        outs = LoraProjectionsFunction.apply(x2, ps, rope_args, *_lora_tensors(ps))
    else:  # no graph to record (e.g. the no-grad pass of checkpointing): skip the Function
        outs = _projections_forward(x2, ps, rope_args)[0]
    if len(ps) == 1:
        outs = (outs,)
    return tuple(o.view(*lead, o.shape[-1]) for o in outs)


def lora_linear(x: torch.Tensor, p: LoraWeights) -> torch.Tensor:
    """One fused LoRA projection."""
    return lora_projections(x, [p])[0]


class LoraMLPFunction(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))`` with LoRA on the three; gate|up is one GEMM.

    ``recompute=False`` saves the gate|up activation (``(M, 2 I)``, the largest tensor of a
    decoder layer); ``recompute=True`` saves only the input and redoes the gate|up GEMM in the
    backward, reusing there the one dequantised gate|up weight for both GEMMs that need it.
    """

    @staticmethod
    def forward(ctx, x2: torch.Tensor, ps: list[LoraWeights], recompute: bool, *lora_ab: torch.Tensor | None):
        out, gu, xa_gu, xa_d, g_gu, g_d = _mlp_forward(x2, ps)
        ctx.groups = (g_gu, g_d)
        ctx.recompute = recompute
        if recompute:
            del gu
            ctx.save_for_backward(x2, xa_gu, xa_d)
        else:
            ctx.save_for_backward(x2, xa_gu, xa_d, gu)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, xa_gu, xa_d, *rest = ctx.saved_tensors
        g_gu, g_d = ctx.groups
        nig = ctx.needs_input_grad
        need_x, need_gu, need_d = nig[0], list(nig[3:7]), list(nig[7:9])
        inter = g_gu.ps[0].out_features
        dy = dy.contiguous()
        w_gu = None
        if ctx.recompute:  # one dequantised gate|up weight for both GEMMs (not for FP8: see engine_matmul)
            w_gu = fused_weight(g_gu.ps, x2.dtype) if engine_matmul_free(g_gu.ps) else None
            gu, _, _ = _linear_group(x2, g_gu.ps, w=w_gu, group=g_gu, xa=xa_gu, add_lora=False)
        else:
            gu = rest[0]
        dxa_d = dy @ g_d.b if g_d.active else None
        dh = engine_grad_matmul(dy, g_d.ps)
        if dh is None:
            dh = dy @ dense_weight(g_d.ps[0], dy.dtype)
        # dh's and gate|up's LoRA terms, h (for dA_down), d gate and d up in one pass; on the GPU
        # d gate | d up land in gu's own buffer.
        xa, b, ranks = _lora_operands(xa_gu, g_gu)
        h, dgu = swiglu_lora_backward(dh, gu, inter, xa, b, dxa_d, g_d.a if g_d.active else None,
                                      write_h=need_d[0] and g_d.active, ranks=ranks)
        grads_d = g_d.grads(dxa_d, h, dy, xa_d, need_d) if g_d.active else [None, None]
        del h, dh
        dx, grads_gu = None, [None] * 4
        if need_x or any(need_gu):
            dx, grads_gu = _linear_group_backward(dgu, x2, xa_gu, g_gu, need_x, need_gu, w=w_gu)
        return (dx, None, None, *grads_gu, *grads_d)


def _mlp_forward(x2: torch.Tensor, ps: list[LoraWeights]) -> tuple:
    """gate|up keeps its base product only (what is saved or recomputed); the SwiGLU kernel adds
    the gate|up LoRA term as it reads it (:mod:`.swiglu_lora`)."""
    pg, pu, pd = ps
    gu, xa_gu, g_gu = _linear_group(x2, [pg, pu], add_lora=False)
    xa, b, ranks = _lora_operands(xa_gu, g_gu)
    h = swiglu_lora_forward(gu, pg.out_features, xa, b, ranks=ranks)
    out, xa_d, g_d = _linear_group(h, [pd])
    return out, gu, xa_gu, xa_d, g_gu, g_d


def _lora_operands(xa: torch.Tensor | None, group: _Group) -> tuple:
    """``(x A^T, scaled block-diagonal B, (r_gate, r_up))`` of an active gate|up group, Nones otherwise."""
    return (xa, group.b, group.ranks) if group.active else (None, None, None)


def lora_mlp(
    x: torch.Tensor, gate: LoraWeights, up: LoraWeights, down: LoraWeights, recompute: bool = False
) -> torch.Tensor:
    """Fused SwiGLU MLP with LoRA on gate, up and down (``recompute``: see LoraMLPFunction)."""
    ps = [gate, up, down]
    x2 = x.reshape(-1, x.shape[-1])
    cd = gate.compute_dtype
    if cd is not None and x2.dtype != cd:
        x2 = x2.to(cd)
    if torch.is_grad_enabled():
        out = LoraMLPFunction.apply(x2, ps, recompute, *_lora_tensors(ps))
    else:
        out = _mlp_forward(x2, ps)[0]
    return out.view(*x.shape[:-1], out.shape[-1])
