"""What the fused LoRA paths read from a projection, and how several projections become one.

:func:`get_lora_parameters` turns a peft ``LoraLayer`` (or a plain / bitsandbytes-4-bit linear)
into a :class:`LoraWeights`, or None when the fused path must not run. :func:`fused_weight`
concatenates the frozen weights of several projections of one input (q/k/v, or gate/up) into one
``(sum of out, in)`` matrix for a single GEMM: NF4 weights are dequantised straight into row
slices of one buffer, dense weights that are already adjacent row blocks of one tensor (vLLM's
fused qkv / gate_up) are used through a view, and only separate dense tensors are copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from trainserve.kernels.nf4 import dequantize_nf4, dequantize_nf4_many, dequantize_nf4_reference
from trainserve.kernels.packed_state import PackedWeightState
from trainserve.kernels.swiglu import swiglu_reference


@dataclass
class LoraWeights:
    """One projection: frozen base (dense or NF4), optional frozen bias, optional LoRA pair."""

    weight: torch.Tensor
    quant_state: Any = None
    bias: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None  # (r, in)
    lora_b: torch.Tensor | None = None  # (out, r)
    scaling: float = 1.0
    compute_dtype: torch.dtype | None = None  # activations are cast to it (None: keep theirs)

    @property
    def out_features(self) -> int:
        return int(self.quant_state.shape[0]) if self.quant_state is not None else self.weight.shape[0]

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[0]


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def get_lora_parameters(proj: nn.Module) -> LoraWeights | None:
    """Fusable parameters of ``proj``, or None when it must be called as a module.

    None for: adapters disabled or merged, several active adapters, LoRA variants (DoRA ...),
    dropout > 0 in training, a trainable base weight or bias, fan_in_fan_out, a LoRA-B bias,
    non-NF4 quantisation, or hooks on the base layer.
    """
    lora_a = lora_b = None
    scaling = 1.0
    base = proj
    if hasattr(proj, "base_layer") and hasattr(proj, "lora_A"):
        if proj.disable_adapters or proj.merged or getattr(proj, "fan_in_fan_out", False):
            return None
        active = proj.active_adapters
        if len(active) != 1:
            return None
        name = active[0]
        if name in getattr(proj, "lora_variant", {}) or getattr(proj, "use_dora", {}).get(name, False):
            return None
        if name in proj.lora_A:
            dropout = proj.lora_dropout[name] if name in proj.lora_dropout else None
            if dropout is not None and not isinstance(dropout, nn.Identity):
                if dropout.training and getattr(dropout, "p", 0.0) > 0:
                    return None
            lb = proj.lora_B[name]
            if lb.bias is not None:
                return None
            lora_a, lora_b = proj.lora_A[name].weight, lb.weight
            scaling = float(proj.scaling[name])
        base = proj.get_base_layer()
    if not isinstance(base, nn.Linear) or _has_hooks(base):
        return None
    weight = base.weight
    qs = getattr(weight, "quant_state", None)
    if qs is not None:
        if getattr(qs, "quant_type", "nf4") != "nf4":
            return None
        compute = getattr(base, "compute_dtype", None) or qs.dtype  # bitsandbytes' compute dtype
    elif weight.dim() != 2 or not weight.dtype.is_floating_point:
        return None
    else:
        compute = weight.dtype
    if weight.requires_grad:
        return None
    bias = base.bias
    if bias is not None and bias.requires_grad:
        return None
    return LoraWeights(weight, qs, bias, lora_a, lora_b, scaling, compute)


def dense_weight(p: LoraWeights, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The base weight as a dense ``(out, in)`` tensor of ``dtype`` (a temporary if converted)."""
    if isinstance(p.quant_state, PackedWeightState):
        w = p.quant_state.dequantize_t(dtype).t()  # a transposed view: GEMMs take it as it is
        return w if out is None else out.copy_(w)
    if p.quant_state is not None:
        return dequantize_nf4(p.weight, p.quant_state, dtype, out=out)
    w = _as(p.weight, dtype)
    return w if out is None else out.copy_(w)


def _adjacent_rows(ws: list[torch.Tensor]) -> bool:
    """Dense, contiguous, same storage, each starting where the previous one ends."""
    w0 = ws[0]
    if not all(w.is_contiguous() and w.dtype == w0.dtype and w.shape[1] == w0.shape[1] for w in ws):
        return False
    ptr = w0.untyped_storage().data_ptr()
    end = w0.storage_offset() + w0.numel()
    for w in ws[1:]:
        if w.untyped_storage().data_ptr() != ptr or w.storage_offset() != end:
            return False
        end += w.numel()
    return True


def fused_weight(ps: list[LoraWeights], dtype: torch.dtype) -> torch.Tensor:
    """``cat([W_i])`` as one ``(sum out_i, in)`` matrix of ``dtype`` (see the module docstring)."""
    if len(ps) == 1:
        return dense_weight(ps[0], dtype)
    if all(isinstance(p.quant_state, PackedWeightState) for p in ps):
        return _fused_packed([p.quant_state for p in ps], dtype)
    if all(p.quant_state is None for p in ps):
        ws = [p.weight for p in ps]
        if ws[0].dtype == dtype and _adjacent_rows(ws):
            rows = sum(w.shape[0] for w in ws)
            return ws[0].as_strided((rows, ws[0].shape[1]), (ws[0].shape[1], 1), ws[0].storage_offset())
        return torch.cat([_as(w, dtype) for w in ws])
    in_f = int(ps[0].quant_state.shape[1]) if ps[0].quant_state is not None else ps[0].weight.shape[1]
    buf = torch.empty((sum(p.out_features for p in ps), in_f), dtype=dtype, device=ps[0].weight.device)
    if all(p.quant_state is not None for p in ps) and len(ps) <= 3:
        return dequantize_nf4_many([(p.weight, p.quant_state) for p in ps], dtype, buf)
    row = 0
    for p in ps:
        dense_weight(p, dtype, out=buf[row : row + p.out_features])
        row += p.out_features
    return buf


