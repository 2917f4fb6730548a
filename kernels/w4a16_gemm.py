"""4-bit weight-only GEMM for decode batches (Triton), on GPTQ-ordered words, and its torch reference.

**Status: a measured experiment, not used by the engine.** On an H200 (2026-12-01, 7B shape, cold
weights, best of a 128-configuration sweep per layer and batch) all linear layers of one decode
step took 6.28 ms at M=64 and 4.72 ms at M=16, against bf16's 4.19 and 4.13 ms
(``benchmarks/results/w4a16_sweep_h200_7b_2026-12-01.json``; gemlite's Triton kernels were also
slower than bf16 there). The engine keeps vLLM's Machete/Marlin kernels; this file and
``scripts/tune_w4a16.py`` stay so the measurement can be re-run and the kernel improved (see
docs/quantization.md for where the time goes).

Why our own kernel: a GRPO rollout decodes 64 sequences at a time, and there vLLM's Hopper
Machete kernel and Marlin are no faster than bf16 (H200, 7B shape, all layers of one step at
M=64: bf16 3.54 ms, Machete 3.49, Marlin 3.81; 2026-11-30), although 4-bit weights are a quarter
of the bytes. At M=64 a 4-bit GEMM is bound by the dequantisation and the MMA, not by memory;
this kernel keeps both small:

* **Either operand order.** ``swap=True`` computes ``out.T = W.T-tile @ x.T`` (output features on
  the MMA's wide side, tokens on its narrow side); ``swap=False`` the plain ``x @ W.T`` tile. The
  H200 sweep found the plain order faster almost everywhere, so it is the default.
* **Scales per tile.** ``BLOCK_K`` divides the quantisation group, so a K tile reads one row of
  scales and zero points (two vectors), and each weight costs a shift, a mask and one FMA.
* **Split-K** when the output has too few tiles to fill the GPU (``down_proj``: 3584 outputs,
  18944 inputs): programs write fp32 partial sums that a second small kernel adds (with the bias)
  in a fixed order, so results do not depend on scheduling.

Layout (trainserve int4, "GPTQ order"): ``qweight`` ``(K // 8, N)`` int32, value ``k % 8`` of word
``(k // 8, n)`` at bits ``4 (k % 8)`` (:func:`trainserve.kernels.machete_layout.pack_rows_gptq`);
``scales`` and ``zf = -scale * zero`` ``(K // group, N)`` in the activation dtype; the weight is
``w[k, n] = q * scales[k // g, n] + zf[k // g, n]``. These are the bytes Machete's packer reads
before it shuffles them, so a column range of a fused layer is a plain strided view for the trainer.

The kernel is wrapped as the custom op ``trainserve::w4a16_linear`` so vLLM's ``torch.compile``
sees one opaque call (the launch configuration depends on the concrete batch size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trainserve.kernels._triton_utils import HAS_TRITON, device_sm_count, tl, triton, use_triton
from trainserve.kernels.machete_layout import apply_group_affine, unpack_rows_gptq

if HAS_TRITON:

    @triton.jit
    def _dequant_tile(qw_ptrs, SC, ZF, rn, rk, k0, stride_qk, stride_sg, stride_zg, GROUP: tl.constexpr,
                      N_AXIS: tl.constexpr, DTYPE: tl.constexpr):
        """One K tile of the weight, dequantised: ``(BLOCK_N, BLOCK_K)`` when the output features run
        along axis 0 of ``qw_ptrs``, else ``(BLOCK_K, BLOCK_N)``; the tile lies in one group."""
        s = tl.load(SC + (k0 // GROUP) * stride_sg + rn).to(tl.float32)
        z = tl.load(ZF + (k0 // GROUP) * stride_zg + rn).to(tl.float32)
        words = tl.load(qw_ptrs + (k0 // 8) * stride_qk)
        if N_AXIS == 0:
            q = ((words >> ((rk % 8) * 4)[None, :]) & 15).to(tl.float32)
            w = q * s[:, None] + z[:, None]
        else:
            q = ((words >> ((rk % 8) * 4)[:, None]) & 15).to(tl.float32)
            w = q * s[None, :] + z[None, :]
        return w.to(DTYPE)

    @triton.jit
    def _w4a16_kernel(
        X, QW, SC, ZF, B, OUT, M, N, K, TILES_PER_SPLIT,
        stride_xm, stride_qk, stride_sg, stride_zg, stride_os, stride_om,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, SWAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        # N is a whole number of tiles (no mask along the contiguous axis, so loads vectorise)
        rn = tl.max_contiguous(tl.multiple_of(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), BLOCK_N), BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        t0 = pid_s * TILES_PER_SPLIT
        t1 = tl.minimum(t0 + TILES_PER_SPLIT, K // BLOCK_K)
        if SWAP:  # out.T tile (BLOCK_N, BLOCK_M) = W.T tile @ x.T tile
            qw_ptrs = QW + rn[:, None] + (rk // 8)[None, :] * stride_qk
            x_ptrs = X + rm[None, :] * stride_xm + rk[:, None]
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for t in range(t0, t1):
                w = _dequant_tile(qw_ptrs, SC, ZF, rn, rk, t * BLOCK_K, stride_qk, stride_sg, stride_zg,
                                  GROUP, 0, X.dtype.element_ty)
                x = tl.load(x_ptrs + t * BLOCK_K, mask=m_ok[None, :], other=0.0)
                acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                acc += tl.load(B + rn).to(tl.float32)[:, None]
            out_ptrs = OUT + pid_s.to(tl.int64) * stride_os + rm[None, :] * stride_om + rn[:, None]
            tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=m_ok[None, :])
        else:  # out tile (BLOCK_M, BLOCK_N) = x tile @ W.T tile
            qw_ptrs = QW + rn[None, :] + (rk // 8)[:, None] * stride_qk
            x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for t in range(t0, t1):
                w = _dequant_tile(qw_ptrs, SC, ZF, rn, rk, t * BLOCK_K, stride_qk, stride_sg, stride_zg,
                                  GROUP, 1, X.dtype.element_ty)
                x = tl.load(x_ptrs + t * BLOCK_K, mask=m_ok[:, None], other=0.0)
                acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                acc += tl.load(B + rn).to(tl.float32)[None, :]
            out_ptrs = OUT + pid_s.to(tl.int64) * stride_os + rm[:, None] * stride_om + rn[None, :]
            tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None])

    @triton.jit
    def _sum_splits_kernel(P, B, OUT, MN, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(P + s * MN.to(tl.int64) + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(B + offs % N, mask=ok, other=0.0).to(tl.float32)
        tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration: tile sizes, K splits, warps and pipeline stages."""

    block_n: int
    block_m: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    swap: bool = False


