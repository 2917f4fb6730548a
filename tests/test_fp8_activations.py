"""The trainer's copy of the engine's FP8 activation rounding (``kernels/fp8_activations.py``) and the
FP8 weight state's own GEMMs, on CPU. The byte-for-byte match against vLLM's CUDA quantisers and the
row-wise ``torch._scaled_mm`` path are checked on the GPU (``tests/gpu/test_quant_formats_gpu.py``)."""

from __future__ import annotations

import pytest
import torch
from trainserve.kernels.fp8_activations import (
    E4M3,
    E4M3_MAX,
    TOKEN_MIN_SCALE,
    fp8_rowwise_matmul,
    fp8_rowwise_matmul_reference,
    quantize_activations,
    round_activations,
)
from trainserve.kernels.fp8_dequant import FP8QuantState, quantize_fp8_reference
from trainserve.kernels.packed_state import packed_linear, packed_linear_reference
from triton_interpreter import run_under_interpreter


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _activations(seed: int, m: int = 37, k: int = 256) -> torch.Tensor:
    x = torch.randn(m, k, generator=gen(seed))
    x[3] *= 1000.0  # a token with large values: its scale must not leak into other tokens
    x[5, 7] = 300.0  # one outlier inside a group
    x[9] = 0.0  # an all-zero token
    return x


@pytest.mark.parametrize("kind", ["token", "group", "tensor"])
def test_scales_follow_the_engine_rule(kind: str) -> None:
    x = _activations(1)
    q, scale = quantize_activations(x, kind)
    assert q.dtype == E4M3 and scale.dtype == torch.float32
    if kind == "token":
        assert scale.shape == (37, 1)
        expect = (x.abs().amax(1, keepdim=True) / E4M3_MAX).clamp_min(TOKEN_MIN_SCALE)
    elif kind == "group":
        assert scale.shape == (37, 2)
        expect = x.view(37, 2, 128).abs().amax(-1).clamp_min(1e-10) / E4M3_MAX
    else:
        assert scale.shape == (1, 1)
        expect = (x.abs().amax() / E4M3_MAX).clamp_min(TOKEN_MIN_SCALE).reshape(1, 1)
    assert torch.equal(scale, expect)
    assert q.float().abs().max() == E4M3_MAX  # the largest value of each group maps to 448
    assert not q.float().isnan().any()
    assert (q[9].float() == 0).all()  # zeros stay zeros, no NaN from a zero scale


@pytest.mark.parametrize("kind", ["token", "group", "tensor"])
def test_rounding_is_fp8_accurate_and_idempotent(kind: str) -> None:
    x = _activations(2)
    r = round_activations(x, kind)
    keep = torch.ones(37, dtype=torch.bool)
    keep[[3, 5, 9]] = False  # per-tensor scales crush the small tokens next to the 1000x one
    err = rel(r[keep], x[keep])
    assert 0 < err < (0.05 if kind != "tensor" else 0.5)
    assert torch.equal(round_activations(r, kind), r)  # rounded values are representable: a fixed point
    assert not torch.equal(r, x)


def test_a_token_scale_stays_in_its_token() -> None:
    x = _activations(3)
    small = round_activations(x, "token")[0]
    alone = round_activations(x[:1], "token")[0]
    assert torch.equal(small, alone)


def test_rowwise_matmul_matches_its_reference_and_the_rounded_product() -> None:
    x = _activations(4, m=19)
    w = torch.randn(96, 256, generator=gen(5)) * 0.05
    wq, ws = quantize_fp8_reference(w, "channel")
    out = fp8_rowwise_matmul(x, wq, ws)  # CPU: the reference
    ref = fp8_rowwise_matmul_reference(x, wq, ws)
    assert torch.equal(out, ref)
    exact = round_activations(x.double(), "token") @ (wq.double() * ws.double()).t()
    assert rel(ref, exact) < 1e-6
    assert rel(x @ (wq.float() * ws).t(), exact) > 1e-3  # the rounding is not a no-op


