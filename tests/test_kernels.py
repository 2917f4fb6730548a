"""CPU tests of the kernels: each torch reference against a naive float64 computation, the
autograd Functions' hand-written backwards against plain autograd, and (in a subprocess with
TRITON_INTERPRET=1, tiny sizes) the Triton kernels themselves against the references."""

from __future__ import annotations

import textwrap

import pytest
import torch
from trainserve.kernels.fused_linear_ce import (
    causal_lm_shift_labels,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from trainserve.kernels.lora_fused import (
    LoraWeights,
    lora_linear_reference,
    lora_mlp,
    lora_mlp_reference,
    lora_projections,
)
from trainserve.kernels.nf4 import (
    NF4_CODE,
    dequantize_nf4,
    dequantize_nf4_reference,
    quantize_nf4_reference,
    signed_dynamic_code,
)
from trainserve.kernels.rms_norm import rms_norm, rms_norm_reference
from trainserve.kernels.rope import apply_rope, rope_inplace_, rope_reference
from trainserve.kernels.swiglu import swiglu, swiglu_backward_reference, swiglu_reference
from triton_interpreter import PRELUDE, run_under_interpreter


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "NaN/inf in result"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_reference_matches_naive(dtype: torch.dtype) -> None:
    x = torch.randn(3, 5, 37, generator=gen(0)).to(dtype)
    w = (1 + 0.1 * torch.randn(37, generator=gen(1))).to(dtype)
    xd = x.double()
    naive = w.double() * xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + 1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(rms_norm_reference(x, w, 1e-6), naive) < tol
    assert rel(rms_norm(x, w, 1e-6), naive) < tol  # CPU dispatch -> reference


def test_rms_norm_backward_matches_float64() -> None:
    x = torch.randn(4, 19, generator=gen(2), requires_grad=True)
    w = (1 + 0.1 * torch.randn(19, generator=gen(3))).requires_grad_()
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    naive = wd * xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + 1e-5)
    d = torch.randn(4, 19, generator=gen(4))
    got = torch.autograd.grad(rms_norm(x, w, 1e-5), (x, w), d)
    want = torch.autograd.grad(naive, (xd, wd), d.double())
    assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5


# ---------------------------------------------------------------- RoPE


def _tables(bsz: int, seq: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.randint(0, 100, (bsz, seq), generator=gen(4)).double()
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).double() / dim))
    f = pos[..., None] * inv
    return torch.cat([f.cos(), f.cos()], -1).to(dtype), torch.cat([f.sin(), f.sin()], -1).to(dtype)


def test_rope_reference_is_a_rotation_by_position() -> None:
    bsz, seq, dim = 2, 5, 12
    cos, sin = _tables(bsz, seq, dim, torch.float64)
    q = torch.randn(bsz, seq, 4, dim, generator=gen(5), dtype=torch.float64)
    k = torch.randn(bsz, seq, 2, dim, generator=gen(6), dtype=torch.float64)
    qr, kr = rope_reference(q, k, cos, sin)
    # naive complex-number rotation of the pairs (i, i + dim/2)
    half = dim // 2
    ang = torch.atan2(sin[..., :half], cos[..., :half])[:, :, None]
    zq = torch.complex(q[..., :half], q[..., half:]) * torch.exp(1j * ang)
    assert rel(qr, torch.cat([zq.real, zq.imag], -1)) < 1e-12
    assert torch.allclose(kr.norm(dim=-1), k.norm(dim=-1))  # rotations keep norms
    # apply_rope on CPU returns the reference; the in-place helper matches it and inverts
    q2 = q.clone()
    rope_inplace_(q2, None, cos, sin)
    assert rel(q2, qr) < 1e-12
    rope_inplace_(q2, None, cos, sin, inverse=True)
    assert rel(q2, q) < 1e-12
    qa, ka = apply_rope(q, k, cos, sin)
    assert rel(qa, qr) < 1e-12 and rel(ka, kr) < 1e-12


# ---------------------------------------------------------------- SwiGLU


def test_swiglu_reference_and_backward() -> None:
    g = torch.randn(3, 41, generator=gen(7), dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 41, generator=gen(8), dtype=torch.float64, requires_grad=True)
    naive = g / (1 + torch.exp(-g)) * u
    assert rel(swiglu(g, u), naive) < 1e-12
    d = torch.randn(3, 41, generator=gen(9), dtype=torch.float64)
    dg, du = torch.autograd.grad(naive, (g, u), d)
    h, dg2, du2 = swiglu_backward_reference(d, g.detach(), u.detach())
    assert rel(h, naive) < 1e-12 and rel(dg2, dg) < 1e-12 and rel(du2, du) < 1e-12
    assert rel(swiglu_reference(g.bfloat16(), u.bfloat16()), naive) < 1e-2


