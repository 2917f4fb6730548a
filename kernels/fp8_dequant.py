"""FP8 (e4m3) weights with per-tensor, per-channel or 128×128 block scales: the trainer's view.

vLLM's online FP8 methods quantise the 16-bit checkpoint while loading and keep ``weight`` in
FP8 plus fp32 scales; the engine runs FP8 GEMMs on them. The trainer reads the same bytes and
dequantises right before each GEMM that needs a dense weight (the backward's, and block layouts'
forward). That dequantisation is one Triton pass (:func:`dequantize_fp8`: read FP8, multiply by the
row/block/tensor scale in fp32, write 16-bit). Torch's ``w.to(bf16) * s`` takes two passes, and its
FP8 conversion runs an unvectorised copy kernel: on an H200 the two took ~245 ms of a 2.2 s 7B GRPO
training step. As for the integer formats, ``dequantize_t`` returns the weight transposed,
``(in, out)``.

The engine's FP8 GEMMs also round their *inputs* to FP8 (W8A8, see :mod:`.fp8_activations`), so
the state does its own GEMMs (``own_matmuls``): the forward rounds activations as the engine does
— and with per-channel scales runs the same row-wise scaled FP8 GEMM — and the backward multiplies
by the dequantised weight, straight through the rounding.
"""

from __future__ import annotations

import torch
from trainserve.kernels._triton_utils import HAS_TRITON, tl, triton, use_triton
from trainserve.kernels.fp8_activations import fp8_rowwise_matmul, round_activations
from trainserve.kernels.packed_state import PackedWeightState

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, n))
SCALE_KINDS = ("tensor", "channel", "block")
#: how vLLM's online FP8 method for each weight-scale kind quantises the GEMM input
ENGINE_ACTIVATIONS = {"tensor": "tensor", "channel": "token", "block": "group"}


