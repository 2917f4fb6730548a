"""4-bit weights in vLLM's Machete layout (Hopper): the layout learnt from the packer, and a torch reference.

Why Machete: Marlin (``marlin_layout``) issues Ampere ``mma.sync`` instructions. On an H200 at the
batch a GRPO rollout decodes (64 sequences) it is compute-bound and *slower* than bf16 (measured
4.49 vs 4.14 GPU ms per decode step for 7B, 2026-11-30). vLLM's Machete kernel is the Hopper
(``wgmma``) weight-only GEMM; it reads the weights in its own "prepacked" layout, produced by
``machete_prepack_B``.

That layout is a CUTLASS/CuTe construction (the B operand of the kernel's tiled MMA, with the
4-bit values interleaved for fast up-conversion), not a documented formula. What the trainer needs
is only where each value lands, so instead of transcribing the C++ we *learn* it from the packer
itself (:func:`learn_layout`): packing 0/1 bit-planes of each value's own index reveals the
destination of every value. The result is checked to be

* a pure permutation of 4-bit values (no value transformation),
* local to blocks of ``64 (K) × 128 (N)`` values (``MACHETE_PREPACKED_BLOCK_SHAPE``): one table
  ``T[k % 64, n % 128]`` of offsets inside a block, the same for every block,
* with blocks stored in a linear order, K-blocks fastest or N-blocks fastest.

Any other outcome raises instead of guessing. Offsets count 4-bit values in the packed tensor
viewed as a flat ``int32`` array, value ``i`` of a word at bits ``4 i``.

Scales and zero points stay in their natural ``(K // group, N)`` order; Machete takes zero points
pre-multiplied, ``zf = -s * z`` (in the activation dtype), so the dequantised weight is
``w[k, n] = q[k, n] * s[k // g, n] + zf[k // g, n]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from trainserve.kernels.marlin_layout import IntFormat, quantize_groups

BLOCK_K = 64
BLOCK_N = 128
BLOCK = BLOCK_K * BLOCK_N  # 4-bit values per block
_PROBE_BLOCKS = (3, 2)  # (K blocks, N blocks) of the probe: unequal, so the block order is unambiguous

#: The table vLLM 0.26's packer gives, as a permutation of bits: bit ``i`` of a value's offset in its
#: block is bit ``b`` of its row (``("k", b)``) or column (``("n", b)``). Learnt on an H200
#: (2026-12-01, ``scripts/bench_machete_dequant.py --dump-layout``). So each word holds the values
#: of rows ``k, k+1, k+8, k+9`` in columns ``n, n+8``, the shape of one MMA thread's register fragment.
#: A layout with this table dequantises by a fixed reshuffle of whole words
#: (``machete_dequant``'s word kernel) instead of a per-value gather through the table.
PREPACK_BITS: tuple[tuple[str, int], ...] = (
    ("n", 3), ("k", 3), ("k", 0), ("k", 4), ("k", 5), ("k", 1), ("k", 2),
    ("n", 0), ("n", 1), ("n", 2), ("n", 4), ("n", 5), ("n", 6),
)


def bit_permutation_table(bits: tuple[tuple[str, int], ...]) -> torch.Tensor:
    """The ``(BLOCK_K, BLOCK_N)`` offset table of a layout given as a permutation of bits."""
    kk = torch.arange(BLOCK_K)[:, None]
    nn = torch.arange(BLOCK_N)[None, :]
    table = torch.zeros(BLOCK_K, BLOCK_N, dtype=torch.int64)
    for i, (axis, b) in enumerate(bits):
        table |= (((kk if axis == "k" else nn) >> b) & 1) << i
    return table.to(torch.int32)


@dataclass(frozen=True)
class MacheteLayout:
    """Where each 4-bit value of a ``(K, N)`` matrix lands in the prepacked tensor."""

    table: torch.Tensor  # (BLOCK_K, BLOCK_N) int32: offset inside its block
    k_fastest: bool  # block (kb, nb) is number kb + KB * nb (True) or nb + NB * kb (False)
    #: the table is :data:`PREPACK_BITS`'s (set from ``table``; the dequantiser's fast path)
    prepack_bits: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        same = torch.equal(self.table.cpu().to(torch.int32), bit_permutation_table(PREPACK_BITS))
        object.__setattr__(self, "prepack_bits", same)

    def block_index(self, kb: torch.Tensor, nb: torch.Tensor, k_blocks: int, n_blocks: int) -> torch.Tensor:
        return kb + k_blocks * nb if self.k_fastest else nb + n_blocks * kb

    def offsets(self, k: int, n: int, device: torch.device | str = "cpu",
                columns: torch.Tensor | None = None) -> torch.Tensor:
        """``(K, N)`` int64: the flat 4-bit offset of every value (of ``columns`` only, if given)."""
        check_machete_shape(k, n)
        kk = torch.arange(k, device=device)[:, None]
        nn = (torch.arange(n, device=device) if columns is None else columns.to(device))[None, :]
        blk = self.block_index(kk // BLOCK_K, nn // BLOCK_N, k // BLOCK_K, n // BLOCK_N)
        return blk.to(torch.int64) * BLOCK + self.table.to(device)[kk % BLOCK_K, nn % BLOCK_N]


def check_machete_shape(k: int, n: int, what: str = "weight") -> None:
    if k % BLOCK_K or n % BLOCK_N:
        raise ValueError(f"{what}: Machete needs in_features % {BLOCK_K} == 0 and out_features % {BLOCK_N} == 0, "
                         f"got ({n}, {k})")


def pack_rows_gptq(q_kn: torch.Tensor) -> torch.Tensor:
    """``(K, N)`` 4-bit values → the GPTQ order Machete's packer reads: ``(K // 8, N)`` int32, value
    ``k % 8`` of word ``(k // 8, n)`` at bits ``4 (k % 8)``."""
    k, n = q_kn.shape
    v = q_kn.to(torch.int64).reshape(k // 8, 8, n)
    shifts = (torch.arange(8, device=q_kn.device, dtype=torch.int64) * 4)[None, :, None]
    words = (v << shifts).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows_gptq(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_rows_gptq`: ``(K // 8, N)`` int32 words → ``(K, N)`` int32 values 0..15."""
    shifts = (torch.arange(8, device=words.device, dtype=torch.int32) * 4)[None, :, None]
    return ((words[:, None, :] >> shifts) & 15).reshape(-1, words.shape[1])


def apply_group_affine(q: torch.Tensor, scales: torch.Tensor, zf: torch.Tensor, group_size: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """``q * s + zf`` in fp32 for ``(K, N)`` values with ``s``/``zf`` given per group of ``group_size``
    rows (``(K // group, N)``), rounded once to ``dtype``: the dequantisation every asymmetric
    4-bit layout here shares once its values are unpacked."""
    w = q.float() * scales.float().repeat_interleave(group_size, 0) + zf.float().repeat_interleave(group_size, 0)
    return w.to(dtype)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """A packed int32 tensor as its flat sequence of 4-bit values."""
    words = packed.reshape(-1)
    shifts = torch.arange(8, device=words.device, dtype=torch.int32) * 4
    return ((words[:, None] >> shifts) & 15).reshape(-1)


def pack_reference(q_kn: torch.Tensor, layout: MacheteLayout) -> torch.Tensor:
    """The prepacked tensor for ``(K, N)`` values (torch; what ``machete_prepack_B`` should give),
    returned as ``(K // 8, N)`` int32 like the packer's output."""
    k, n = q_kn.shape
    flat = torch.empty(k * n, dtype=torch.int64, device=q_kn.device)
    flat[layout.offsets(k, n, q_kn.device).reshape(-1)] = q_kn.reshape(-1).to(torch.int64)
    v = flat.reshape(-1, 8)
    shifts = torch.arange(8, device=q_kn.device, dtype=torch.int64) * 4
    words = (v << shifts).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(k // 8, n)


def unpack_reference(packed: torch.Tensor, layout: MacheteLayout, k: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_reference`: the ``(K, N)`` int32 values."""
    return _nibbles(packed)[layout.offsets(k, n, packed.device)].to(torch.int32)


def dequantize_reference(packed: torch.Tensor, scales: torch.Tensor, zf: torch.Tensor, layout: MacheteLayout,
                         group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``(K, N)`` weight ``q * s + zf`` (``W.t()`` of the ``nn.Linear`` weight) in plain torch."""
    k, n = scales.shape[0] * group_size, scales.shape[1]
    return apply_group_affine(unpack_reference(packed, layout, k, n), scales, zf, group_size, dtype)


def check_prepacked(prepacked: torch.Tensor, words_kn: torch.Tensor, layout: MacheteLayout) -> None:
    """Raise unless ``prepacked`` (from the real packer) holds ``words_kn``'s values where ``layout``
    says, for the first and last block column (cheap, and it pins the block order at this shape)."""
    k, n = words_kn.shape[0] * 8, words_kn.shape[1]
    cols = torch.cat([torch.arange(BLOCK_N), torch.arange(n - BLOCK_N, n)]).to(words_kn.device)
    pos = layout.offsets(k, n, words_kn.device, columns=cols)
    # gather just those words (expanding the whole tensor to 4-bit values would take ~2 bytes per weight)
    got = (prepacked.reshape(-1)[pos // 8] >> ((pos % 8) * 4).to(torch.int32)) & 15
    want = unpack_rows_gptq(words_kn[:, cols])
    if not torch.equal(got.to(torch.int32), want.to(torch.int32)):
        raise RuntimeError(f"Machete's prepacked layout at shape (K={k}, N={n}) is not the learnt one; "
                           "trainserve cannot view it")


def learn_layout(prepack: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str) -> MacheteLayout:
    """Learn the layout from ``prepack`` (``(K // 8, N)`` GPTQ-packed int32 → prepacked tensor).

    A probe of 3 × 2 blocks is packed once per bit of a value's index (17 calls); each 4-bit value
    of the outputs is 0 or 1, and the bits read back give, for every destination, the index of the
    value that went there.
    """
    kb_n, nb_n = _PROBE_BLOCKS
    k, n = kb_n * BLOCK_K, nb_n * BLOCK_N
    idx = torch.arange(k * n, device=device, dtype=torch.int64).reshape(k, n)
    source = torch.zeros(k * n, dtype=torch.int64, device=device)
    for bit in range(int(k * n - 1).bit_length()):
        out = _nibbles(prepack(pack_rows_gptq((idx >> bit) & 1)))
        if out.numel() != k * n or int(out.max()) > 1:
            raise RuntimeError("machete_prepack_B is not a pure permutation of 4-bit values; "
                               "trainserve cannot view its layout")
        source |= out.to(torch.int64) << bit
    if not torch.equal(torch.sort(source).values, torch.arange(k * n, device=device)):
        raise RuntimeError("machete_prepack_B did not permute the probe's values")
    dest = torch.empty_like(source)
    dest[source] = torch.arange(k * n, device=device)
    dest = dest.reshape(k, n).cpu()
    kk = torch.arange(k)[:, None]
    nn = torch.arange(n)[None, :]
    blocks = dest // BLOCK
    table = (dest % BLOCK)[:BLOCK_K, :BLOCK_N].to(torch.int32)
    for k_fastest in (True, False):
        layout = MacheteLayout(table=table, k_fastest=k_fastest)
        expected = layout.block_index(kk // BLOCK_K, nn // BLOCK_N, kb_n, nb_n)
        if torch.equal(blocks, expected) and torch.equal(dest, layout.offsets(k, n)):
            return layout
    raise RuntimeError("machete_prepack_B's layout is not block-local in 64 × 128 blocks in a linear block "
                       "order; trainserve cannot view it (vLLM changed Machete's layout)")


def quantize_for_machete(w_nk: torch.Tensor, group_size: int, scale_dtype: torch.dtype, chunk: int = 4096
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit group quantisation of an ``(N, K)`` weight for Machete's packer:
    ``(words, scales, zf)`` — ``words`` GPTQ-packed ``(K // 8, N)`` int32 (:func:`pack_rows_gptq`),
    ``scales`` and ``zf = -s * z`` as ``(K // group, N)`` of ``scale_dtype``.

    Same rounding as the Marlin path (:func:`~trainserve.kernels.marlin_layout.quantize_groups`),
    ``chunk`` output features at a time so the temporaries stay small next to the weight.
    """
    fmt = IntFormat(bits=4, group_size=group_size, zero_point=True)
    ws, ss, zs = [], [], []
    for n0 in range(0, w_nk.shape[0], chunk):
        q, s, z = quantize_groups(w_nk[n0: n0 + chunk].t(), fmt, scale_dtype)
        ws.append(pack_rows_gptq(q))
        ss.append(s)
        zs.append((-(s.float() * z.float())).to(scale_dtype))
        del q
    return torch.cat(ws, 1), torch.cat(ss, 1), torch.cat(zs, 1)
