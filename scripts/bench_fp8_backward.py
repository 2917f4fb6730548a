"""Input-gradient GEMM of the FP8 trainer (``dX = dY @ W``), timed per 7B layer shape: the
dequantise-to-bf16 path the backward runs today against an FP8 path (weight transposed to FP8,
``dY`` scaled per output channel and rounded to e4m3 per token, one row-wise scaled FP8 GEMM).

    python3 -P scripts/bench_fp8_backward.py --tokens 6144 --out results.json

Prints ms per layer and per training step (28 layers x --micro-batches), and the FP8 path's
relative error against the bf16 one. Needs CUDA with row-wise ``torch._scaled_mm`` (Hopper).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from trainserve.kernels.fp8_activations import E4M3, quantize_activations
from trainserve.kernels.fp8_dequant import dequantize_fp8

SHAPES_7B = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def _layer(name: str, n: int, k: int, a: argparse.Namespace) -> dict:
    dev = "cuda"
    w = torch.randn(n, k, device=dev) * 0.02
    s = (w.abs().amax(1, keepdim=True) / 448.0).float()
    wq = (w / s).clamp(-448, 448).to(E4M3)
    g = (torch.randn(a.tokens, n, device=dev) * torch.exp(torch.randn(a.tokens, 1, device=dev))).bfloat16()
    ones = torch.ones(1, k, device=dev, dtype=torch.float32)
    s_row = s.reshape(1, -1)

    def bf16_path():
        return g @ dequantize_fp8(wq, s, "channel", torch.bfloat16)

    def fp8_path(wt=None):
        wt = wq.t().contiguous() if wt is None else wt
        q, sa = quantize_activations((g.float() * s_row).to(torch.bfloat16), "token")
        return torch._scaled_mm(q, wt.t(), scale_a=sa, scale_b=ones, out_dtype=torch.bfloat16)

    wt_cached = wq.t().contiguous()
    q_cached, sa_cached = quantize_activations((g.float() * s_row).to(torch.bfloat16), "token")
    w_bf16 = dequantize_fp8(wq, s, "channel", torch.bfloat16)
    ref = g.float() @ (wq.float() * s)
    err_bf16 = ((bf16_path().float() - ref).norm() / ref.norm()).item()
    err_fp8 = ((fp8_path().float() - ref).norm() / ref.norm()).item()
    return {"layer": name, "n": n, "k": k, "bf16_ms": _time(bf16_path, a.reps), "fp8_ms": _time(fp8_path, a.reps),
            "fp8_cached_transpose_ms": _time(lambda: fp8_path(wt_cached), a.reps),
            "fp8_gemm_only_ms": _time(lambda: torch._scaled_mm(q_cached, wt_cached.t(), scale_a=sa_cached,
                                                                scale_b=ones, out_dtype=torch.bfloat16), a.reps),
            "bf16_gemm_only_ms": _time(lambda: g @ w_bf16, a.reps),
            "transpose_ms": _time(lambda: wq.t().contiguous(), a.reps),
            "dequant_ms": _time(lambda: dequantize_fp8(wq, s, "channel", torch.bfloat16), a.reps),
            "rel_err_bf16": err_bf16, "rel_err_fp8": err_fp8}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=6144)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("bench_fp8_backward.py needs a CUDA GPU of compute capability 9.0 or newer "
                         "(row-wise scaled FP8 GEMMs)")
    torch.manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES_7B.items():
        rows.append(_layer(name, n, k, a))
        print(json.dumps(rows[-1]))
        torch.cuda.empty_cache()
    per = a.layers * a.micro_batches
    summary = {k: round(sum(r[k] for r in rows) * per, 1)
               for k in ("bf16_ms", "fp8_ms", "fp8_cached_transpose_ms", "fp8_gemm_only_ms", "bf16_gemm_only_ms")}
    print("per training step (ms):", summary)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "tokens": a.tokens, "rows": rows,
                       "per_step_ms": summary}, f, indent=1)


if __name__ == "__main__":
    main()
