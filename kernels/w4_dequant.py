"""Dequantise GPTQ-ordered 4-bit weights (Triton), the layout of :mod:`.w4a16_gemm`.

Measurement code for now: :mod:`.w4a16_gemm` was slower than bf16 at decode batches on an H200
(BENCHMARKS.md, eighth series), so the engine keeps Machete/Marlin and this layout is not wired
into the weight formats; the benchmarks use this kernel for the trainer-side dequantisation time
and for the dequantise-then-cuBLAS comparison at prefill batches.

The layout (``(K // 8, N)`` int32 words, scales and ``zf`` per group of K) keeps output features
contiguous, so a column range of a fused q/k/v or gate/up layer is a strided view of the parent's
tensors: no copy and no block alignment (unlike Machete's 128-column blocks). One program
dequantises a ``64 × 64`` tile; each word is read by the 8 rows it holds (the repeats hit L1), and
the output is written ``(K, N)``, coalesced along N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trainserve.kernels._triton_utils import HAS_TRITON, tl, triton, use_triton
from trainserve.kernels.w4a16_gemm import check_w4_tensors, dequantize_w4_reference

_BK, _BN = 64, 64

if HAS_TRITON:

    @triton.jit
    def _w4_dequant_kernel(OUT, QW, SC, ZF, K, N, stride_out, stride_qk, stride_sg, stride_zg,
                           GROUP: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
        rk = tl.program_id(0) * BK + tl.arange(0, BK)
        # K is whole groups and N whole 64-column tiles: no masks, so loads and stores vectorise
        rn = tl.max_contiguous(tl.multiple_of(tl.program_id(1) * BN + tl.arange(0, BN), BN), BN)
        words = tl.load(QW + (rk // 8)[:, None] * stride_qk + rn[None, :])
        q = ((words >> ((rk % 8) * 4)[:, None]) & 15).to(tl.float32)
        g = (rk // GROUP)[:, None]
        s = tl.load(SC + g * stride_sg + rn[None, :]).to(tl.float32)
        z = tl.load(ZF + g * stride_zg + rn[None, :]).to(tl.float32)
        tl.store(OUT + rk[:, None] * stride_out + rn[None, :], (q * s + z).to(OUT.dtype.element_ty))


@dataclass
class W4Tensors:
    """The engine-side tensors of one (possibly fused) 4-bit layer in GPTQ order."""

    qweight: torch.Tensor  # (K // 8, N) int32
    scales: torch.Tensor  # (K // group, N), activation dtype
    zf: torch.Tensor  # (K // group, N): -scale * zero point
    group_size: int

    @property
    def k(self) -> int:
        return self.qweight.shape[0] * 8

    @property
    def n(self) -> int:
        return self.qweight.shape[1]

    def columns(self, n0: int, n1: int) -> W4Tensors:
        """Output features ``[n0, n1)``: views, no copy."""
        return W4Tensors(self.qweight[:, n0:n1], self.scales[:, n0:n1], self.zf[:, n0:n1], self.group_size)


def dequantize_w4(t: W4Tensors, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(K, N)`` dense weight: Triton on CUDA, the torch reference elsewhere; ``out`` may be a column
    slice of a wider buffer (unit column stride)."""
    k, n = t.k, t.n
    check_w4_tensors(t.qweight, t.scales, t.zf, t.group_size)
    if out is not None and (out.shape != (k, n) or out.stride(1) != 1 or out.dtype != dtype):
        raise ValueError(f"out must be ({k}, {n}) of {dtype} with unit column stride, got {tuple(out.shape)} "
                         f"of {out.dtype}")
    if not use_triton(t.qweight):
        w = dequantize_w4_reference(t.qweight, t.scales, t.zf, t.group_size, dtype)
        return w if out is None else out.copy_(w)
    if out is None:
        out = torch.empty((k, n), dtype=dtype, device=t.qweight.device)
    if t.qweight.stride(1) != 1 or t.scales.stride(1) != 1 or t.zf.stride(1) != 1:
        raise ValueError("4-bit tensors must be contiguous along N")
    if t.group_size % _BK:
        raise ValueError(f"4-bit dequantisation on the GPU needs groups of a multiple of {_BK}, "
                         f"got {t.group_size}")
    _w4_dequant_kernel[(triton.cdiv(k, _BK), triton.cdiv(n, _BN))](
        out, t.qweight, t.scales, t.zf, k, n, out.stride(0), t.qweight.stride(0), t.scales.stride(0),
        t.zf.stride(0), GROUP=t.group_size, BK=_BK, BN=_BN, num_warps=4)
    return out