# ---------------------------------------------------------------- fused linear cross-entropy


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("num_items", [None, 23])
def test_fused_ce_matches_full_logits(chunk: int, num_items: int | None) -> None:
    h = torch.randn(13, 16, generator=gen(10), dtype=torch.float64, requires_grad=True)
    w = (0.3 * torch.randn(97, 16, generator=gen(11), dtype=torch.float64)).requires_grad_()
    b = (0.1 * torch.randn(97, generator=gen(12), dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 97, (13,), generator=gen(13))
    y[[2, 5, 12]] = -100
    loss = fused_linear_cross_entropy(h, w, y, bias=b, num_items_in_batch=num_items, chunk_size=chunk)
    ref = fused_linear_cross_entropy_reference(h, w, y, bias=b, num_items_in_batch=num_items)
    assert abs(loss.item() - ref.item()) < 1e-6 * abs(ref.item())  # fp32 loss accumulation
    got = torch.autograd.grad(3.0 * loss, (h, w, b))
    want = torch.autograd.grad(3.0 * ref, (h, w, b))
    for a, c in zip(got, want, strict=True):
        assert rel(a, c) < 1e-6
    # naive: per-row -log softmax at the label
    logits = (h @ w.T + b).detach()
    rows = [torch.logsumexp(logits[i], 0) - logits[i, y[i]] for i in range(13) if y[i] != -100]
    denom = num_items if num_items is not None else len(rows)
    assert abs(ref.item() - (sum(rows) / denom).item()) < 1e-6 * abs(ref.item())


def test_fused_ce_bf16_and_shift() -> None:
    h = torch.randn(2, 9, 32, generator=gen(14)).bfloat16().requires_grad_()
    w = (0.2 * torch.randn(300, 32, generator=gen(15))).bfloat16()
    labels = torch.randint(0, 300, (2, 9), generator=gen(16))
    shifted = causal_lm_shift_labels(labels)
    assert (shifted[:, :-1] == labels[:, 1:]).all() and (shifted[:, -1] == -100).all()
    loss = fused_linear_cross_entropy(h, w, shifted, chunk_size=5)
    ref = fused_linear_cross_entropy_reference(h.double(), w.double(), shifted)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-2 * ref.item()
    (gh,) = torch.autograd.grad(loss, h)
    (gr,) = torch.autograd.grad(fused_linear_cross_entropy_reference(h, w, shifted), h)
    assert gh.dtype == torch.bfloat16 and rel(gh, gr) < 1e-2
    all_ignored = torch.full((2, 9), -100)
    assert torch.isnan(fused_linear_cross_entropy(h, w, all_ignored))  # transformers' mean: 0/0


# ---------------------------------------------------------------- NF4


def test_nf4_round_trip_and_layout() -> None:
    w = torch.randn(37, 29, generator=gen(17)) * 0.02  # odd element count, partial last block
    packed, qs = quantize_nf4_reference(w, blocksize=64)
    assert packed.dtype == torch.uint8 and packed.shape == ((w.numel() + 1) // 2, 1)
    deq = dequantize_nf4_reference(packed, qs, torch.float32)
    assert deq.shape == w.shape and rel(deq, w) < 0.12
    # every element is within half the widest NF4 gap of its block's scale
    flat = w.reshape(-1)
    scale = qs.absmax.repeat_interleave(64)[: flat.numel()]
    assert ((deq.reshape(-1) - flat).abs() <= 0.16 * scale + 1e-8).all()
    # layout: element 2i is the high nibble of byte i; values come from the table times absmax
    code = torch.tensor(NF4_CODE)
    hi = (packed[0, 0] >> 4).item()
    lo = (packed[0, 0] & 0xF).item()
    assert deq.reshape(-1)[0] == code[hi] * qs.absmax[0]
    assert deq.reshape(-1)[1] == code[lo] * qs.absmax[0]
    assert dequantize_nf4(packed, qs).dtype == w.dtype


def test_nf4_double_quant() -> None:
    w = torch.randn(64, 300, generator=gen(18)) * 0.05  # 300 blocks -> two nested blocks of 256
    packed, qs = quantize_nf4_reference(w, blocksize=64, compress_statistics=True)
    assert qs.nested and qs.absmax.dtype == torch.uint8 and qs.state2.blocksize == 256
    assert signed_dynamic_code().numel() == 256
    plain_packed, plain_qs = quantize_nf4_reference(w, blocksize=64)
    a = dequantize_nf4_reference(packed, qs, torch.float32)
    b = dequantize_nf4_reference(plain_packed, plain_qs, torch.float32)
    assert rel(a, b) < 0.05 and rel(a, w) < 0.12
    bf = dequantize_nf4(packed, qs, torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and rel(bf, a) < 1e-2


# ---------------------------------------------------------------- fused LoRA


def _proj(out_f: int, in_f: int, seed: int, bias: bool, nf4: bool, dtype: torch.dtype) -> LoraWeights:
    g = gen(seed)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype)
    qs = None
    if nf4:
        w, qs = quantize_nf4_reference(w, blocksize=64)
    b = (0.1 * torch.randn(out_f, generator=g)).to(dtype) if bias else None
    a = (0.1 * torch.randn(4, in_f, generator=g)).requires_grad_()
    bb = (0.1 * torch.randn(out_f, 4, generator=g)).requires_grad_()
    return LoraWeights(w, qs, b, a, bb, 2.0)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    d = torch.randn(out.shape, generator=gen(seed)).to(out.dtype)
    return list(torch.autograd.grad(out, inputs, d))


@pytest.mark.parametrize("nf4", [False, True])
def test_lora_qkv_with_rope_matches_reference(nf4: bool) -> None:
    bsz, seq, hid, dim = 2, 5, 64, 8
    ps = [_proj(32, hid, 20, True, nf4, torch.float64 if not nf4 else torch.float32),
          _proj(16, hid, 21, True, nf4, torch.float32), _proj(16, hid, 22, False, nf4, torch.float32)]
    for p in ps:
        if p.quant_state is None:
            p.weight, p.bias = p.weight.double(), None if p.bias is None else p.bias.double()
        p.lora_a.data, p.lora_b.data = p.lora_a.data.double(), p.lora_b.data.double()
    if nf4:
        for p in ps:
            p.quant_state.dtype = torch.float64
    x = torch.randn(bsz, seq, hid, generator=gen(23), dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(bsz, seq, dim, torch.float64)
    q, k, v = lora_projections(x, ps, rope=(cos, sin, dim))
    qr, kr, vr = (lora_linear_reference(x, p) for p in ps)
    qr, kr = rope_reference(qr.view(bsz, seq, -1, dim), kr.view(bsz, seq, -1, dim), cos, sin)
    qr, kr = qr.reshape(bsz, seq, -1), kr.reshape(bsz, seq, -1)
    for a, b in ((q, qr), (k, kr), (v, vr)):
        assert rel(a, b) < 1e-12
    leaves = [x] + [t for p in ps for t in (p.lora_a, p.lora_b)]
    out = torch.cat([q, k, v], -1)
    ref = torch.cat([qr, kr, vr], -1)
    for a, b in zip(_grads(out, leaves, 24), _grads(ref, leaves, 24), strict=True):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("nf4,recompute", [(False, False), (True, False), (True, True)])
def test_lora_mlp_matches_reference(nf4: bool, recompute: bool) -> None:
    hid, inter = 64, 96
    ps = [_proj(inter, hid, 30, False, nf4, torch.float32), _proj(inter, hid, 31, False, nf4, torch.float32),
          _proj(hid, inter, 32, False, nf4, torch.float32)]
    x = torch.randn(3, 7, hid, generator=gen(33), requires_grad=True)
    out = lora_mlp(x, *ps, recompute=recompute)
    ref = lora_mlp_reference(x, *ps)
    assert rel(out, ref) < 1e-5
    leaves = [x] + [t for p in ps for t in (p.lora_a, p.lora_b)]
    for a, b in zip(_grads(out, leaves, 34), _grads(ref, leaves, 34), strict=True):
        assert rel(a, b) < 1e-5


def test_lora_bf16_activations_with_fp32_adapters() -> None:
    p = _proj(48, 64, 40, True, False, torch.bfloat16)
    x = torch.randn(4, 64, generator=gen(41)).bfloat16().requires_grad_()
    (out,) = lora_projections(x, [p])
    assert out.dtype == torch.bfloat16
    xd = x.detach().double().requires_grad_()
    pd = LoraWeights(p.weight.double(), None, p.bias.double(), p.lora_a, p.lora_b, p.scaling)
    ref = lora_linear_reference(xd, pd)
    assert rel(out, ref) < 1e-2
    ga = _grads(out, [x, p.lora_a, p.lora_b], 42)
    gr = _grads(ref, [xd, p.lora_a, p.lora_b], 42)
    assert ga[1].dtype == torch.float32
    for a, b in zip(ga, gr, strict=True):
        assert rel(a, b) < 1e-2


# ---------------------------------------------------------------- Triton through the interpreter

_INTERPRET_SCRIPT = PRELUDE + textwrap.dedent(
    """
    from trainserve.kernels import fused_linear_ce as C, nf4 as N, rms_norm as R, rope as P, swiglu as S

    x = torch.randn(6, 37, requires_grad=True)
    w = (1 + 0.1 * torch.randn(37)).requires_grad_()
    y = R.RMSNormFunction.apply(x, w, 1e-6)
    d = torch.randn_like(y)
    a, b = torch.autograd.grad(y, (x, w), d), torch.autograd.grad(R.rms_norm_reference(x, w, 1e-6), (x, w), d)
    assert rel(y, R.rms_norm_reference(x, w, 1e-6)) < 1e-5
    assert rel(a[0], b[0]) < 1e-5 and rel(a[1], b[1]) < 1e-5

    base_q = torch.randn(2, 3, 4 * 10, requires_grad=True)
    ang = torch.randn(1, 3, 5); cos = torch.cat([ang.cos()] * 2, -1); sin = torch.cat([ang.sin()] * 2, -1)
    qv = (base_q * 1).view(2, 3, 4, 10)
    out = P.RopeInplaceFunction.apply(qv, cos, sin)
    ref = P.rope_reference(base_q.view(2, 3, 4, 10), base_q.view(2, 3, 4, 10), cos, sin)[0]
    d = torch.randn_like(out)
    assert rel(out, ref) < 1e-5
    assert rel(torch.autograd.grad(out, base_q, d)[0], torch.autograd.grad(ref, base_q, d)[0]) < 1e-5
    k = torch.randn(2, 3, 2, 10); q = torch.randn(2, 3, 4, 10)
    qr, kr = P.rope_reference(q, k, cos, sin)
    P.rope_inplace_triton(q, k, cos, sin)
    assert rel(q, qr) < 1e-5 and rel(k, kr) < 1e-5

    g = torch.randn(5, 33, requires_grad=True); u = torch.randn(5, 33, requires_grad=True)
    h = S.SwiGLUFunction.apply(g, u); d = torch.randn_like(h)
    a, b = torch.autograd.grad(h, (g, u), d), torch.autograd.grad(S.swiglu_reference(g, u), (g, u), d)
    assert rel(h, S.swiglu_reference(g, u)) < 1e-5 and rel(a[0], b[0]) < 1e-5 and rel(a[1], b[1]) < 1e-5
    hh, dg, du = S.swiglu_backward(d.clone(), g.detach().clone(), u.detach().clone(), inplace=True)
    assert rel(hh, h) < 1e-5 and rel(dg, b[0]) < 1e-5 and rel(du, b[1]) < 1e-5

    hs = torch.randn(11, 16, requires_grad=True); W = (0.3 * torch.randn(70, 16)).requires_grad_()
    lab = torch.randint(0, 70, (11,)); lab[3] = -100
    loss = C.fused_linear_cross_entropy(hs, W, lab, chunk_size=4)
    ref = C.fused_linear_cross_entropy_reference(hs, W, lab)
    a, b = torch.autograd.grad(loss, (hs, W)), torch.autograd.grad(ref, (hs, W))
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    assert rel(a[0], b[0]) < 1e-5 and rel(a[1], b[1]) < 1e-5

    for nested in (False, True):
        packed, qs = N.quantize_nf4_reference(torch.randn(37, 29), 64, nested)
        t = N.dequantize_nf4_triton(packed, qs, torch.float32)
        assert rel(t, N.dequantize_nf4_reference(packed, qs, torch.float32)) < 1e-6
        ws = [N.quantize_nf4_reference(torch.randn(r, 40), 64, nested) for r in (7, 3, 5)]
        for k in (2, 3):
            out = torch.full((sum(q.shape[0] for _, q in ws[:k]), 40), float("nan"))
            N.dequantize_nf4_many(ws[:k], torch.float32, out)
            ref = torch.cat([N.dequantize_nf4_reference(p, q, torch.float32) for p, q in ws[:k]])
            assert rel(out, ref) < 1e-6
    print("INTERPRETER-OK")
    """
)


def test_triton_kernels_under_interpreter() -> None:
    run_under_interpreter(_INTERPRET_SCRIPT, "INTERPRETER-OK")
