"""Dequantise Marlin-layout integer weights for the trainer: a Triton kernel and its torch reference.

The engine runs its GEMMs on these bytes with vLLM's Marlin kernel; the trainer needs the dense
weight for its forward and backward GEMMs (and drops it right after, as for NF4). One program
handles one ``16 × 64`` block — exactly one permutation chunk of :mod:`.marlin_layout` — so each
output element finds its packed word through a 1024-entry table of the inverse permutation, and
the whole chunk's words (512 bytes for 4-bit) stay in L1. The output is written ``(K, N)``
row-major, coalesced along ``N``; callers use it as ``W.t()``.
"""

from __future__ import annotations

import torch
from trainserve.kernels._triton_utils import HAS_TRITON, tl, triton, use_triton
from trainserve.kernels.marlin_layout import (
    CHUNK_N,
    TILE,
    IntFormat,
    MarlinTensors,
    column_slice,
    dequantize_marlin_reference,
    inverse_perm,
    scale_perm,
    spans_all_k,
    weight_perm,
    zero_interleave,
)
from trainserve.kernels.packed_state import PackedWeightState

if HAS_TRITON:

    @triton.jit
    def _marlin_dequant_kernel(
        OUT, QW, SC, ZP, INV_P, INV_S, INV_ZS, INV_IL,
        stride_out, stride_qw, stride_sc, stride_zp,
        GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr, BIAS: tl.constexpr,
    ):
        PF: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        row = tl.program_id(0)  # a 16-row tile of K
        chunk = tl.program_id(1)  # a 64-column chunk of N
        kk = tl.arange(0, 16)[:, None]
        nn = tl.arange(0, 64)[None, :]
        t = (nn // 16) * 256 + kk * 16 + (nn % 16)  # tile position inside the chunk
        j = tl.load(INV_P + t)  # where the packing put it
        pos = chunk * 1024 + j
        word = tl.load(QW + row * stride_qw + pos // PF)
        q = (word >> ((pos % PF) * BITS)) & MASK
        k = row * 16 + kk
        grp = k // GROUP
        sp = chunk * 64 + tl.load(INV_S + nn)
        s = tl.load(SC + grp * stride_sc + sp).to(tl.float32)
        if HAS_ZP:
            zp1 = chunk * 64 + tl.load(INV_ZS + nn)  # zero points always take the grouped order
            zpos = (zp1 // 8) * 8 + tl.load(INV_IL + (zp1 % 8))
            zword = tl.load(ZP + grp * stride_zp + zpos // PF)
            z = ((zword >> ((zpos % PF) * BITS)) & MASK).to(tl.float32)
        else:
            z = BIAS
        w = (q.to(tl.float32) - z) * s
        tl.store(OUT + k * stride_out + chunk * 64 + nn, w.to(OUT.dtype.element_ty))


_TABLES: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _tables(bits: int, single: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    key = (bits, single, str(device))
    if key not in _TABLES:
        _TABLES[key] = tuple(inverse_perm(p).to(device=device, dtype=torch.int32) for p in (
            weight_perm(bits), scale_perm(single), scale_perm(False), zero_interleave(bits)))
    return _TABLES[key]


def dequantize_marlin_triton(t: MarlinTensors, fmt: IntFormat, dtype: torch.dtype,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton dequantisation to ``(K, N)``; ``out`` may be a column slice of a wider buffer."""
    rows = t.qweight.shape[0]
    k = rows * TILE
    n = t.scales.shape[1]
    if out is None:
        out = torch.empty((k, n), dtype=dtype, device=t.qweight.device)
    elif out.shape != (k, n) or out.stride(1) != 1:
        raise ValueError(f"out must be ({k}, {n}) with unit column stride, got {tuple(out.shape)}")
    if t.qweight.stride(1) != 1 or t.scales.stride(1) != 1:
        raise ValueError("Marlin tensors must have unit column stride")
    single = spans_all_k(fmt, k)
    inv_p, inv_s, inv_zs, inv_il = _tables(fmt.bits, single, out.device)
    zeros = t.zeros if t.zeros is not None else t.qweight
    _marlin_dequant_kernel[(rows, n // CHUNK_N)](
        out, t.qweight, t.scales, zeros, inv_p, inv_s, inv_zs, inv_il,
        out.stride(0), t.qweight.stride(0), t.scales.stride(0), zeros.stride(0),
        GROUP=k if single else fmt.group_size, BITS=fmt.bits, HAS_ZP=t.zeros is not None,
        BIAS=float(fmt.bias), num_warps=4,
    )
    return out


def dequantize_marlin(t: MarlinTensors, fmt: IntFormat, dtype: torch.dtype,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``(K, N)`` dense weight: Triton on CUDA, the torch reference elsewhere."""
    if use_triton(t.qweight):
        return dequantize_marlin_triton(t, fmt, dtype, out)
    w = dequantize_marlin_reference(t, fmt, dtype if out is None else out.dtype)
    return w if out is None else out.copy_(w)


class MarlinQuantState(PackedWeightState):
    """Output features ``[n0, n1)`` of an engine layer's Marlin tensors (views, never copies)."""

    def __init__(self, parent: MarlinTensors, fmt: IntFormat, n0: int, n1: int, in_features: int,
                 dtype: torch.dtype):
        self.parent, self.fmt, self.n0, self.n1 = parent, fmt, n0, n1
        self.view = column_slice(parent, fmt, n0, n1)
        self.shape = torch.Size((n1 - n0, in_features))
        self.dtype = dtype

    def dequantize_t(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize_marlin(self.view, self.fmt, dtype, out)

    def merge(self, others: list[PackedWeightState]) -> PackedWeightState | None:
        end = self.n1
        for o in others:
            if not isinstance(o, MarlinQuantState) or o.parent is not self.parent or o.n0 != end:
                return None
            end = o.n1
        return MarlinQuantState(self.parent, self.fmt, self.n0, end, self.shape[1], self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in (self.view.qweight, self.view.scales, self.view.zeros) if x is not None]