@pytest.mark.parametrize("kind", ["channel", "block", "tensor"])
def test_fp8_state_gemms_round_inputs_and_pass_gradients_straight_through(kind: str) -> None:
    w = torch.randn(256, 256, generator=gen(6)) * 0.05
    wq, ws = quantize_fp8_reference(w, kind)
    state = FP8QuantState(wq, ws, kind, 0, 256, torch.float32)
    plain = FP8QuantState(wq, ws, kind, 0, 256, torch.float32, activations=None)
    assert state.own_matmuls and not plain.own_matmuls
    x = _activations(7, m=11).requires_grad_()
    dense = plain.dequantize_t(torch.float32)
    mode = {"channel": "token", "block": "group", "tensor": "tensor"}[kind]
    assert rel(state.matmul(x.detach()), round_activations(x.detach(), mode) @ dense) < 1e-6
    assert torch.equal(plain.matmul(x.detach()), x.detach() @ dense)
    bias = torch.randn(256, generator=gen(8))
    out, ref = packed_linear(x, state, bias), packed_linear_reference(x, state, bias)
    assert rel(out, ref) < 1e-6
    d = torch.randn(out.shape, generator=gen(9))
    (gx,) = torch.autograd.grad(out, x, d)
    assert rel(gx, d @ dense.t()) < 1e-6  # straight through the rounding
    assert rel(state.grad_matmul(d), d @ dense.t()) < 1e-6


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_mlp_rounds_inputs_in_forward_and_recompute(recompute: bool) -> None:
    """The fused MLP (gate|up merged from one engine tensor, down separate) against the reference,
    with the gate|up GEMM recomputed in the backward: the recompute must round like the forward."""
    from trainserve.kernels.lora_fused import LoraWeights, lora_mlp, lora_mlp_reference

    hid, inter = 128, 256
    gu_q, gu_s = quantize_fp8_reference(torch.randn(2 * inter, hid, generator=gen(11)) * 0.05, "channel")
    d_q, d_s = quantize_fp8_reference(torch.randn(hid, inter, generator=gen(12)) * 0.05, "channel")
    states = [FP8QuantState(gu_q, gu_s, "channel", 0, inter, torch.float32),
              FP8QuantState(gu_q, gu_s, "channel", inter, 2 * inter, torch.float32),
              FP8QuantState(d_q, d_s, "channel", 0, hid, torch.float32)]
    g = gen(13)
    ps = [LoraWeights(torch.empty(0), st, None, (0.1 * torch.randn(4, st.shape[1], generator=g)).requires_grad_(),
                      (0.1 * torch.randn(st.shape[0], 4, generator=g)).requires_grad_(), 2.0, torch.float32)
          for st in states]
    x = _activations(14, m=12, k=hid).requires_grad_()
    out, ref = lora_mlp(x, *ps, recompute=recompute), lora_mlp_reference(x, *ps)
    assert rel(out, ref) < 1e-5
    leaves = [x] + [t for p in ps for t in (p.lora_a, p.lora_b)]
    d = torch.randn(out.shape, generator=gen(15))
    for a, b in zip(torch.autograd.grad(out, leaves, d), torch.autograd.grad(ref, leaves, d), strict=True):
        assert rel(a, b) < 1e-5


def test_block_activations_need_whole_groups() -> None:
    wq, ws = quantize_fp8_reference(torch.randn(128, 256, generator=gen(10)), "block")
    with pytest.raises(ValueError, match="K % 128"):
        FP8QuantState(wq[:, :192], ws, "block", 0, 128, torch.float32)
    with pytest.raises(ValueError, match="unknown activation"):
        quantize_activations(torch.zeros(2, 128), "row")


_INTERPRET = """
import torch
from trainserve.kernels.fp8_activations import _quantize_triton, quantize_activations_reference
for seed, (m, k, kind) in enumerate([(5, 256, "token"), (7, 384, "group"), (3, 200, "token")]):
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 3).to(torch.bfloat16)
    x[1] = 0
    q, s = _quantize_triton(x, kind, 128)
    rq, rs = quantize_activations_reference(x, kind)
    assert torch.equal(s, rs.reshape(s.shape)), kind
    assert q.shape == rq.shape and q.dtype == rq.dtype
print("FP8-ACT-INTERPRETER-OK")
"""


def test_triton_quantiser_scales_under_interpreter() -> None:
    """The kernel's scales and shapes on CPU. Its FP8 bytes are compared on the GPU only: the
    Triton interpreter's float-to-FP8 conversion does not round like the hardware."""
    run_under_interpreter(_INTERPRET, "FP8-ACT-INTERPRETER-OK")
