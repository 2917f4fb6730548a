"""Group-quantised integer weights in Marlin's tile layout: quantiser, packer, and a torch reference.

Why this layout: vLLM's Marlin kernel (``marlin_gemm``) runs a weight-only 4-/8-bit GEMM at close to
memory speed for decode-sized batches, reads its weights in this layout and is CUDA-graph capturable.
The engine keeps exactly these bytes; the trainer dequantises the *same* bytes (a Triton kernel in
:mod:`trainserve.kernels.marlin_dequant`, this module's reference on CPU). So the layout is the one
thing both sides must agree on, and it is written down here, in one place, from its definition:

* Values ``q`` of a ``(K, N)`` matrix (``K`` = input features, ``N`` = output features) are grouped
  by ``16 × 16`` tiles: ``T[k // 16, (n // 16) * 256 + (k % 16) * 16 + n % 16] = q[k, n]``.
* Each row of ``T`` is cut into chunks of 1024 values (a ``16 × 64`` block: four tiles) and every
  chunk is reordered by one fixed permutation ``P`` (the order in which a warp's threads consume
  the tensor-core fragments, with the 4-/8-bit interleave of the dequantiser):
  ``U[:, j] = T[:, P[j]]`` within each chunk.
* ``U`` is packed along its rows, ``32 // bits`` values per ``int32``: value ``i`` of word ``c`` is
  ``U[:, c * pf + i]`` at bit ``bits * i``.  The result has shape ``(K // 16, N * 16 // pf)``.
* Scales ``s`` of shape ``(K // group, N)`` are reordered in chunks of 64 columns by ``S``
  (``S_single`` when one group spans all of ``K``); integer zero points (4-bit asymmetric only)
  take the scale order, then the 8-wide interleave, then are packed along ``N``.
* Dequantised: ``w[k, n] = (q[k, n] - z[k // group, n]) * s[k // group, n]`` with ``z = 8``
  (4-bit symmetric, Marlin's ``uint4b8``) or ``128`` (8-bit, ``uint8b128``) without zero points.

Column ranges that start and end on a multiple of 64 are column slices of the packed tensors
(``qweight[:, n0 * 16 // pf : n1 * 16 // pf]``, ``scales[:, n0:n1]``, ``zeros[:, n0 // pf : n1 // pf]``),
which is how the trainer views the q/k/v and gate/up shards of vLLM's fused layers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

TILE = 16
CHUNK_N = 64  # output features per permutation chunk: shard boundaries must be multiples of this
MIN_K = 128  # Marlin's smallest K tile
SUPPORTED = {(4, True), (4, False), (8, False)}  # (bits, zero_point)


@dataclass(frozen=True)
class IntFormat:
    """A group-quantised integer format Marlin can run."""

    bits: int = 4
    group_size: int = 64
    zero_point: bool = True

    def __post_init__(self) -> None:
        if (self.bits, self.zero_point) not in SUPPORTED:
            raise ValueError(f"unsupported integer format bits={self.bits} zero_point={self.zero_point}")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128, got {self.group_size}")

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits

    @property
    def bias(self) -> int:
        """The implicit zero point of the symmetric formats."""
        return 1 << (self.bits - 1)

    @property
    def name(self) -> str:
        return f"int{self.bits}-g{self.group_size}-{'asym' if self.zero_point else 'sym'}"


def check_shape(fmt: IntFormat, k: int, n: int, what: str = "weight") -> None:
    """Raise ``ValueError`` when a ``(K, N)`` weight cannot be tiled in this format."""
    if n % CHUNK_N or k % MIN_K or k % fmt.group_size:
        raise ValueError(
            f"{what}: {n} outputs x {k} inputs cannot be tiled for {fmt.name} (outputs must be a "
            f"multiple of {CHUNK_N}, inputs of {MIN_K} and of the group size {fmt.group_size})")


@functools.cache
def weight_perm(bits: int) -> torch.Tensor:
    """``P``: for each packed position ``j`` of a 1024-value chunk, the tile position it holds."""
    order: list[int] = []
    for lane in range(32):
        col = lane // 4
        rows = (2 * (lane % 4), 2 * (lane % 4) + 1, 2 * (lane % 4 + 4), 2 * (lane % 4 + 4) + 1)
        fragment = [16 * r + col + 8 * half for half in (0, 1) for r in rows]
        for quarter in range(4):
            order += [p + 256 * quarter for p in fragment]
    interleave = [0, 2, 4, 6, 1, 3, 5, 7] if bits == 4 else [0, 2, 1, 3]
    perm = torch.tensor(order, dtype=torch.long).view(-1, len(interleave))[:, interleave]
    return perm.reshape(-1)


@functools.cache
def scale_perm(single: bool = False) -> torch.Tensor:
    """``S`` (or ``S_single``): the order of each 64-column chunk of the scales."""
    if single:
        order = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    else:
        order = [i + 8 * j for i in range(8) for j in range(8)]
    return torch.tensor(order, dtype=torch.long)


@functools.cache
def zero_interleave(bits: int) -> torch.Tensor:
    return torch.tensor([0, 2, 4, 6, 1, 3, 5, 7] if bits == 4 else [0, 2, 1, 3], dtype=torch.long)


def inverse_perm(perm: torch.Tensor) -> torch.Tensor:
    return torch.argsort(perm)


def spans_all_k(fmt: IntFormat, k: int) -> bool:
    return fmt.group_size >= k


# ---------------------------------------------------------------- quantise


def quantize_groups(w_kn: torch.Tensor, fmt: IntFormat, scale_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest group quantisation of a ``(K, N)`` weight: ``(q, scales, zeros)``.

    Asymmetric: each group's range is widened to include 0 and split into ``2**bits - 1`` steps;
    the zero point is an integer. Symmetric: the scale uses the whole signed range
    ``[-2**(bits-1), 2**(bits-1) - 1]``. Scales are rounded to ``scale_dtype`` *before* the values are
    rounded, so ``q`` is optimal for the scales the kernel will actually use.
    """
    k, n = w_kn.shape
    g = fmt.group_size
    wg = w_kn.float().reshape(k // g, g, n)
    top = (1 << fmt.bits) - 1
    if fmt.zero_point:
        hi = wg.amax(1).clamp_min(0)
        lo = wg.amin(1).clamp_max(0)
        scales = ((hi - lo) / top).clamp_min(1e-8).to(scale_dtype)
        s = scales.float()
        zeros = torch.round(-lo / s).clamp(0, top)
        q = torch.round(wg / s[:, None]) + zeros[:, None]
        q = q.clamp(0, top)
        return q.reshape(k, n).to(torch.int32), scales, zeros.to(torch.int32)
    half = fmt.bias
    scales = torch.maximum(wg.amax(1) / (half - 1), wg.amin(1) / -half).clamp_min(1e-8).to(scale_dtype)
    s = scales.float()
    q = (torch.round(wg / s[:, None]) + half).clamp(0, top)
    return q.reshape(k, n).to(torch.int32), scales, None


# ---------------------------------------------------------------- pack (engine layout)


def _pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``32 // bits`` consecutive values of each row into one int32 (value ``i`` at bit ``bits*i``)."""
    pf = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0], -1, pf)
    shifts = torch.arange(pf, device=values.device, dtype=torch.int64) * bits
    words = (v << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _unpack_along_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    pf = 32 // bits
    shifts = torch.arange(pf, device=words.device, dtype=torch.int32) * bits
    v = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(words.shape[0], -1)


def pack_weight(q_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """``(K, N)`` integer values → Marlin's packed ``(K // 16, N * 16 // pf)`` int32 tensor."""
    k, n = q_kn.shape
    t = q_kn.reshape(k // TILE, TILE, n // TILE, TILE).permute(0, 2, 1, 3).reshape(k // TILE, n * TILE)
    perm = weight_perm(bits).to(q_kn.device)
    u = t.reshape(-1, perm.numel())[:, perm].reshape(t.shape)
    return _pack_along_rows(u, bits)


def unpack_weight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_weight`: the ``(K, N)`` integer values."""
    u = _unpack_along_rows(qweight, bits)
    rows, cols = u.shape
    k, n = rows * TILE, cols // TILE
    inv = inverse_perm(weight_perm(bits)).to(qweight.device)
    t = u.reshape(-1, inv.numel())[:, inv].reshape(rows, cols)
    return t.reshape(rows, n // TILE, TILE, TILE).permute(0, 2, 1, 3).reshape(k, n)


def permute_scales(scales: torch.Tensor, single: bool = False) -> torch.Tensor:
    """``(K // group, N)`` scales → Marlin's order (same shape)."""
    perm = scale_perm(single).to(scales.device)
    return scales.reshape(-1, perm.numel())[:, perm].reshape(scales.shape).contiguous()


def unpermute_scales(scales: torch.Tensor, single: bool = False) -> torch.Tensor:
    inv = inverse_perm(scale_perm(single)).to(scales.device)
    return scales.reshape(-1, inv.numel())[:, inv].reshape(scales.shape)


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """``(K // group, N)`` integer zero points → Marlin's packed ``(K // group, N // pf)`` int32."""
    z = permute_scales(zeros)
    il = zero_interleave(bits).to(zeros.device)
    z = z.reshape(-1, il.numel())[:, il].reshape(zeros.shape)
    return _pack_along_rows(z, bits)


def unpack_zeros(packed: torch.Tensor, bits: int) -> torch.Tensor:
    z = _unpack_along_rows(packed, bits)
    inv_il = inverse_perm(zero_interleave(bits)).to(packed.device)
    z = z.reshape(-1, inv_il.numel())[:, inv_il].reshape(z.shape)
    return unpermute_scales(z)


@dataclass
class MarlinTensors:
    """The engine-side tensors of one (possibly fused) quantised linear layer."""

    qweight: torch.Tensor  # (K // 16, N * 16 // pf) int32
    scales: torch.Tensor  # (K // group, N) in the activation dtype, Marlin order
    zeros: torch.Tensor | None  # (K // group, N // pf) int32, or None (symmetric)


def quantize_to_marlin(w_nk: torch.Tensor, fmt: IntFormat, scale_dtype: torch.dtype,
                       chunk: int = 4096) -> MarlinTensors:
    """Quantise an ``(N, K)`` (``nn.Linear`` layout) weight into Marlin's tensors (the GPU tests check
    the bytes against vLLM's own ``gptq_marlin_repack``).

    Output features are processed ``chunk`` at a time (column ranges are independent in this
    layout), so the float temporaries stay small next to the weight.
    """
    n, k = w_nk.shape
    check_shape(fmt, k, n)
    single = spans_all_k(fmt, k)
    parts = []
    for n0 in range(0, n, chunk):
        q, scales, zeros = quantize_groups(w_nk[n0: n0 + chunk].t(), fmt, scale_dtype)
        parts.append((pack_weight(q, fmt.bits), permute_scales(scales, single),
                      pack_zeros(zeros, fmt.bits) if zeros is not None else None))
        del q
    cat = (lambda i: parts[0][i] if len(parts) == 1 else torch.cat([p[i] for p in parts], dim=1))
    return MarlinTensors(qweight=cat(0), scales=cat(1), zeros=cat(2) if parts[0][2] is not None else None)


def dequantize_marlin_reference(t: MarlinTensors, fmt: IntFormat, dtype: torch.dtype) -> torch.Tensor:
    """The ``(K, N)`` dequantised weight (``W.t()`` of the ``nn.Linear`` weight), in plain torch."""
    q = unpack_weight(t.qweight, fmt.bits)
    k = q.shape[0]
    single = spans_all_k(fmt, k)
    scales = unpermute_scales(t.scales, single).float()
    if t.zeros is not None:
        zeros = unpack_zeros(t.zeros, fmt.bits).float()
    else:
        zeros = torch.full_like(scales, float(fmt.bias))
    g = fmt.group_size if not single else k
    w = (q.float() - zeros.repeat_interleave(g, 0)) * scales.repeat_interleave(g, 0)
    return w.to(dtype)


def column_slice(t: MarlinTensors, fmt: IntFormat, n0: int, n1: int) -> MarlinTensors:
    """Views of output features ``[n0, n1)`` (both multiples of 64): no copy."""
    if n0 % CHUNK_N or n1 % CHUNK_N:
        raise ValueError(f"Marlin column slices must start and end on a multiple of {CHUNK_N}, got {n0}:{n1}")
    w_per_n = TILE // fmt.pack_factor
    return MarlinTensors(
        qweight=t.qweight[:, n0 * w_per_n: n1 * w_per_n],
        scales=t.scales[:, n0:n1],
        zeros=None if t.zeros is None else t.zeros[:, n0 // fmt.pack_factor: n1 // fmt.pack_factor],
    )
