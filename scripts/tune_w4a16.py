#!/usr/bin/env python3
"""Sweep the launch configurations of trainserve's 4-bit Triton GEMM (``kernels/w4a16_gemm.py``) on the GPU.

For each linear layer of a Qwen2 shape and each decode batch M, every configuration in the grid
(operands swapped or not, output tile 64/128, K tile 32/64, K splits 1-8, 4/8 warps, 3/4 stages) is timed on
**cold weights**: the timed CUDA graph cycles through enough copies of the layer (≥ 256 MB) that
no copy is still in L2 when it is used again, as in a decode step, where ~4 GB of weights pass
between two uses of a layer. bf16 (cuBLAS) is timed the same way. The report gives the best
configuration per (layer, M), the one :func:`pick_config` chooses, and per-step sums.

    python3 -P scripts/tune_w4a16.py --shape 7b --m 1,16,32,64,128 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python3 -P` does not add it
from bench_quant_gemm import layer_shapes  # noqa: E402

L2_FLUSH_BYTES = 256 << 20


def graph_time_us(calls, reps: int = 5) -> float:
    """Mean microseconds of one call: ``calls`` (a list of closures) captured in one CUDA graph."""
    import torch

    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(calls))


def _finite(us: float | None) -> float | None:
    """Microseconds rounded for the report; None for a configuration that failed (JSON has no inf)."""
    return None if us is None or us == float("inf") else round(us, 2)


def copies_for(nbytes: int) -> int:
    return max(1, -(-L2_FLUSH_BYTES // nbytes))


def time_w4(x, copies, cfg) -> float:
    from trainserve.kernels.w4a16_gemm import w4a16_matmul

    return graph_time_us([lambda c=c, x=x, cfg=cfg: w4a16_matmul(x, *c, 64, config=cfg) for c in copies])


def time_bf16(x, copies) -> float:
    import torch

    return graph_time_us([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in copies])


def grid(m: int):
    from trainserve.kernels.w4a16_gemm import GemmConfig

    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    for swap, bn, bk, split, warps, stages in itertools.product((True, False), (64, 128), (32, 64), (1, 2, 4, 8),
                                                                (4, 8), (3, 4)):
        yield GemmConfig(block_n=bn, block_m=bm, block_k=bk, split_k=split, num_warps=warps, num_stages=stages,
                         swap=swap)


def main() -> int:
    import torch
    from trainserve.kernels._triton_utils import device_sm_count
    from trainserve.kernels.machete_layout import quantize_for_machete
    from trainserve.kernels.w4_dequant import W4Tensors, dequantize_w4
    from trainserve.kernels.w4a16_gemm import GemmConfig, pick_config, w4a16_linear_reference, w4a16_matmul

    from trainserve.random_model import QWEN2_SHAPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="7b", choices=sorted(QWEN2_SHAPES))
    p.add_argument("--m", default="1,16,32,64,128")
    p.add_argument("--large-m", default="128,256,1024",
                   help="batches where the kernel is compared with dequantise + cuBLAS (prefill)")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop sweeping (keep the best so far) after this")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = p.parse_args()
    t_start = time.monotonic()
    ms = [int(x) for x in a.m.split(",")]
    s = QWEN2_SHAPES[a.shape]
    layers = layer_shapes(a.shape)
    sms = device_sm_count(torch.device("cuda"))
    torch.manual_seed(0)
    rows, large, truncated = [], [], False
    for lname, (n, k) in layers.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        words, sc, zf = quantize_for_machete(w, 64, torch.bfloat16)
        r4 = copies_for(words.numel() * 4 + sc.numel() * 4)
        q_copies = [(words.clone(), sc.clone(), zf.clone()) for _ in range(r4)]
        r16 = copies_for(w.numel() * 2)
        w_copies = [w.clone() for _ in range(r16)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = w4a16_linear_reference(x, words, sc, zf, 64).float()
            bf16 = time_bf16(x, w_copies)
            picked = pick_config(m, n, k, 64, sms)
            results = []
            for cfg in grid(m):
                if time.monotonic() - t_start > a.budget_s:
                    truncated = True
                    break
                try:
                    got = w4a16_matmul(x, words, sc, zf, 64, config=cfg).float()
                    err = float((got - ref).norm() / ref.norm())
                    if err > 1e-2:
                        raise RuntimeError(f"relative error {err:.3g}")
                    us = time_w4(x, q_copies, cfg)
                    results.append((us, cfg))
                except Exception as exc:  # noqa: BLE001 - an unusable configuration is skipped and counted
                    results.append((float("inf"), cfg))
                    print(f"{lname} m={m} {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            if not results:  # the budget ran out before this (layer, M): report what was swept
                break
            timed = {c: us for us, c in results}
            best_us, best = min(results, key=lambda r: r[0])
            if picked not in timed and not truncated:
                timed[picked] = time_w4(x, q_copies, picked)
            row = {"layer": lname, "n": n, "k": k, "m": m, "bf16_us": round(bf16, 2),
                   "best_us": _finite(best_us), "best": best.__dict__,
                   "picked_us": _finite(timed.get(picked)), "picked": picked.__dict__,
                   "configs_timed": len(results)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        for m in [int(v) for v in a.large_m.split(",") if v]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            kernel = min(time_w4(x, q_copies, GemmConfig(128, 64, 64, 1, warps, stages))
                         for warps in (4, 8) for stages in (3, 4))
            dequant = graph_time_us([lambda c=c, x=x: torch.nn.functional.linear(
                x, dequantize_w4(W4Tensors(*c, 64), torch.bfloat16).t()) for c in q_copies])
            row = {"layer": lname, "n": n, "k": k, "m": m, "bf16_us": round(time_bf16(x, w_copies), 2),
                   "kernel_us": round(kernel, 2), "dequant_then_bf16_us": round(dequant, 2)}
            large.append(row)
            print(json.dumps(row), flush=True)
        del q_copies, w_copies, w, words
        torch.cuda.empty_cache()
    n_layers = s["num_hidden_layers"]
    per_step = {}  # ms per decode step, all layers; only for batches every layer was timed at
    for m in ms:
        got = [r for r in rows if r["m"] == m]
        if len(got) == len(layers) and all(r[key] is not None for r in got for key in ("best_us", "picked_us")):
            per_step[m] = {key.replace("_us", "_ms"): round(sum(r[key] for r in got) * n_layers / 1e3, 3)
                           for key in ("bf16_us", "best_us", "picked_us")}
    dev = torch.cuda.get_device_name()
    report = {"date": datetime.date.today().isoformat(), "device": dev, "shape": a.shape,
              "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "torch": torch.__version__,
              "method": "CUDA-graph replays cycling through >= 256 MB of weight copies (cold L2)",
              "truncated_by_budget": truncated, "rows": rows, "large_m": large, "per_step_ms": per_step}
    os.makedirs(a.out, exist_ok=True)
    slug = dev.replace("NVIDIA ", "").replace(" ", "-").lower()
    path = os.path.join(a.out, f"w4a16_sweep_{slug}_{a.shape}_{report['date']}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print("\nper decode step, all layers, ms (bf16 / best / picked):")
    for m, d in per_step.items():
        print(f"M={m}: {d['bf16_ms']:.3f} / {d['best_ms']:.3f} ({d['bf16_ms'] / d['best_ms']:.2f}x) / "
              f"{d['picked_ms']:.3f} ({d['bf16_ms'] / d['picked_ms']:.2f}x)")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