def pick_config(m: int, n: int, k: int, group_size: int, sm_count: int) -> GemmConfig:
    """The launch configuration for an ``(m, k) @ (k, n)`` product.

    The pattern of the H200 sweep's winners (``scripts/tune_w4a16.py``, 7B shape): the plain operand
    order, 3 stages, K tiles of a whole 64-group, token tiles following the batch, 128-wide output
    tiles on 8 warps above 32 tokens (64-wide on 4 warps below), and K split until there are about
    four programs per multiprocessor (at most 8 splits). Any configuration computes the same sums.
    """
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_k = 64 if group_size % 64 == 0 and k % 64 == 0 else 32
    wide = m > 32 and n % 128 == 0
    block_n, warps = (128, 8) if wide else (64, 4)
    tiles = n // block_n * -(-m // block_m)
    k_tiles = k // block_k
    split = 1
    while split < 8 and tiles * split < 4 * sm_count and k_tiles // (split * 2) >= 4:
        split *= 2
    return GemmConfig(block_n=block_n, block_m=block_m, block_k=block_k, split_k=split, num_warps=warps,
                      num_stages=3, swap=False)


def check_w4a16_shape(k: int, n: int, group_size: int, what: str = "weight") -> None:
    """Raise unless the kernel can tile this layer (``K`` whole groups, groups whole K tiles)."""
    if group_size % 32 or k % group_size:
        raise ValueError(f"{what}: the 4-bit GEMM needs in_features ({k}) to be whole groups of {group_size}, "
                         f"and groups a multiple of 32")
    if n % 64:
        raise ValueError(f"{what}: the 4-bit GEMM needs out_features % 64 == 0, got {n}")