class FP8QuantState(PackedWeightState):
    """Output rows ``[n0, n1)`` of an engine layer's FP8 weight ``w_nk`` (``(N, K)``) and its scales.

    ``scale``: a single value (``tensor``), one per output row (``channel``, shape ``(N, 1)`` or
    ``(N,)``), or one per ``block × block`` tile (``block``, shape ``(ceil(N/block), ceil(K/block))``).
    ``activations``: how the engine rounds GEMM inputs (``"engine"``: the kind's vLLM scheme, see
    :data:`ENGINE_ACTIVATIONS`; None: not at all, a weight-only FP8 engine).
    """

    def __init__(self, w_nk: torch.Tensor, scale: torch.Tensor, kind: str, n0: int, n1: int,
                 dtype: torch.dtype, block: int = 128, activations: str | None = "engine"):
        if kind not in SCALE_KINDS:
            raise ValueError(f"unknown FP8 scale kind {kind!r}")
        if w_nk.dtype not in FP8_DTYPES:
            raise ValueError(f"expected an FP8 weight, got {w_nk.dtype}")
        k = w_nk.shape[1]
        if kind == "block" and (n0 % block or k % block):
            raise ValueError(f"FP8 block scales need rows starting at a multiple of {block} and K % {block} == 0 "
                             f"(got rows {n0}:{n1}, K={k})")
        self.parent_w, self.parent_scale, self.kind, self.n0, self.n1, self.block = w_nk, scale, kind, n0, n1, block
        self.w = w_nk[n0:n1]
        self.shape = torch.Size((n1 - n0, k))
        self.dtype = dtype
        self.activations = ENGINE_ACTIVATIONS[kind] if activations == "engine" else activations
        if self.activations == "group" and k % 128:
            raise ValueError(f"per-group FP8 activations need K % 128 == 0, got K={k}")
        self.own_matmuls = self.activations is not None

    def round_input(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2`` as the engine rounds it before this GEMM (unchanged without activation rounding)."""
        return x2 if self.activations is None else round_activations(x2, self.activations)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.activations == "token" and self.kind == "channel":
            return fp8_rowwise_matmul(x2, self.w, self._scale())
        return self.round_input(x2) @ self.dequantize_t(x2.dtype)

    def grad_matmul(self, dout: torch.Tensor) -> torch.Tensor:
        return dout @ self.dequantize(dout.dtype)

    def _scale(self) -> torch.Tensor:
        s = self.parent_scale
        if self.kind == "tensor":
            return s.reshape(())
        if self.kind == "channel":
            return s.reshape(-1, 1)[self.n0:self.n1]
        return s[self.n0 // self.block: -(-self.n1 // self.block)]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight ``(N, K)`` of ``dtype``: ``q * scale`` computed in fp32, then rounded."""
        return dequantize_fp8(self.w, self._scale(), self.kind, dtype, self.block)

    def dequantize_t(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        w_t = self.dequantize(dtype).t()
        return w_t if out is None else out.copy_(w_t)

    def merge(self, others: list[PackedWeightState]) -> PackedWeightState | None:
        end = self.n1
        for o in others:
            if not isinstance(o, FP8QuantState) or o.parent_w is not self.parent_w or o.n0 != end:
                return None
            end = o.n1
        return FP8QuantState(self.parent_w, self.parent_scale, self.kind, self.n0, end, self.dtype, self.block,
                             self.activations)

    def tensors(self) -> list[torch.Tensor]:
        return [self.w, self.parent_scale]


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype,
                   block: int = 128) -> torch.Tensor:
    """``w`` (FP8, ``(N, K)``) times its scales as ``dtype``: one Triton pass on CUDA, else the reference.

    ``scale``: shape ``()``/``(1,)`` (``tensor``), ``(N, 1)`` (``channel``) or
    ``(ceil(N / block), ceil(K / block))`` (``block``), fp32, as :meth:`FP8QuantState._scale` gives it.
    """
    if kind not in SCALE_KINDS:
        raise ValueError(f"unknown FP8 scale kind {kind!r}")
    if w.dim() == 2 and w.stride(1) == 1 and use_triton(w, scale):
        return _dequantize_triton(w, scale, kind, dtype, block)
    return dequantize_fp8_reference(w, scale, kind, dtype, block)


def dequantize_fp8_reference(w: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype,
                             block: int = 128) -> torch.Tensor:
    """Torch reference of :func:`dequantize_fp8`."""
    wf = w.float()
    s = scale.float()
    if kind == "block":
        n, k = w.shape
        s = s.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    elif kind == "channel":
        s = s.reshape(-1, 1)
    else:
        s = s.reshape(())
    return (wf * s).to(dtype)


if HAS_TRITON:

    @triton.jit
    def _dequant_kernel(W, S, OUT, n_rows, n_cols, sw, so, ss_row, ss_col,
                        ROWS_PER_SCALE: tl.constexpr, COLS_PER_SCALE: tl.constexpr,
                        BR: tl.constexpr, BC: tl.constexpr):
        rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        w = tl.load(W + rows[:, None] * sw + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s_ptr = S + (rows[:, None] // ROWS_PER_SCALE) * ss_row + (cols[None, :] // COLS_PER_SCALE) * ss_col
        s = tl.load(s_ptr, mask=mask, other=0.0)
        tl.store(OUT + rows[:, None] * so + cols[None, :], (w * s).to(OUT.dtype.element_ty), mask=mask)


def _dequantize_triton(w: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype,
                       block: int) -> torch.Tensor:
    n, k = w.shape
    s = scale.float()
    if kind == "block":
        s = s.contiguous()
        ss_row, ss_col, rows_per, cols_per = s.stride(0), s.stride(1), block, block
    elif kind == "channel":
        s = s.reshape(-1).contiguous()
        ss_row, ss_col, rows_per, cols_per = 1, 0, 1, 1
    else:
        s = s.reshape(1)
        ss_row, ss_col, rows_per, cols_per = 0, 0, 1, 1
    out = torch.empty((n, k), dtype=dtype, device=w.device)
    if n and k:
        br, bc = 16, 256
        _dequant_kernel[(triton.cdiv(n, br), triton.cdiv(k, bc))](
            w, s, out, n, k, w.stride(0), out.stride(0), ss_row, ss_col,
            ROWS_PER_SCALE=rows_per, COLS_PER_SCALE=cols_per, BR=br, BC=bc, num_warps=4)
    return out


def quantize_fp8_reference(w_nk: torch.Tensor, kind: str, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest FP8 e4m3 quantisation (for tests): ``(fp8 weight (N, K), fp32 scale)``."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    w = w_nk.float()
    if kind == "tensor":
        scale = (w.abs().amax() / fmax).clamp_min(1e-12).reshape(1)
        q = (w / scale).clamp(-fmax, fmax)
    elif kind == "channel":
        scale = (w.abs().amax(1, keepdim=True) / fmax).clamp_min(1e-12)
        q = (w / scale).clamp(-fmax, fmax)
    else:
        n, k = w.shape
        tiles = w.view(n // block, block, k // block, block)
        scale = (tiles.abs().amax((1, 3)) / fmax).clamp_min(1e-12)
        q = (tiles / scale[:, None, :, None]).clamp(-fmax, fmax).view(n, k)
    return q.to(torch.float8_e4m3fn), scale
