"""Triton kernels vs their torch references on CUDA: fresh random bf16/fp16 inputs, odd sizes,
forward and backward, relative error <= 1e-2 against a float64 computation, NaN never passes.
Outputs are poisoned (the caching allocator is filled with NaN before each call) so an element
a kernel forgot to write shows up as NaN."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
triton = pytest.importorskip("triton")

from trainserve.kernels import fused_linear_ce as C  # noqa: E402
from trainserve.kernels import lora_fused as L  # noqa: E402
from trainserve.kernels import nf4 as N  # noqa: E402
from trainserve.kernels import rms_norm as R  # noqa: E402
from trainserve.kernels import rope as P  # noqa: E402
from trainserve.kernels import swiglu as S  # noqa: E402
from trainserve.kernels import swiglu_lora as SL  # noqa: E402

DEV = "cuda"
TOL = 1e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "NaN in result (unwritten or invalid output)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def poison() -> None:
    """Fill free cached blocks with NaN so unwritten outputs are caught."""
    free = torch.cuda.mem_get_info()[0]
    n = min(free // 4, 1 << 28)
    block = torch.full((n // 4,), float("nan"), device=DEV)
    del block


def rnd(*shape: int, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


@pytest.mark.parametrize("shape", [(4, 1536), (3, 7, 1001), (2, 4097)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm(shape: tuple, dtype: torch.dtype) -> None:
    x = rnd(*shape, dtype=dtype).requires_grad_()
    w = (1 + 0.1 * rnd(shape[-1], dtype=torch.float32)).to(dtype).requires_grad_()
    poison()
    y = R.rms_norm(x, w, 1e-6)
    assert y.grad_fn is not None and "RMSNormFunction" in type(y.grad_fn).__name__
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = wd * xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + 1e-6)
    assert rel(y, ref) < TOL
    d = rnd(*shape, dtype=dtype)
    poison()
    got = torch.autograd.grad(y, (x, w), d)
    want = torch.autograd.grad(ref, (xd, wd), d.double())
    assert rel(got[0], want[0]) < TOL and rel(got[1], want[1]) < TOL


@pytest.mark.parametrize("dim", [128, 64, 80])
def test_rope_inplace_and_backward(dim: int) -> None:
    bsz, seq, hq, hk = 2, 37, 12, 2
    fused = rnd(bsz, seq, (hq + 2 * hk) * dim).requires_grad_()  # q/k are views of a fused output
    pos = torch.randint(0, 4096, (bsz, seq), device=DEV).double()
    inv = 1.0 / (1e6 ** (torch.arange(0, dim, 2, device=DEV).double() / dim))
    ang = pos[..., None] * inv
    cos = torch.cat([ang.cos()] * 2, -1).bfloat16()
    sin = torch.cat([ang.sin()] * 2, -1).bfloat16()
    h = fused * 1.0
    q = h[..., : hq * dim].view(bsz, seq, hq, dim)
    k = h[..., hq * dim : (hq + hk) * dim].view(bsz, seq, hk, dim)
    qo, ko = P.apply_rope(q, k, cos, sin)
    fd = fused.detach().double().requires_grad_()
    qr, kr = P.rope_reference(
        fd[..., : hq * dim].view(bsz, seq, hq, dim),
        fd[..., hq * dim : (hq + hk) * dim].view(bsz, seq, hk, dim),
        cos.double(), sin.double(),
    )
    assert rel(qo, qr) < TOL and rel(ko, kr) < TOL
    dq, dk = rnd(*qo.shape), rnd(*ko.shape)
    got = torch.autograd.grad((qo.float() * dq).sum() + (ko.float() * dk).sum(), fused)[0]
    want = torch.autograd.grad((qr * dq.double()).sum() + (kr * dk.double()).sum(), fd)[0]
    assert rel(got[..., : (hq + hk) * dim], want[..., : (hq + hk) * dim]) < TOL


@pytest.mark.parametrize("n", [1, 1001, 3 * 8960 + 7])
def test_swiglu(n: int) -> None:
    g, u = rnd(2, n).requires_grad_(), rnd(2, n).requires_grad_()
    poison()
    h = S.swiglu(g, u)
    gd, ud = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    ref = torch.nn.functional.silu(gd) * ud
    assert rel(h, ref) < TOL
    d = rnd(2, n)
    poison()
    got = torch.autograd.grad(h, (g, u), d)
    want = torch.autograd.grad(ref, (gd, ud), d.double())
    assert rel(got[0], want[0]) < TOL and rel(got[1], want[1]) < TOL
    hh, dg, du = S.swiglu_backward(d.clone(), g.detach().clone(), u.detach().clone(), inplace=True)
    assert rel(hh, ref) < TOL and rel(dg, want[0]) < TOL and rel(du, want[1]) < TOL


_SL_CONFIGS = [SL.DEFAULT_CONFIG, SL.LaunchConfig(bm=32, bn=128), SL.LaunchConfig(bm=64, bn=128, warps=8),
               SL.LaunchConfig(bm=16, bn=256)]


@pytest.mark.parametrize("cfg", _SL_CONFIGS, ids=["default", "bm32", "bm64", "wide"])
@pytest.mark.parametrize("m,inter,ranks,rd", [(389, 1000, (16, 16), 16), (64, 8960, (8, 0), 0), (7, 130, None, 24),
                                              (300, 640, (136, 8), 16), (33, 18944, (16, 16), 16)])
def test_swiglu_lora(m: int, inter: int, ranks: tuple | None, rd: int, cfg) -> None:
    """The MLP middle with its LoRA terms in the kernel; a rank above the limit takes the unfused path."""
    gu = rnd(m, 2 * inter)
    xa = b = None
    if ranks is not None:
        r = sum(ranks)
        xa = rnd(m, r)
        b = torch.block_diag(rnd(inter, ranks[0], scale=r**-0.5), rnd(inter, ranks[1], scale=r**-0.5))
    dxa_d, a_d = (rnd(m, rd), rnd(rd, inter, scale=rd**-0.5)) if rd else (None, None)
    dh = rnd(m, inter)
    up = [None if t is None else t.double() for t in (xa, b, dxa_d, a_d)]
    poison()
    h = SL.swiglu_lora_forward(gu, inter, xa, b, ranks=ranks, config=cfg)
    assert rel(h, SL.swiglu_lora_forward_reference(gu.double(), inter, up[0], up[1])) < TOL
    rh, rdg, rdu = SL.swiglu_lora_backward_reference(dh.double(), gu.double(), inter, *up)
    poison()
    hh, dgu = SL.swiglu_lora_backward(dh.clone(), gu.clone(), inter, xa, b, dxa_d, a_d, ranks=ranks, config=cfg)
    assert rel(hh, rh) < TOL and rel(dgu[:, :inter], rdg) < TOL and rel(dgu[:, inter:], rdu) < TOL


@pytest.mark.parametrize("vocab", [32003, 151936])
@pytest.mark.parametrize("num_items", [None, 1500])
def test_fused_linear_cross_entropy(vocab: int, num_items: int | None) -> None:
    n, hid = 1037, 256
    h = rnd(n, hid).requires_grad_()
    w = rnd(vocab, hid, scale=0.05).requires_grad_()
    y = torch.randint(0, vocab, (n,), device=DEV)
    y[torch.rand(n, device=DEV) < 0.2] = -100
    poison()
    loss = C.fused_linear_cross_entropy(h, w, y, num_items_in_batch=num_items, chunk_size=300)
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = C.fused_linear_cross_entropy_reference(hd, wd, y, num_items_in_batch=num_items)
    logits = hd @ wd.T  # float64 loss, no fp32 upcast in between
    ref64 = torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum")
    ref64 = ref64 / (num_items if num_items is not None else (y != -100).sum())
    assert torch.isfinite(loss) and abs(loss.item() - ref64.item()) < TOL * abs(ref64.item())
    got = torch.autograd.grad(2.0 * loss, (h, w))
    want = torch.autograd.grad(2.0 * ref64, (hd, wd))
    assert rel(got[0], want[0]) < TOL and rel(got[1], want[1]) < TOL
    assert abs(ref.item() - ref64.item()) < 1e-3 * abs(ref64.item())


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(1536, 1536), (8960, 1536), (37, 29)])
def test_nf4_dequant_exact(nested: bool, shape: tuple) -> None:
    w = rnd(*shape, scale=0.02)
    packed, qs = N.quantize_nf4_reference(w, 64, nested)
    for dt in (torch.float32, torch.bfloat16):
        poison()
        t = N.dequantize_nf4(packed, qs, dt)
        r = N.dequantize_nf4_reference(packed, qs, dt)
        assert t.dtype == dt and t.shape == w.shape
        # same table lookups and products; the nested absmax may differ by an fp32 rounding
        # (the kernel fuses code2 * scale + offset into one FMA), so bf16 can move by one ulp
        assert rel(t, r) < (1e-6 if dt == torch.float32 else 4e-3)
        if not nested:
            assert torch.equal(t, r)
    assert rel(t, w) < 0.12


@pytest.mark.parametrize("k", [2, 3])
def test_nf4_many_one_launch(k: int) -> None:
    ws = [N.quantize_nf4_reference(rnd(r, 1536, scale=0.02), 64, True) for r in (1536, 256, 256)[:k]]
    poison()
    out = torch.empty(sum(q.shape[0] for _, q in ws), 1536, device=DEV, dtype=torch.bfloat16)
    N.dequantize_nf4_many(ws, torch.bfloat16, out)
    ref = torch.cat([N.dequantize_nf4_reference(p, q, torch.bfloat16) for p, q in ws])
    assert rel(out, ref) < 4e-3


def test_nf4_matches_bitsandbytes() -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = rnd(1000, 1537, scale=0.02)
    for nested in (False, True):
        packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        ours = N.dequantize_nf4(packed, qs, torch.bfloat16)
        theirs = bnbf.dequantize_4bit(packed, qs, quant_type="nf4")
        assert rel(ours, theirs) < 1e-3
        mine_packed, _ = N.quantize_nf4_reference(w, 64)
        agree = (mine_packed == packed.reshape(mine_packed.shape)).float().mean().item()
        assert agree > 0.99  # same codes but for ties at the rounding boundaries


def _proj(out_f: int, in_f: int, bias: bool, nf4: bool) -> L.LoraWeights:
    w = rnd(out_f, in_f, scale=in_f**-0.5)
    qs = None
    if nf4:
        w, qs = N.quantize_nf4_reference(w, 64, True)
    b = rnd(out_f, scale=0.1) if bias else None
    a = (0.05 * torch.randn(16, in_f, device=DEV)).requires_grad_()
    bb = (0.05 * torch.randn(out_f, 16, device=DEV)).requires_grad_()
    return L.LoraWeights(w, qs, b, a, bb, 2.0)


def _as64(p: L.LoraWeights) -> L.LoraWeights:
    w = L.dense_weight(p, torch.float64)
    return L.LoraWeights(w, None, None if p.bias is None else p.bias.double(), p.lora_a, p.lora_b, p.scaling)


@pytest.mark.parametrize("nf4", [False, True])
def test_lora_qkv_rope_and_o(nf4: bool) -> None:
    bsz, seq, hid, dim = 2, 131, 1536, 128
    ps = [_proj(1536, hid, True, nf4), _proj(256, hid, True, nf4), _proj(256, hid, True, nf4)]
    x = rnd(bsz, seq, hid).requires_grad_()
    inv = 1e6 ** (torch.arange(0, dim, 2, device=DEV).double() / dim)
    ang = torch.arange(seq, device=DEV).double()[:, None] / inv
    cos = torch.cat([ang.cos()] * 2, -1)[None].bfloat16()
    sin = torch.cat([ang.sin()] * 2, -1)[None].bfloat16()
    poison()
    q, k, v = L.lora_projections(x, ps, rope=(cos, sin, dim))
    xd = x.detach().double().requires_grad_()
    p64 = [_as64(p) for p in ps]
    qr, kr, vr = (L.lora_linear_reference(xd, p) for p in p64)
    qr, kr = P.rope_reference(
        qr.view(bsz, seq, -1, dim), kr.view(bsz, seq, -1, dim), cos.double(), sin.double()
    )
    refs = (qr.reshape(bsz, seq, -1), kr.reshape(bsz, seq, -1), vr)
    for a, b in zip((q, k, v), refs, strict=True):
        assert rel(a, b) < TOL
    ds = [rnd(*t.shape) for t in (q, k, v)]
    leaves = [x] + [t for p in ps for t in (p.lora_a, p.lora_b)]
    leaves64 = [xd] + [t for p in ps for t in (p.lora_a, p.lora_b)]
    poison()
    got = torch.autograd.grad(sum((t.float() * d).sum() for t, d in zip((q, k, v), ds, strict=True)), leaves)
    want = torch.autograd.grad(sum((t * d.double()).sum() for t, d in zip(refs, ds, strict=True)), leaves64)
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < TOL
    po = _proj(hid, 1536, False, nf4)
    (o,) = L.lora_projections(q, [po])
    assert rel(o, L.lora_linear_reference(q.detach().double(), _as64(po))) < TOL


@pytest.mark.parametrize("nf4,recompute", [(False, False), (True, False), (True, True)])
def test_lora_mlp(nf4: bool, recompute: bool) -> None:
    hid, inter = 1536, 8960
    ps = [_proj(inter, hid, False, nf4), _proj(inter, hid, False, nf4), _proj(hid, inter, False, nf4)]
    x = rnd(3, 129, hid).requires_grad_()
    poison()
    out = L.lora_mlp(x, *ps, recompute=recompute)
    xd = x.detach().double().requires_grad_()
    ref = L.lora_mlp_reference(xd, *[_as64(p) for p in ps])
    assert rel(out, ref) < TOL
    d = rnd(*out.shape)
    leaves = [x] + [t for p in ps for t in (p.lora_a, p.lora_b)]
    poison()
    got = torch.autograd.grad(out, leaves, d)
    want = torch.autograd.grad(ref, [xd] + leaves[1:], d.double())
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < TOL
