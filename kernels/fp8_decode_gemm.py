"""FP8 GEMM for decode-sized batches (Triton): per-token FP8 activations × per-channel FP8 weights.

Why our own kernel: a GRPO rollout decodes ~64 sequences at a time, and there every linear layer is
a weight stream. FP8 weights are half of bf16's bytes, yet vLLM's CUTLASS ``cutlass_scaled_mm``
read them at ~2.2–2.9 TB/s on an H200 at M=64 (7B shapes, 2026-11-30: ``down_proj`` 31 µs for 68 MB,
``gate_up`` 46 µs for 136 MB), against ~4 TB/s that a weight stream can reach. Two reasons: its
tiles put the 64 tokens on the MMA's wide side, and ``down_proj`` (3,584 outputs, 18,944 inputs)
has too few output tiles to occupy 132 multiprocessors without splitting K.

This kernel computes the same product, ``out = (x_q @ w_q.T) * x_scale * w_scale (+ bias)``, for
``M <= 128`` tokens:

* **Operands swapped.** Each program owns ``BLOCK_N`` output features and all tokens: the weight
  tile ``(BLOCK_N, BLOCK_K)`` is the MMA's wide operand and the tokens its narrow one, so no
  tensor-core work is spent on padding rows when M is small.
* **Split-K** when the output has too few tiles to fill the GPU: programs write fp32 partial
  sums and a second small kernel adds them in a fixed order (then scales, adds the bias and
  casts), so results do not depend on scheduling.
* Same inputs as the CUTLASS path: activations quantised per token by
  :func:`trainserve.kernels.fp8_activations.quantize_activations` (vLLM's rule, bit for bit), the
  engine's FP8 weight ``(N, K)`` row-major (vLLM keeps its transpose; no copy) and its fp32 scale
  per output row. Only the order of fp32 additions differs.

:func:`fp8_decode_matmul_reference` is the torch reference; :func:`fp8_decode_linear` is the entry
point (quantise, then the kernel on CUDA, the reference elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trainserve.kernels._triton_utils import HAS_TRITON, device_sm_count, tl, triton, use_triton
from trainserve.kernels.fp8_activations import E4M3, quantize_activations

MAX_M = 128  # largest token count the kernel takes (one token tile); larger batches use other GEMMs
SMEM_BYTES = 196 * 1024  # pipeline buffers the launch configuration may use (H100/H200: 227 KB per block)

if HAS_TRITON:

    @triton.jit
    def _fp8_swapped_kernel(
        XQ, XS, W, WS, B, OUT, M, N, K, K_SPLIT,
        stride_xm, stride_wn, stride_ps, stride_om,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        m_ok = rm < M
        k_lo = pid_s * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        w_ptrs = W + rn[:, None].to(tl.int64) * stride_wn + (k_lo + rk)[None, :]
        x_ptrs = XQ + rm[:, None] * stride_xm + (k_lo + rk)[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for _ in range(k_lo, k_hi, BLOCK_K):  # K is a whole number of K tiles (checked by the caller)
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            acc = tl.dot(w, tl.trans(x), acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        mask = n_ok[:, None] & m_ok[None, :]
        if PARTIAL:  # fp32 partial sums (M, N) of this K range; _finish_kernel adds them
            p_ptrs = OUT + pid_s.to(tl.int64) * stride_ps + rm[None, :] * N + rn[:, None]
            tl.store(p_ptrs, acc, mask=mask)
        else:
            ws = tl.load(WS + rn, mask=n_ok, other=0.0)
            xs = tl.load(XS + rm, mask=m_ok, other=0.0)
            out = acc * ws[:, None] * xs[None, :]
            if HAS_BIAS:
                out += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(OUT + rm[None, :] * stride_om + rn[:, None], out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _finish_kernel(P, XS, WS, B, OUT, MN, N, stride_om, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(P + s * MN.to(tl.int64) + offs, mask=ok, other=0.0)
        m = offs // N
        n = offs % N
        out = acc * tl.load(WS + n, mask=ok, other=0.0) * tl.load(XS + m, mask=ok, other=0.0)
        if HAS_BIAS:
            out += tl.load(B + n, mask=ok, other=0.0).to(tl.float32)
        tl.store(OUT + m * stride_om + n, out.to(OUT.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class Fp8GemmConfig:
    """One launch configuration: output tile, K tile, K splits, warps, pipeline stages."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def pick_config(m: int, n: int, k: int, sm_count: int) -> Fp8GemmConfig:
    """The launch configuration for ``m`` tokens through an ``(n, k)`` weight.

    Output tiles of 128 features (64 when that leaves fewer than one program per multiprocessor),
    K tiles of 256 where K allows, and K split until there are about two programs per
    multiprocessor, keeping at least four K tiles per program; pipeline stages as many as fit
    in shared memory (at most 4).
    """
    block_k = next((b for b in (256, 128, 64, 32) if k % b == 0), 16)
    block_n = 128 if -(-n // 128) >= sm_count else 64
    tiles = -(-n // block_n)
    k_tiles = k // block_k
    split = 1
    while split < 16 and tiles * split < 2 * sm_count and k_tiles // (split * 2) >= 4:
        split *= 2
    block_m = max(16, 1 << (max(m, 1) - 1).bit_length())
    stages = 4
    while stages > 2 and stages * (block_n + block_m) * block_k > SMEM_BYTES:
        stages -= 1
    return Fp8GemmConfig(block_n=block_n, block_k=block_k, split_k=split, num_warps=4, num_stages=stages)


def supported(m: int, n: int, k: int) -> str | None:
    """None when the kernel takes this product, else why not."""
    if m > MAX_M:
        return f"{m} tokens (the decode kernel takes at most {MAX_M})"
    if k % 16 or n % 16:
        return f"weight ({n}, {k}) is not a multiple of 16 in both dims"
    return None


def fp8_decode_matmul_reference(xq: torch.Tensor, x_scale: torch.Tensor, w_nk: torch.Tensor, w_scale: torch.Tensor,
                                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``(xq @ w_nk.T) * x_scale * w_scale (+ bias)``: FP8 values are exact in fp32, fp32 sums."""
    acc = xq.float() @ w_nk.float().t()
    out = acc * x_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_decode_matmul(xq: torch.Tensor, x_scale: torch.Tensor, w_nk: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype,
                      config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """The product of already-quantised operands: ``xq`` ``(M, K)`` e4m3 with ``x_scale`` ``(M, 1)``
    fp32, ``w_nk`` ``(N, K)`` e4m3 (K contiguous) with ``w_scale`` (N values, fp32); the Triton
    kernel where :func:`supported` and Triton run, the reference elsewhere. ``config`` overrides
    :func:`pick_config` (for sweeps)."""
    m, k = xq.shape
    n = w_nk.shape[0]
    if w_nk.shape[1] != k or xq.dtype != E4M3 or w_nk.dtype != E4M3:
        raise ValueError(f"fp8_decode_matmul: x {tuple(xq.shape)} {xq.dtype} and weight {tuple(w_nk.shape)} "
                         f"{w_nk.dtype} must be e4m3 with the same K")
    if supported(m, n, k) is not None or not use_triton(xq, w_nk) or m == 0:
        return fp8_decode_matmul_reference(xq, x_scale, w_nk, w_scale, bias, out_dtype)
    if xq.stride(1) != 1:
        xq = xq.contiguous()
    if w_nk.stride(1) != 1:
        raise ValueError("fp8_decode_matmul: the weight must have K contiguous")
    cfg = config or pick_config(m, n, k, device_sm_count(xq.device))
    block_k = cfg.block_k
    if k % block_k:
        raise ValueError(f"fp8_decode_matmul: K={k} is not a whole number of K tiles of {block_k}")
    k_tiles = k // block_k
    split = max(1, min(cfg.split_k, k_tiles))
    k_split = -(-k_tiles // split) * block_k
    split = -(-k // k_split)  # no empty splits
    block_m = max(16, triton.next_power_of_2(m))
    xs = x_scale.reshape(-1).float().contiguous()
    ws = w_scale.reshape(-1).float().contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    b = bias if bias is not None else ws
    grid = (triton.cdiv(n, cfg.block_n), split)
    if split == 1:
        _fp8_swapped_kernel[grid](xq, xs, w_nk, ws, b, out, m, n, k, k_split, xq.stride(0), w_nk.stride(0), 0,
                                  out.stride(0), BLOCK_N=cfg.block_n, BLOCK_M=block_m, BLOCK_K=block_k,
                                  PARTIAL=False, HAS_BIAS=bias is not None, num_warps=cfg.num_warps,
                                  num_stages=cfg.num_stages)
        return out
    partial = torch.empty((split, m, n), dtype=torch.float32, device=xq.device)
    _fp8_swapped_kernel[grid](xq, xs, w_nk, ws, b, partial, m, n, k, k_split, xq.stride(0), w_nk.stride(0),
                              partial.stride(0), 0, BLOCK_N=cfg.block_n, BLOCK_M=block_m, BLOCK_K=block_k,
                              PARTIAL=True, HAS_BIAS=False, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    block = 1024
    _finish_kernel[(triton.cdiv(m * n, block),)](partial, xs, ws, b, out, m * n, n, out.stride(0), SPLITS=split,
                                                 HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


def fp8_decode_linear(x2: torch.Tensor, w_nk: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 @ (w_nk * w_scale).T + bias`` with ``x2`` rounded to FP8 per token, as vLLM's
    per-channel FP8 layers compute it; in ``x2``'s dtype."""
    xq, xs = quantize_activations(x2, "token")
    return fp8_decode_matmul(xq, xs, w_nk, w_scale, bias, x2.dtype)
