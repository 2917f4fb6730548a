"""Dequantise Machete-layout 4-bit weights for the trainer: Triton kernels and their torch reference.

The engine runs its GEMMs on these bytes with vLLM's Machete kernel (Hopper); the trainer needs
the dense weight for its forward and backward GEMMs and drops it right after: 8 passes over the
model per 7B GRPO step (4 micro-batches, forward and backward). One program handles one
``64 × 128`` block of :mod:`.machete_layout` and writes it ``(K, N)`` row-major, coalesced along
``N``; callers use it as ``W.t()``. Two kernels:

* the **word kernel**, for the layout vLLM's packer gives today (:data:`.machete_layout.PREPACK_BITS`,
  checked against the learnt table): it loads the block's 1,024 words once, in order, splits each
  into its 8 values and puts them in place with one fixed reshape/permute of the block (a layout
  conversion the compiler does on chip). H200, 2026-12-01, 7B shapes (``scripts/bench_machete_dequant.py``):
  0.30 ms per layer against the table kernel's 0.56 ms (floor 0.14 ms), 67 against 126 ms per GRPO
  step; gate|up at 67% of the floor, the small q/k/v and o layers at ~20% (too few blocks to hide
  each block's latency). 4 warps was the best of 1–16;
* the **table kernel**, for any other block-local layout: each value finds its 4-bit slot through
  the block's offset table (32 KiB, shared by every block, so it stays in cache) and loads its word
  again. Eight values share a word, and the table is read for every value, so it runs at 14–31% of
  the memory floor (same measurement).

A projection that is a column range of vLLM's fused q/k/v or gate/up layer reads the parent
tensors with a block offset, so the shards need no copy whatever the block order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trainserve.kernels._triton_utils import HAS_TRITON, tl, triton, use_triton
from trainserve.kernels.machete_layout import (
    BLOCK,
    BLOCK_K,
    BLOCK_N,
    MacheteLayout,
    apply_group_affine,
    unpack_reference,
)
from trainserve.kernels.packed_state import PackedWeightState

if HAS_TRITON:

    @triton.jit
    def _machete_dequant_kernel(
        OUT, QW, SC, ZF, TABLE, stride_out, stride_sc, stride_zf, NB0, KB, NB,
        GROUP: tl.constexpr, K_FASTEST: tl.constexpr,
    ):
        kb = tl.program_id(0)
        nbl = tl.program_id(1)
        kk = tl.arange(0, 64)[:, None]
        nn = tl.arange(0, 128)[None, :]
        t = tl.load(TABLE + kk * 128 + nn)
        nb = NB0 + nbl
        if K_FASTEST:
            blk = kb + KB * nb
        else:
            blk = nb + NB * kb
        pos = blk.to(tl.int64) * 8192 + t
        word = tl.load(QW + pos // 8)
        q = (word >> ((pos % 8) * 4).to(tl.int32)) & 15
        k = kb * 64 + kk
        grp = k // GROUP
        n = nb * 128 + nn
        s = tl.load(SC + grp * stride_sc + n).to(tl.float32)
        z = tl.load(ZF + grp * stride_zf + n).to(tl.float32)
        w = q.to(tl.float32) * s + z
        tl.store(OUT + k * stride_out + nbl * 128 + nn, w.to(OUT.dtype.element_ty))

    @triton.jit
    def _machete_dequant_words_kernel(
        OUT, QW, SC, ZF, stride_out, stride_sc, stride_zf, NB0, KB, NB,
        GROUP: tl.constexpr, K_FASTEST: tl.constexpr,
    ):
        kb = tl.program_id(0)
        nbl = tl.program_id(1)
        nb = NB0 + nbl
        if K_FASTEST:
            blk = kb + KB * nb
        else:
            blk = nb + NB * kb
        # PREPACK_BITS: word j + 16 i holds rows (k5 k4, k2 k1) = j's bits and columns
        # (n6 n5 n4, n2 n1 n0) = i's bits; its value t (bits 4t..4t+3) is (k0, k3, n3) = t's bits.
        words = tl.load(QW + blk.to(tl.int64) * 1024 + tl.arange(0, 64)[:, None] * 16 + tl.arange(0, 16)[None, :])
        q = ((words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 15).to(tl.int8)
        q = tl.reshape(q, (8, 8, 4, 4, 2, 2, 2))  # n6n5n4, n2n1n0, k2k1, k5k4, k0, k3, n3
        q = tl.permute(q, (3, 5, 2, 4, 0, 6, 1))  # k5k4, k3, k2k1, k0 | n6n5n4, n3, n2n1n0
        q = tl.reshape(q, (64, 128))
        kk = tl.arange(0, 64)[:, None]
        nn = tl.arange(0, 128)[None, :]
        n = nb * 128 + nn
        if GROUP % 64 == 0:  # one group row for the whole block: load it once, not per row
            grp = (kb * 64) // GROUP
        else:
            grp = (kb * 64 + kk) // GROUP
        s = tl.load(SC + grp * stride_sc + n).to(tl.float32)
        z = tl.load(ZF + grp * stride_zf + n).to(tl.float32)
        w = q.to(tl.float32) * s + z
        tl.store(OUT + (kb * 64 + kk) * stride_out + nbl * 128 + nn, w.to(OUT.dtype.element_ty))


@dataclass
class MacheteTensors:
    """The engine-side tensors of one (possibly fused) Machete-quantised linear layer."""

    qweight: torch.Tensor  # prepacked 4-bit values, K * N / 8 int32 words (opaque shape)
    scales: torch.Tensor  # (K // group, N), activation dtype
    zf: torch.Tensor  # (K // group, N): -scale * zero point, activation dtype
    layout: MacheteLayout
    group_size: int

    @property
    def k(self) -> int:
        return self.scales.shape[0] * self.group_size

    @property
    def n(self) -> int:
        return self.scales.shape[1]


_TABLES: dict[tuple[int, str], torch.Tensor] = {}
WORD_KERNEL_WARPS = 4


def _table(layout: MacheteLayout, device: torch.device) -> torch.Tensor:
    key = (id(layout.table), str(device))
    if key not in _TABLES:
        _TABLES[key] = layout.table.to(device=device, dtype=torch.int32).contiguous()
    return _TABLES[key]


def dequantize_machete_reference(t: MacheteTensors, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
    """``(K, n1 - n0)`` dense weight of output features ``[n0, n1)``, in plain torch."""
    q = unpack_reference(t.qweight, t.layout, t.k, t.n)[:, n0:n1]
    return apply_group_affine(q, t.scales[:, n0:n1], t.zf[:, n0:n1], t.group_size, dtype)


def dequantize_machete(t: MacheteTensors, n0: int, n1: int, dtype: torch.dtype,
                       out: torch.Tensor | None = None, kernel: str = "auto") -> torch.Tensor:
    """``(K, n1 - n0)`` dense weight: Triton on CUDA, the torch reference elsewhere; ``out`` may be a
    column slice of a wider buffer (unit column stride). ``kernel``: ``"auto"`` (the word kernel
    where the layout allows it), ``"words"`` or ``"table"`` (benchmarks and tests)."""
    if kernel not in ("auto", "words", "table"):
        raise ValueError(f"kernel must be 'auto', 'words' or 'table', got {kernel!r}")
    words = t.layout.prepack_bits if kernel == "auto" else kernel == "words"
    if words and not t.layout.prepack_bits:
        raise ValueError("the word kernel needs the PREPACK_BITS layout; this layout's table differs")
    if n0 % BLOCK_N or n1 % BLOCK_N or not 0 <= n0 < n1 <= t.n:
        raise ValueError(f"Machete column ranges must be multiples of {BLOCK_N} within {t.n}, got {n0}:{n1}")
    k = t.k
    if out is not None and (out.shape != (k, n1 - n0) or out.stride(1) != 1):
        raise ValueError(f"out must be ({k}, {n1 - n0}) with unit column stride, got {tuple(out.shape)}")
    if not use_triton(t.qweight):
        w = dequantize_machete_reference(t, n0, n1, dtype if out is None else out.dtype)
        return w if out is None else out.copy_(w)
    if out is None:
        out = torch.empty((k, n1 - n0), dtype=dtype, device=t.qweight.device)
    if t.scales.stride(1) != 1 or t.zf.stride(1) != 1 or not t.qweight.is_contiguous():
        raise ValueError("Machete tensors must be contiguous along N")
    kb, nb = k // BLOCK_K, t.n // BLOCK_N
    assert t.qweight.numel() * 8 == kb * nb * BLOCK
    grid = (kb, (n1 - n0) // BLOCK_N)
    strides = (out.stride(0), t.scales.stride(0), t.zf.stride(0), n0 // BLOCK_N, kb, nb)
    if words:
        _machete_dequant_words_kernel[grid](out, t.qweight, t.scales, t.zf, *strides, GROUP=t.group_size,
                                            K_FASTEST=t.layout.k_fastest, num_warps=WORD_KERNEL_WARPS)
    else:
        _machete_dequant_kernel[grid](out, t.qweight, t.scales, t.zf, _table(t.layout, out.device), *strides,
                                      GROUP=t.group_size, K_FASTEST=t.layout.k_fastest, num_warps=8)
    return out


class MacheteQuantState(PackedWeightState):
    """Output features ``[n0, n1)`` of an engine layer's Machete tensors (the parent's storage)."""

    def __init__(self, parent: MacheteTensors, n0: int, n1: int, dtype: torch.dtype):
        if n0 % BLOCK_N or n1 % BLOCK_N:
            raise ValueError(f"Machete shards must start and end on a multiple of {BLOCK_N}, got {n0}:{n1}")
        self.parent, self.n0, self.n1 = parent, n0, n1
        self.shape = torch.Size((n1 - n0, parent.k))
        self.dtype = dtype

    def dequantize_t(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize_machete(self.parent, self.n0, self.n1, dtype, out)

    def merge(self, others: list[PackedWeightState]) -> PackedWeightState | None:
        end = self.n1
        for o in others:
            if not isinstance(o, MacheteQuantState) or o.parent is not self.parent or o.n0 != end:
                return None
            end = o.n1
        return MacheteQuantState(self.parent, self.n0, end, self.dtype)

    def storage(self) -> torch.Tensor:
        """The packed words of this range: a contiguous slice when K-blocks are stored fastest
        (each block column is one run of words), else the whole parent tensor."""
        p = self.parent
        flat = p.qweight.reshape(-1)
        if not p.layout.k_fastest:
            return flat
        words_per_col = (p.k // BLOCK_K) * BLOCK // 8
        return flat[self.n0 // BLOCK_N * words_per_col: self.n1 // BLOCK_N * words_per_col]

    def tensors(self) -> list[torch.Tensor]:
        p = self.parent
        return [p.qweight, p.scales[:, self.n0:self.n1], p.zf[:, self.n0:self.n1]]