def _fused_packed(states: list[PackedWeightState], dtype: torch.dtype) -> torch.Tensor:
    """Packed shards of one fused engine layer dequantise in one launch; others into column blocks
    of one ``(in, sum out)`` buffer. Returned as its ``(sum out, in)`` transposed view."""
    merged = states[0].merge(states[1:])
    if merged is not None:
        return merged.dequantize_t(dtype).t()
    in_f = int(states[0].shape[1])
    buf = torch.empty((in_f, sum(int(s.shape[0]) for s in states)), dtype=dtype, device=states[0].tensors()[0].device)
    col = 0
    for s in states:
        s.dequantize_t(dtype, out=buf[:, col: col + int(s.shape[0])])
        col += int(s.shape[0])
    return buf.t()


def _own_matmul_states(ps: list[LoraWeights]) -> list[PackedWeightState] | None:
    """The packed states of ``ps`` (merged into one where they can be) when their engine does more
    than ``x @ dequantised W`` (FP8 rounds its inputs), else None: then the caller's dense GEMM is exact."""
    states = [p.quant_state for p in ps]
    if not any(getattr(s, "own_matmuls", False) for s in states):
        return None
    if not all(isinstance(s, PackedWeightState) for s in states):
        raise TypeError("a projection group mixes FP8 engine weights with other formats")
    merged = states[0].merge(states[1:]) if len(states) > 1 else states[0]
    return [merged] if merged is not None else states


def engine_matmul(x2: torch.Tensor, ps: list[LoraWeights]) -> torch.Tensor | None:
    """``x2 @ cat([W_i]).T`` computed as the engine computes it, for groups whose states own their
    GEMMs (see :attr:`PackedWeightState.own_matmuls`); None for the others (use :func:`fused_weight`)."""
    states = _own_matmul_states(ps)
    if states is None:
        return None
    outs = [s.matmul(x2) for s in states]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def engine_matmul_free(ps: list[LoraWeights]) -> bool:
    """True when ``x @ dequantised W`` is exactly what the engine computes for every projection of ``ps``."""
    return not any(getattr(p.quant_state, "own_matmuls", False) for p in ps)


def engine_grad_matmul(dout: torch.Tensor, ps: list[LoraWeights]) -> torch.Tensor | None:
    """``dout @ cat([W_i])`` for the groups :func:`engine_matmul` handles; None for the others."""
    states = _own_matmul_states(ps)
    if states is None:
        return None
    if len(states) == 1:
        return states[0].grad_matmul(dout)
    dx, col = None, 0
    for s in states:
        width = int(s.shape[0])
        part = s.grad_matmul(dout[:, col: col + width])
        dx = part if dx is None else dx.add_(part)
        col += width
    return dx


def fused_bias(ps: list[LoraWeights], dtype: torch.dtype) -> torch.Tensor | None:
    """Concatenated biases (zeros for projections without one), or None when none has one."""
    if all(p.bias is None for p in ps):
        return None
    if len(ps) == 1:
        return _as(ps[0].bias, dtype)
    parts = [_as(p.bias, dtype) if p.bias is not None else
             torch.zeros(p.out_features, dtype=dtype, device=ps[0].weight.device) for p in ps]
    if _adjacent_rows([b.view(-1, 1) for b in parts]):
        return parts[0].as_strided((sum(b.numel() for b in parts),), (1,), parts[0].storage_offset())
    return torch.cat(parts)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def lora_linear_reference(x: torch.Tensor, p: LoraWeights) -> torch.Tensor:
    """Plain-autograd reference for one projection (dequantises with the torch reference). An
    engine that rounds its GEMM inputs (FP8) rounds the base GEMM's input, straight through; the
    LoRA term reads the input as it is, as vLLM's LoRA kernels do."""
    x_base = x
    if isinstance(p.quant_state, PackedWeightState):
        w = p.quant_state.dequantize_t(x.dtype).t()
        x_base = p.quant_state.round_input_straight_through(x)
    elif p.quant_state is not None:
        w = dequantize_nf4_reference(p.weight, p.quant_state, x.dtype)
    else:
        w = p.weight.to(x.dtype)
    out = F.linear(x_base, w, None if p.bias is None else p.bias.to(x.dtype))
    if p.lora_a is not None:
        out = out + p.scaling * F.linear(F.linear(x, p.lora_a.to(x.dtype)), p.lora_b.to(x.dtype))
    return out


def lora_mlp_reference(
    x: torch.Tensor, gate: LoraWeights, up: LoraWeights, down: LoraWeights
) -> torch.Tensor:
    """Reference SwiGLU MLP with LoRA on all three projections."""
    h = swiglu_reference(lora_linear_reference(x, gate), lora_linear_reference(x, up))
    return lora_linear_reference(h, down)
