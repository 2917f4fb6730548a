#!/usr/bin/env python3
"""Per-kernel timings at the Qwen2-1.5B training shapes against their floors.

Measures the two ceilings first (device-to-device copy bandwidth counting bytes read + written;
bf16 matmul rate on a large product and at the model's own shapes), then times each kernel with
``triton.testing.do_bench`` (median, inputs rotated so the L2 does not serve them) and prints
``floor = max(bytes / bandwidth, flops / matmul rate)`` next to the measured time.
Writes JSON to ``--out``. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton.testing
from trainserve.kernels import fused_linear_ce as C
from trainserve.kernels import lora_fused as L
from trainserve.kernels import nf4 as N
from trainserve.kernels import rms_norm as R
from trainserve.kernels import rope as P
from trainserve.kernels import swiglu as S

DEV = "cuda"
BF = torch.bfloat16


def bench(fn, reps: int = 50) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")


def ceilings() -> dict:
    n = 1 << 30  # 1 GiB per side
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    bw = 2 * n / (ms * 1e-3)
    x, y = torch.randn(8192, 8192, device=DEV, dtype=BF), torch.randn(8192, 8192, device=DEV, dtype=BF)
    ms = bench(lambda: x @ y)
    mm = 2 * 8192**3 / (ms * 1e-3)
    out = {"copy_bytes_per_s": bw, "matmul_flops_per_s": mm}
    for m, k, nn in ((4096, 1536, 1536), (4096, 1536, 8960), (4096, 8960, 1536), (4096, 1536, 151936)):
        p, q = torch.randn(m, k, device=DEV, dtype=BF), torch.randn(k, nn, device=DEV, dtype=BF)
        out[f"matmul_{m}x{k}x{nn}"] = 2 * m * k * nn / (bench(lambda p=p, q=q: p @ q) * 1e-3)
    return out


def row(name: str, ms: float, nbytes: float, flops: float, ceil: dict, ref_ms: float | None = None) -> dict:
    t_bytes = nbytes / ceil["copy_bytes_per_s"] * 1e3
    t_flops = flops / ceil["matmul_flops_per_s"] * 1e3
    floor = max(t_bytes, t_flops)
    return {"kernel": name, "ms": ms, "floor_ms": floor, "bytes": nbytes, "flops": flops,
            "floor_bytes_ms": t_bytes, "floor_flops_ms": t_flops, "x_floor": ms / floor,
            "torch_ref_ms": ref_ms}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    torch.manual_seed(0)
    ceil = ceilings()
    torch.cuda.empty_cache()
    m, hid, inter, hq, hk, dim, vocab = args.tokens, 1536, 8960, 12, 2, 128, 151936
    rows = []

    # RMSNorm
    xs = [torch.randn(m, hid, device=DEV, dtype=BF) for _ in range(4)]
    w = torch.ones(hid, device=DEV, dtype=BF)
    it = iter(range(10**9))
    ms = bench(lambda: R.rms_norm_forward_triton(xs[next(it) % 4], w, 1e-6))
    ref = bench(lambda: R.rms_norm_reference(xs[next(it) % 4], w, 1e-6))
    rows.append(row("rms_norm fwd 4096x1536", ms, 2 * m * hid * 2, 0, ceil, ref))
    y, rstd = R.rms_norm_forward_triton(xs[0], w, 1e-6)
    ms = bench(lambda: R.rms_norm_backward_triton(xs[next(it) % 4], xs[0], w, rstd, False))
    rows.append(row("rms_norm bwd 4096x1536", ms, 3 * m * hid * 2, 0, ceil))

    # RoPE, in place on q and k
    q = torch.randn(4, m, hq, dim, device=DEV, dtype=BF)
    k = torch.randn(4, m, hk, dim, device=DEV, dtype=BF)
    cos = torch.randn(1, m, dim, device=DEV, dtype=BF)
    sin = torch.randn(1, m, dim, device=DEV, dtype=BF)
    ms = bench(lambda: P.rope_inplace_triton(q[next(it) % 4][None], k[next(it) % 4][None], cos, sin))
    rows.append(row("rope q+k 4096 tok", ms, 2 * m * (hq + hk) * dim * 2 + m * dim * 2, 0, ceil,
                    bench(lambda: P.rope_reference(q[0][None], k[0][None], cos, sin))))

    # SwiGLU
    gs = [torch.randn(m, inter, device=DEV, dtype=BF) for _ in range(3)]
    ms = bench(lambda: S.swiglu_forward_triton(gs[next(it) % 3], gs[(next(it) + 1) % 3]))
    rows.append(row("swiglu fwd 4096x8960", ms, 3 * m * inter * 2, 0, ceil,
                    bench(lambda: S.swiglu_reference(gs[0], gs[1]))))
    ms = bench(lambda: S.swiglu_backward(gs[0], gs[1], gs[2], write_h=True, inplace=False))
    rows.append(row("swiglu bwd 4096x8960 (+h)", ms, 6 * m * inter * 2, 0, ceil))

    # NF4 dequant
    wq, qs = N.quantize_nf4_reference(torch.randn(inter, hid, device=DEV, dtype=BF) * 0.02, 64, True)
    ms = bench(lambda: N.dequantize_nf4_triton(wq, qs, BF))
    rows.append(row("nf4 dequant 8960x1536 (nested)", ms, inter * hid * (0.5 + 2) + inter * hid / 64, 0, ceil,
                    bench(lambda: N.dequantize_nf4_reference(wq, qs, BF))))

    # Fused linear CE (forward computes the gradients; no dW: lm_head frozen)
    hs = torch.randn(m, hid, device=DEV, dtype=BF, requires_grad=True)
    lw = torch.randn(vocab, hid, device=DEV, dtype=BF) * 0.02
    lab = torch.randint(0, vocab, (m,), device=DEV)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = bench(lambda: C.fused_linear_cross_entropy(hs, lw, lab), reps=30)
    peak_fused = (torch.cuda.max_memory_allocated() - base) / 1e9
    flops = 2 * 2 * m * vocab * hid
    nbytes = hid * vocab * 2 + m * vocab * 2 * 4

    def ref_ce():
        loss = C.fused_linear_cross_entropy_reference(hs, lw, lab)
        loss.backward()

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ref = bench(ref_ce, reps=30)
    peak_ref = (torch.cuda.max_memory_allocated() - base) / 1e9
    r = row("fused linear CE fwd+bwd 4096x1536x151936", ms, nbytes, flops, ceil, ref)
    r.update(extra_peak_gb=peak_fused, torch_ref_extra_peak_gb=peak_ref)
    rows.append(r)

    # Fused LoRA: QKV(+rope) and MLP, forward + backward, dense bf16 and NF4 base
    for nf4 in (False, True):
        def proj(o: int, i: int, bias: bool, nf4: bool = nf4):
            wt = torch.randn(o, i, device=DEV, dtype=BF) * i**-0.5
            q_state = None
            if nf4:
                wt, q_state = N.quantize_nf4_reference(wt, 64, True)
            b = torch.zeros(o, device=DEV, dtype=BF) if bias else None
            a = torch.randn(16, i, device=DEV, requires_grad=True)
            bb = torch.randn(o, 16, device=DEV, requires_grad=True)
            return L.LoraWeights(wt, q_state, b, a, bb, 1.0)

        x = torch.randn(4, m // 4, hid, device=DEV, dtype=BF, requires_grad=True)
        ps = [proj(hq * dim, hid, True), proj(hk * dim, hid, True), proj(hk * dim, hid, True)]
        c1 = torch.randn(1, m // 4, dim, device=DEV, dtype=BF)

        def qkv(ps=ps, x=x, c1=c1):
            outs = L.lora_projections(x, ps, rope=(c1, c1, dim))
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        ms = bench(qkv, reps=30)
        f = 2 * m * hid * (hq + 2 * hk) * dim * 2  # fwd + dX (base); LoRA terms are ~2% more
        tag = "nf4" if nf4 else "bf16"
        rows.append(row(f"lora qkv+rope fwd+bwd ({tag})", ms, 0, f, ceil))
        mp = [proj(inter, hid, False), proj(inter, hid, False), proj(hid, inter, False)]

        def mlp(mp=mp, x=x):
            out = L.lora_mlp(x, *mp)
            out.backward(torch.ones_like(out))

        ms = bench(mlp, reps=30)
        f = 2 * m * hid * inter * 3 * 2
        nb = m * inter * 2 * 2 * 4  # gate/up written, read back, swiglu bwd traffic (approx.)
        rows.append(row(f"lora mlp fwd+bwd ({tag})", ms, nb, f, ceil))

    # attention (SDPA flash, causal, GQA), forward + backward
    qa = torch.randn(4, hq, m // 4, dim, device=DEV, dtype=BF, requires_grad=True)
    ka = torch.randn(4, hk, m // 4, dim, device=DEV, dtype=BF, requires_grad=True)

    def attn():
        o = torch.nn.functional.scaled_dot_product_attention(qa, ka, ka, is_causal=True, enable_gqa=True)
        o.backward(torch.ones_like(o))

    ms = bench(attn, reps=30)
    s = m // 4
    f = 4 * (4 * s * s * hq * dim / 2) * 3.5  # causal fwd (2 matmuls) + bwd (~2.5x)
    rows.append(row("sdpa causal gqa fwd+bwd 4x1024", ms, 0, f, ceil))

    w1 = max(len(r["kernel"]) for r in rows)
    shapes = ", ".join(f"{k} {v / 1e12:.0f}" for k, v in ceil.items() if k.startswith("matmul_"))
    print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"matmul {ceil['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s; {shapes}")
    print(f"{'kernel':<{w1}} {'ms':>8} {'floor':>8} {'x floor':>8} {'torch ref':>9}")
    for r in rows:
        refs = f"{r['torch_ref_ms']:.3f}" if r["torch_ref_ms"] else "-"
        print(f"{r['kernel']:<{w1}} {r['ms']:8.3f} {r['floor_ms']:8.3f} {r['x_floor']:8.2f} {refs:>9}")
    if args.out:
        info = {"ceilings": ceil, "rows": rows, "device": torch.cuda.get_device_name(0),
                "torch": torch.__version__, "argv": sys.argv}
        Path(args.out).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
