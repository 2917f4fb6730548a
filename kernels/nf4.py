"""NF4 dequantisation in bitsandbytes' layout, with a pure-torch reference and quantiser.

Layout (bitsandbytes ``quantize_4bit(..., quant_type="nf4")``): the weight is flattened row-major;
byte ``i`` of the packed uint8 tensor holds element ``2i`` in its high nibble and ``2i+1`` in its
low nibble; each nibble indexes the 16-entry NF4 code table. Every ``blocksize`` consecutive
elements share one fp32 ``absmax``. With double quantisation (``nested``) ``absmax`` is stored as
uint8 codes into ``state2.code`` (a 256-entry signed table), scaled per ``state2.blocksize`` (256)
codes by ``state2.absmax`` and shifted by ``offset``:
``absmax[j] = state2.code[absmax_q[j]] * state2.absmax[j // 256] + offset``.

The quant-state interface is duck-typed on bitsandbytes' ``QuantState``: attributes ``absmax``,
``shape``, ``blocksize``, ``code``, ``dtype``, ``offset``, ``state2`` (and ``nested``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from trainserve.kernels._triton_utils import HAS_TRITON, tl, triton, use_triton

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass
class NF4QuantState:
    """Minimal stand-in for bitsandbytes' ``QuantState`` (only what dequantisation reads)."""

    absmax: torch.Tensor
    shape: torch.Size
    blocksize: int
    code: torch.Tensor
    dtype: torch.dtype
    offset: torch.Tensor | None = None
    state2: NF4QuantState | None = None
    quant_type: str = "nf4"

    @property
    def nested(self) -> bool:
        return self.state2 is not None


def nf4_code_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values as fp32 on ``device``."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def signed_dynamic_code() -> torch.Tensor:
    """A 256-entry signed dynamic-exponent table (the kind bitsandbytes uses for nested absmax).

    Exponent level ``e`` (0..6) covers magnitudes ``10**(e-6) * [0.1, 1]`` with ``2**e`` evenly
    spaced fraction bins (their centres); both signs, plus 0 and 1: 2*127 + 2 = 256 values.
    """
    values: list[float] = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float64)
        centres = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)).tolist()
        values += centres + [-c for c in centres]
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the ascending table ``code`` for each element of ``x``."""
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids.to(x.device, x.dtype))


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, (-n) % blocksize))
    blocks = padded.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    return blocks, absmax


def quantize_nf4_reference(
    w: torch.Tensor, blocksize: int = 64, compress_statistics: bool = False
) -> tuple[torch.Tensor, NF4QuantState]:
    """Quantise ``w`` to NF4 in bitsandbytes' layout; returns ``(packed ((n+1)//2, 1) uint8, state)``."""
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    blocks, absmax = _blockwise_absmax(flat, blocksize)
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    code = nf4_code_table(w.device)
    idx = _nearest_code(normed, code).reshape(-1)[:n].to(torch.uint8)
    if n % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    packed = ((idx[0::2] << 4) | idx[1::2]).reshape(-1, 1)
    state = NF4QuantState(absmax=absmax, shape=w.shape, blocksize=blocksize, code=code, dtype=w.dtype)
    if compress_statistics:
        offset = absmax.mean()
        centred = absmax - offset
        blocks2, absmax2 = _blockwise_absmax(centred, 256)
        code2 = signed_dynamic_code().to(w.device)
        normed2 = blocks2 / torch.where(absmax2 > 0, absmax2, torch.ones_like(absmax2))[:, None]
        q2 = _nearest_code(normed2, code2).reshape(-1)[: absmax.numel()].to(torch.uint8)
        state2 = NF4QuantState(
            absmax=absmax2, shape=centred.shape, blocksize=256, code=code2, dtype=torch.float32
        )
        state = NF4QuantState(
            absmax=q2, shape=w.shape, blocksize=blocksize, code=code, dtype=w.dtype,
            offset=offset, state2=state2,
        )
    return packed, state


def _table(qs: Any, device: torch.device) -> torch.Tensor:
    code = getattr(qs, "code", None)
    if code is None or code.numel() != 16:
        return nf4_code_table(device)
    return code.to(device=device, dtype=torch.float32)


