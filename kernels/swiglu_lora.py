"""SwiGLU over a base gate|up product, with the LoRA terms added inside the kernel.

Why this exists: in the fused LoRA MLP (:mod:`.lora_fused`) the rank-``r`` updates
``gu += (x A_gu^T) B_gu^T`` (``M × 2I``) and, in the backward, ``dh += (dy B_d) A_d`` (``M × I``)
were cuBLAS ``addmm_`` calls of their own. A product with ``K = r`` costs nothing to compute; what
costs is reading and writing an activation-sized buffer once more. On the 7B GRPO step (ninth H200
series, ``--profile-step 3``) those calls were 103 ms of 1,358 ms of GPU work. The SwiGLU kernels
read exactly those buffers anyway, so here each program computes its ``BM × BN`` tile of the
rank-``r`` term (one ``tl.dot`` with ``K = r``: the small ``x A^T`` rows and ``B`` columns stay in
cache) and adds it after loading.

Numerics: the base value and the fp32 rank-``r`` term are summed in fp32 and rounded once to the
activation dtype before use, as ``addmm_`` into a bf16 buffer would store them. Measured on the
H200 at the 7B shape (``scripts/bench_swiglu_lora.py``): ``h`` is 0.355% from a float64
computation, the ``addmm_`` path 0.362%, the two 0.23% apart (cuBLAS's bf16 ``addmm_`` appears to
round once more). The gate|up buffer keeps the *base* product; the forward and the backward both
add the LoRA term on the fly, so saved or recomputed buffers mean the same thing.

Ranks up to :data:`MAX_FUSED_RANK` per projection run fused; larger ones take the unfused path
(``addmm_`` + :mod:`.swiglu`), and CPU tensors the torch reference, which is that computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trainserve.kernels._triton_utils import HAS_TRITON, next_power_of_2, tl, triton, use_triton
from trainserve.kernels.swiglu import swiglu_backward, swiglu_backward_reference, swiglu_reference

MAX_FUSED_RANK = 128  # per projection: x A^T and B tiles held per program; above this the unfused path runs


def _with_lora(base: torch.Tensor, xa: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    return base if xa is None else torch.addmm(base, xa, b.t())


def swiglu_lora_forward_reference(gu: torch.Tensor, inter: int, xa: torch.Tensor | None,
                                  b: torch.Tensor | None) -> torch.Tensor:
    """``silu(g) * u`` with ``[g | u] = gu + xa @ b^T`` (``gu``: ``(M, 2 inter)``; ``b``: ``(2 inter, R)``)."""
    full = _with_lora(gu, xa, b)
    return swiglu_reference(full[:, :inter], full[:, inter:])


def swiglu_lora_backward_reference(
    dh: torch.Tensor, gu: torch.Tensor, inter: int, xa: torch.Tensor | None, b: torch.Tensor | None,
    dxa_d: torch.Tensor | None, a_d: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, dgate, dup)`` for ``dh + dxa_d @ a_d`` and the LoRA-completed gate|up (new tensors)."""
    full = _with_lora(gu, xa, b)
    d = _with_lora(dh, dxa_d, None if a_d is None else a_d.t())
    return swiglu_backward_reference(d, full[:, :inter], full[:, inter:])


@dataclass(frozen=True)
class LaunchConfig:
    """Tile of one program (``bm`` rows × ``bn`` columns) and its warps."""

    bm: int = 16
    bn: int = 128
    warps: int = 4


#: The fastest of 16 configurations on an H200 at the 7B MLP (6,176 rows, 18,944 columns, rank 16 per
#: projection): 0.234 ms forward, 0.540 ms backward, against 0.632 and 1.035 ms for ``addmm_`` plus
#: the plain SwiGLU kernels (``benchmarks/results/swiglu_lora_sweep_h200_7b_2026-12-01.json``).
#: A variant that formed the rank-r term from r outer products on the CUDA cores instead of one
#: ``tl.dot`` was 3-5x slower in every tile of that sweep and was dropped.
DEFAULT_CONFIG = LaunchConfig(bm=16, bn=128, warps=4)