def check_w4_tensors(qweight: torch.Tensor, scales: torch.Tensor, zf: torch.Tensor, group_size: int,
                     k: int | None = None) -> None:
    """Raise unless ``qweight``/``scales``/``zf`` form one 4-bit layer of ``k`` inputs (``k`` defaults
    to what ``qweight`` holds) that the kernels can tile."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"4-bit weights: qweight must be 2-D int32 words, got {qweight.dtype} {tuple(qweight.shape)}")
    k_words, n = qweight.shape[0] * 8, qweight.shape[1]
    k = k_words if k is None else k
    check_w4a16_shape(k, n, group_size)
    if k_words != k or scales.shape != (k // group_size, n) or zf.shape != scales.shape:
        raise ValueError(f"4-bit weights: {k} inputs, qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}, "
                         f"zf {tuple(zf.shape)}, group {group_size}: shapes disagree")


def dequantize_w4_reference(qweight: torch.Tensor, scales: torch.Tensor, zf: torch.Tensor, group_size: int,
                            dtype: torch.dtype) -> torch.Tensor:
    """``(K, N)`` dense weight ``q * s + zf`` (``W.t()`` of the ``nn.Linear`` weight), in plain torch."""
    return apply_group_affine(unpack_rows_gptq(qweight), scales, zf, group_size, dtype)


def w4a16_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zf: torch.Tensor,
                           group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.t() + bias`` through the torch dequantisation, fp32 accumulation."""
    w_t = dequantize_w4_reference(qweight, scales, zf, group_size, torch.float32)
    out = x.float() @ w_t
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def w4a16_matmul(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zf: torch.Tensor,
                 group_size: int, bias: torch.Tensor | None = None,
                 config: GemmConfig | None = None) -> torch.Tensor:
    """``x2 @ W.t() + bias`` for a 2-D ``x2``: the Triton kernel on CUDA, the reference elsewhere.

    ``config`` overrides :func:`pick_config` (for sweeps); every configuration gives the same result
    up to the order of fp32 additions.
    """
    m, k = x2.shape
    n = qweight.shape[1]
    check_w4_tensors(qweight, scales, zf, group_size, k)
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"4-bit GEMM: bias has shape {tuple(bias.shape)}, the layer {n} outputs")
    if not use_triton(x2, qweight):
        return w4a16_linear_reference(x2, qweight, scales, zf, group_size, bias)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if qweight.stride(1) != 1 or scales.stride(1) != 1 or zf.stride(1) != 1:
        raise ValueError("4-bit GEMM: qweight, scales and zf must be contiguous along N")
    cfg = config or pick_config(m, n, k, group_size, device_sm_count(x2.device))
    if group_size % cfg.block_k or k % cfg.block_k or n % cfg.block_n:
        raise ValueError(f"4-bit GEMM: BLOCK_K {cfg.block_k} must divide the group ({group_size}) and K ({k}), "
                         f"BLOCK_N {cfg.block_n} must divide N ({n})")
    k_tiles = k // cfg.block_k
    per_split = -(-k_tiles // cfg.split_k)
    splits = -(-k_tiles // per_split)
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    dest = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), splits)
    has_bias = bias is not None and splits == 1
    _w4a16_kernel[grid](
        x2, qweight, scales, zf, bias if has_bias else out, dest, m, n, k, per_split,
        x2.stride(0), qweight.stride(0), scales.stride(0), zf.stride(0), m * n, n,
        GROUP=group_size, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, HAS_BIAS=has_bias,
        SWAP=cfg.swap, DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            dest, bias if bias is not None else out, out, m * n, n, SPLITS=splits, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=4)
    return out


@torch.library.custom_op("trainserve::w4a16_linear", mutates_args=())
def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zf: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """``x @ W.t() + bias`` for any leading shape of ``x`` (the engine's entry point)."""
    out = w4a16_matmul(x.reshape(-1, x.shape[-1]), qweight, scales, zf, group_size, bias)
    return out.view(*x.shape[:-1], qweight.shape[1])


@w4a16_linear.register_fake
def _(x, qweight, scales, zf, bias, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))