def nf4_absmax_reference(qs: Any) -> torch.Tensor:
    """The fp32 per-block absmax, undoing double quantisation if the state is nested."""
    state2 = getattr(qs, "state2", None)
    if state2 is None:
        return qs.absmax.float()
    idx = torch.arange(qs.absmax.numel(), device=qs.absmax.device) // state2.blocksize
    scaled = state2.code.float()[qs.absmax.long()] * state2.absmax.float()[idx]
    return scaled + torch.as_tensor(qs.offset, dtype=torch.float32, device=scaled.device)


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.contiguous().view(torch.uint8)


def dequantize_nf4_reference(
    packed: torch.Tensor, quant_state: Any, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Pure-torch NF4 dequantisation to ``quant_state.shape`` in ``out_dtype`` (default: state dtype)."""
    raw = _as_bytes(packed)
    shape = torch.Size(quant_state.shape)
    n = math.prod(shape)
    codes = torch.stack([raw >> 4, raw & 0xF], dim=-1).reshape(-1)[:n].long()
    absmax = nf4_absmax_reference(quant_state).to(raw.device)
    block = torch.arange(n, device=raw.device) // quant_state.blocksize
    vals = _table(quant_state, raw.device)[codes] * absmax[block]
    return vals.to(out_dtype or quant_state.dtype).reshape(shape)


if HAS_TRITON:

    @triton.jit
    def _nf4_dequant_kernel(
        OUT, PACKED, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, n,
        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr,
    ):
        _nf4_block(OUT, PACKED, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, n, tl.program_id(0),
                   BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK)

    @triton.jit
    def _nf4_dequant3_kernel(
        OUT, P0, A0, C0, B0, D0, O0, n0, P1, A1, C1, B1, D1, O1, n1, P2, A2, C2, B2, D2, O2, n2,
        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Up to three weights into consecutive row blocks of OUT (n2 = 0 for two)."""
        pid = tl.program_id(0)
        nb0 = tl.cdiv(n0, BLOCK)
        nb1 = tl.cdiv(n1, BLOCK)
        if pid < nb0:
            _nf4_block(OUT, P0, A0, C0, B0, D0, O0, n0, pid, BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK)
        elif pid < nb0 + nb1:
            _nf4_block(OUT + n0, P1, A1, C1, B1, D1, O1, n1, pid - nb0, BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK)
        else:
            _nf4_block(OUT + n0 + n1, P2, A2, C2, B2, D2, O2, n2, pid - nb0 - nb1,
                       BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK)

    @triton.jit
    def _nf4_block(
        OUT, PACKED, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, n, pid,
        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        byte = tl.load(PACKED + offs // 2, mask=mask, other=0).to(tl.int32)
        shift = (1 - (offs % 2).to(tl.int32)) * 4
        q = (byte >> shift) & 0xF
        v = tl.load(CODE + q, mask=mask, other=0.0)
        blk = offs // BLOCKSIZE
        if NESTED:
            aq = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.int32)
            scale2 = tl.load(ABSMAX2 + blk // BLOCKSIZE2, mask=mask, other=0.0)
            a = tl.load(CODE2 + aq, mask=mask, other=0.0) * scale2 + tl.load(OFFSET)
        else:
            a = tl.load(ABSMAX + blk, mask=mask, other=0.0)
        tl.store(OUT + offs, (v * a).to(OUT.dtype.element_ty), mask=mask)


_BLOCK = 2048


def _prepared(quant_state: Any, dev: torch.device) -> tuple:
    """Launch arguments derived from a quant state, cached on it (the state's tensors never change
    in place; the cache is dropped if ``absmax`` is replaced)."""
    key = (quant_state.absmax.data_ptr(), str(dev))
    cached = getattr(quant_state, "_trainserve_nf4_args", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    code = _table(quant_state, dev)
    state2 = getattr(quant_state, "state2", None)
    if state2 is not None:
        absmax = quant_state.absmax
        absmax2 = state2.absmax.to(dtype=torch.float32)
        code2 = state2.code.to(dtype=torch.float32)
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=dev).reshape(1)
        bs2 = int(state2.blocksize)
    else:
        absmax = quant_state.absmax.to(dtype=torch.float32)
        absmax2 = code2 = offset = absmax
        bs2 = 1
    shape = torch.Size(quant_state.shape)
    args = (shape, math.prod(shape), code, absmax, absmax2, code2, offset, int(quant_state.blocksize), bs2,
            state2 is not None)
    try:
        quant_state._trainserve_nf4_args = (key, args)
    except AttributeError:  # a state that takes no attributes: no cache
        pass
    return args


def dequantize_nf4_triton(
    packed: torch.Tensor, quant_state: Any, out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton NF4 dequantisation (one launch, double quantisation fused). ``out``: a contiguous
    tensor of the state's element count to write into (e.g. a row slice of a fused weight)."""
    raw = _as_bytes(packed)
    dev = raw.device
    shape, n, code, absmax, absmax2, code2, offset, bs, bs2, nested = _prepared(quant_state, dev)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype or quant_state.dtype, device=dev)
    elif out.numel() != n or not out.is_contiguous():
        raise ValueError("out must be contiguous with as many elements as the quantised weight")
    if n:
        _nf4_dequant_kernel[(triton.cdiv(n, _BLOCK),)](
            out, raw, absmax, code, absmax2, code2, offset, n,
            BLOCKSIZE=bs, BLOCKSIZE2=bs2, NESTED=nested, BLOCK=_BLOCK, num_warps=4,
        )
    return out


def dequantize_nf4_many(
    weights: list[tuple[torch.Tensor, Any]], dtype: torch.dtype, out: torch.Tensor
) -> torch.Tensor:
    """Dequantise 1-3 NF4 weights of one ``in`` size into consecutive row blocks of ``out``
    (contiguous, ``(sum of rows, in)``): one launch on CUDA when their states are alike."""
    preps = [_prepared(qs, out.device) for _, qs in weights] if use_triton(out) else []
    alike = len(preps) in (2, 3) and all(p[7:] == preps[0][7:] for p in preps)
    if not alike:
        row = 0
        for packed, qs in weights:
            rows = int(qs.shape[0])
            dequantize_nf4(packed, qs, dtype, out=out[row : row + rows])
            row += rows
        return out
    flat: list[Any] = []
    for (packed, _), (_, n, code, absmax, absmax2, code2, offset, *_r) in zip(weights, preps, strict=True):
        flat += [_as_bytes(packed), absmax, code, absmax2, code2, offset, n]
    if len(preps) == 2:
        flat += flat[:6] + [0]
    total = sum(p[1] for p in preps)
    if total != out.numel() or not out.is_contiguous():
        raise ValueError("out must be contiguous with the weights' total element count")
    grid = (sum(triton.cdiv(p[1], _BLOCK) for p in preps),)
    _nf4_dequant3_kernel[grid](
        out, *flat, BLOCKSIZE=preps[0][7], BLOCKSIZE2=preps[0][8], NESTED=preps[0][9], BLOCK=_BLOCK,
        num_warps=4,
    )
    return out


def dequantize_nf4(
    packed: torch.Tensor, quant_state: Any, out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """NF4 weight to a dense ``quant_state.shape`` tensor: Triton on CUDA, torch elsewhere.
    With ``out`` the values are written there (and ``out`` is returned)."""
    qt = getattr(quant_state, "quant_type", "nf4")
    if qt != "nf4":
        raise NotImplementedError(f"only NF4 is supported, got quant_type={qt!r}")
    if use_triton(packed):
        return dequantize_nf4_triton(packed, quant_state, out_dtype, out)
    w = dequantize_nf4_reference(packed, quant_state, out_dtype if out is None else out.dtype)
    if out is None:
        return w
    return out.copy_(w.reshape(out.shape))


def quantize_linear_nf4_(
    linear: torch.nn.Module, blocksize: int = 64, compress_statistics: bool = True
) -> None:
    """Replace ``linear.weight`` in place by its NF4 form: a frozen uint8 Parameter in
    bitsandbytes' layout carrying ``.quant_state``. Only the fused LoRA paths can run such a
    layer; this exists to test and benchmark the 4-bit path where bitsandbytes is not installed."""
    packed, qs = quantize_nf4_reference(linear.weight.data, blocksize, compress_statistics)
    del linear.weight
    param = torch.nn.Parameter(packed, requires_grad=False)
    param.quant_state = qs
    linear.weight = param