if HAS_TRITON:

    @triton.jit
    def _lora_tile(XA, B, rows, cols, s_xa, s_bn, s_bk, m, n, k0, r,
                   RP: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """``sum_k XA[rows, k0 + k] * B[cols, k0 + k]`` over ``k < r``, in fp32, as one ``tl.dot``
        (``XA`` row-major; ``B[n, k]`` at ``B + n * s_bn + k * s_bk``)."""
        ks = tl.arange(0, RP)
        xa = tl.load(XA + rows[:, None] * s_xa + (k0 + ks[None, :]),
                     mask=(rows[:, None] < m) & (ks[None, :] < r), other=0.0)
        bt = tl.load(B + cols[None, :] * s_bn + (k0 + ks[:, None]) * s_bk,
                     mask=(cols[None, :] < n) & (ks[:, None] < r), other=0.0)
        return tl.dot(xa, bt, input_precision=DOT_PRECISION)

    @triton.jit
    def _gate_up_tile(GU, XA, B, s_gu, s_xa, s_b, M, INTER, G0, RG, U0, RU,
                      HAS_LORA: tl.constexpr, RP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
        """This program's tile (rows, columns, 64-bit row offsets, mask) and its gate and up values
        with their LoRA terms, each rounded to the activation dtype (as ``addmm_`` into the buffer
        would have rounded them)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        mask = (rows[:, None] < M) & (cols[None, :] < INTER)
        r64 = rows.to(tl.int64)[:, None]
        g = tl.load(GU + r64 * s_gu + cols[None, :], mask=mask, other=0.0)
        u = tl.load(GU + r64 * s_gu + INTER + cols[None, :], mask=mask, other=0.0)
        if HAS_LORA:
            lg = _lora_tile(XA, B, rows, cols, s_xa, s_b, 1, M, INTER, G0, RG, RP, DOT_PRECISION)
            lu = _lora_tile(XA, B + INTER * s_b, rows, cols, s_xa, s_b, 1, M, INTER, U0, RU, RP, DOT_PRECISION)
            g = (g.to(tl.float32) + lg).to(u.dtype)
            u = (u.to(tl.float32) + lu).to(u.dtype)
        return rows, cols, r64, mask, g, u

    @triton.jit
    def _swiglu_lora_fwd_kernel(
        H, GU, XA, B, s_h, s_gu, s_xa, s_b, M, INTER, G0, RG, U0, RU,
        HAS_LORA: tl.constexpr, RP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr,
    ):
        rows, cols, r64, mask, g, u = _gate_up_tile(GU, XA, B, s_gu, s_xa, s_b, M, INTER, G0, RG, U0, RU,
                                                    HAS_LORA, RP, DOT_PRECISION, BM, BN)
        dt = u.dtype
        gf = g.to(tl.float32)
        silu = (gf * tl.sigmoid(gf)).to(dt)  # rounded before the product, as torch does
        tl.store(H + r64 * s_h + cols[None, :], (silu * u).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_lora_bwd_kernel(
        DH, GU, XA, B, XAD, AD, H_OUT, s_dh, s_gu, s_xa, s_b, s_xad, s_ad, s_h, M, INTER, G0, RG, U0, RU, RD,
        HAS_LORA: tl.constexpr, HAS_DLORA: tl.constexpr, WRITE_H: tl.constexpr,
        RP: tl.constexpr, RDP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr,
    ):
        rows, cols, r64, mask, g, u = _gate_up_tile(GU, XA, B, s_gu, s_xa, s_b, M, INTER, G0, RG, U0, RU,
                                                    HAS_LORA, RP, DOT_PRECISION, BM, BN)
        d = tl.load(DH + r64 * s_dh + cols[None, :], mask=mask, other=0.0)
        dt = u.dtype
        if HAS_DLORA:  # dh += (dy B_d) A_d; A_d is (RD, INTER) row-major: element (col, k) at k * s_ad + col
            ld = _lora_tile(XAD, AD, rows, cols, s_xad, 1, s_ad, M, INTER, 0, RD, RDP, DOT_PRECISION)
            d = (d.to(tl.float32) + ld).to(dt)
        df = d.to(tl.float32)
        gf = g.to(tl.float32)
        uf = u.to(tl.float32)
        sig = tl.sigmoid(gf)
        silu = gf * sig
        if WRITE_H:
            h = silu.to(dt).to(tl.float32) * uf
            tl.store(H_OUT + r64 * s_h + cols[None, :], h.to(H_OUT.dtype.element_ty), mask=mask)
        # Every element of GU is read above by this program only, so overwriting it is safe.
        tl.store(GU + r64 * s_gu + INTER + cols[None, :], (df * silu).to(dt), mask=mask)
        dg = df * uf * sig * (1.0 + gf * (1.0 - sig))
        tl.store(GU + r64 * s_gu + cols[None, :], dg.to(dt), mask=mask)


def _rank_pad(r: int) -> int:
    return max(16, next_power_of_2(r))


def _splits(xa: torch.Tensor | None, ranks: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """``(G0, RG, U0, RU)``: the columns of ``xa``/``b`` that gate and up read."""
    if xa is None:
        return 0, 0, 0, 0
    r = xa.shape[1]
    if ranks is None:
        return 0, r, 0, r
    rg, ru = ranks
    if rg < 0 or ru < 0 or rg + ru != r:
        raise ValueError(f"ranks {ranks} must split the {r} columns of x A^T (gate's first)")
    return 0, rg, rg, ru


def _fusable(gu: torch.Tensor, inter: int, xa: torch.Tensor | None, b: torch.Tensor | None,
             dxa_d: torch.Tensor | None = None, a_d: torch.Tensor | None = None,
             widest: int = 0) -> bool:
    """The Triton path: CUDA (or the interpreter), row-major operands of one dtype, ranks it holds."""
    present = [t for t in (xa, b, dxa_d, a_d) if t is not None]
    if not use_triton(gu, *present) or gu.dim() != 2 or gu.stride(1) != 1 or gu.shape[1] != 2 * inter:
        return False
    if any(t.dim() != 2 or t.dtype != gu.dtype or t.stride(1) != 1 for t in present):
        return False
    return widest <= MAX_FUSED_RANK


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


def swiglu_lora_forward(gu: torch.Tensor, inter: int, xa: torch.Tensor | None, b: torch.Tensor | None,
                        ranks: tuple[int, int] | None = None, config: LaunchConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """``h = silu(g) * u`` with ``[g | u] = gu + xa @ b^T``, ``(M, inter)``, contiguous.

    ``gu``: the base gate|up product ``(M, 2 inter)`` (left unchanged); ``xa``: ``x A^T``
    ``(M, R)`` and ``b``: the scaled ``B`` ``(2 inter, R)``, or both None. ``ranks = (r_gate,
    r_up)`` says ``b`` is block-diagonal (gate's rows use columns ``[0, r_gate)``, up's the rest),
    so each half reads only its own block; None reads all ``R`` columns for both.
    """
    if (xa is None) != (b is None):
        raise ValueError("xa and b come together (both None without LoRA)")
    g0, rg, u0, ru = _splits(xa, ranks)
    if not _fusable(gu, inter, xa, b, widest=max(rg, ru)):
        return swiglu_lora_forward_reference(gu, inter, xa, b).contiguous()
    m = gu.shape[0]
    h = torch.empty((m, inter), dtype=gu.dtype, device=gu.device)
    if h.numel():
        xa_, b_ = (xa, b) if xa is not None else (gu, gu)  # unread placeholders without LoRA
        _swiglu_lora_fwd_kernel[(triton.cdiv(m, config.bm), triton.cdiv(inter, config.bn))](
            h, gu, xa_, b_, h.stride(0), gu.stride(0), xa_.stride(0), b_.stride(0), m, inter, g0, rg, u0, ru,
            HAS_LORA=xa is not None, RP=_rank_pad(max(rg, ru)), DOT_PRECISION=_precision(gu),
            BM=config.bm, BN=config.bn, num_warps=config.warps,
        )
    return h


def swiglu_lora_backward(
    dh: torch.Tensor, gu: torch.Tensor, inter: int, xa: torch.Tensor | None, b: torch.Tensor | None,
    dxa_d: torch.Tensor | None, a_d: torch.Tensor | None, write_h: bool = True,
    ranks: tuple[int, int] | None = None, config: LaunchConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(h or None, dgu)`` where ``dgu = [d gate | d up]`` ``(M, 2 inter)``.

    ``dh``: the down projection's base input gradient ``dy @ W_d`` ``(M, inter)``, completed here
    with ``dxa_d @ a_d`` (``dxa_d = dy B_d`` scaled, ``(M, R_d)``; ``a_d`` ``(R_d, inter)``).
    ``gu``, ``xa``, ``b``, ``ranks`` as in :func:`swiglu_lora_forward`. On the Triton path
    ``dgu`` is written over ``gu`` and ``h`` over ``dh`` (both consumed); otherwise new tensors
    come back.
    """
    if (xa is None) != (b is None) or (dxa_d is None) != (a_d is None):
        raise ValueError("xa/b and dxa_d/a_d come in pairs (both None without LoRA)")
    g0, rg, u0, ru = _splits(xa, ranks)
    rd = 0 if dxa_d is None else dxa_d.shape[1]
    if not (_fusable(gu, inter, xa, b, dxa_d, a_d, widest=max(rg, ru, rd)) and dh.dim() == 2
            and dh.stride(1) == 1 and dh.dtype == gu.dtype):
        if use_triton(dh, gu):  # large ranks on the GPU: the unfused, in-place path
            full = gu if xa is None else gu.addmm_(xa, b.t())
            d = dh if dxa_d is None else dh.addmm_(dxa_d, a_d)
            h, dg, du = swiglu_backward(d, full[:, :inter], full[:, inter:], write_h=write_h, inplace=True)
            return h, (full if dg.data_ptr() == full.data_ptr() else torch.cat([dg, du], dim=1))
        h, dg, du = swiglu_lora_backward_reference(dh, gu, inter, xa, b, dxa_d, a_d)
        return (h if write_h else None), torch.cat([dg, du], dim=1)
    m = gu.shape[0]
    if gu.numel():
        xa_, b_ = (xa, b) if xa is not None else (gu, gu)
        xad_, ad_ = (dxa_d, a_d) if dxa_d is not None else (gu, gu)
        _swiglu_lora_bwd_kernel[(triton.cdiv(m, config.bm), triton.cdiv(inter, config.bn))](
            dh, gu, xa_, b_, xad_, ad_, dh, dh.stride(0), gu.stride(0), xa_.stride(0), b_.stride(0),
            xad_.stride(0), ad_.stride(0), dh.stride(0), m, inter, g0, rg, u0, ru, rd,
            HAS_LORA=xa is not None, HAS_DLORA=dxa_d is not None, WRITE_H=write_h,
            RP=_rank_pad(max(rg, ru)), RDP=_rank_pad(rd), DOT_PRECISION=_precision(gu),
            BM=config.bm, BN=config.bn, num_warps=config.warps,
        )
    return (dh if write_h else None), gu
