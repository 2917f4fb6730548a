"""The FP8 trainer's forward GEMM (per-token FP8 input × per-channel FP8 weight → bf16), timed per
7B layer shape at a training micro-batch's token count: ``torch._scaled_mm`` with row-wise scales
(what :func:`trainserve.kernels.fp8_activations.fp8_rowwise_matmul` calls) against vLLM's CUTLASS
``cutlass_scaled_mm`` (what the engine's FP8 layers call), on the same quantised operands.

    python3 -P scripts/bench_fp8_forward.py --tokens 6144 --out results.json

Prints ms and TFLOP/s per layer and the sum per training step (28 layers x --micro-batches
forwards), and the largest difference between the two outputs. Needs a Hopper GPU; the vLLM arm
needs vLLM's compiled ops.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from trainserve.kernels.fp8_activations import E4M3, quantize_activations

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


def _layer(name: str, n: int, k: int, a: argparse.Namespace, vllm_mm) -> dict:
    w = torch.randn(n, k, device="cuda") * 0.02
    s_w = (w.abs().amax(1, keepdim=True) / 448.0).float()
    wq = (w / s_w).clamp(-448, 448).to(E4M3)  # (N, K) row-major, as the engine stores it
    x = torch.randn(a.tokens, k, device="cuda").bfloat16()
    q, s_x = quantize_activations(x, "token")
    s_row = s_w.reshape(1, -1).contiguous()

    def torch_mm():
        return torch._scaled_mm(q, wq.t(), scale_a=s_x, scale_b=s_row, out_dtype=torch.bfloat16)

    flop = 2 * a.tokens * n * k
    row = {"layer": name, "n": n, "k": k, "torch_scaled_mm_ms": _time(torch_mm, a.reps)}
    row["torch_tflops"] = round(flop / row["torch_scaled_mm_ms"] / 1e9, 1)
    if vllm_mm is not None:
        def cutlass():
            return vllm_mm(q, wq.t(), s_x, s_w, torch.bfloat16)

        row["vllm_cutlass_ms"] = _time(cutlass, a.reps)
        row["vllm_tflops"] = round(flop / row["vllm_cutlass_ms"] / 1e9, 1)
        ref = torch_mm().float()
        row["max_abs_diff"] = (cutlass().float() - ref).abs().max().item()
        row["ref_abs_max"] = ref.abs().max().item()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=6144)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("bench_fp8_forward.py needs a CUDA GPU of compute capability 9.0 or newer")
    try:
        from vllm import _custom_ops as ops

        vllm_mm = ops.cutlass_scaled_mm
    except Exception as exc:  # noqa: BLE001 - the torch arm still runs
        print(f"vLLM's cutlass_scaled_mm is not available ({exc}); timing torch only")
        vllm_mm = None
    torch.manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES_7B.items():
        rows.append(_layer(name, n, k, a, vllm_mm))
        print(json.dumps(rows[-1]))
        torch.cuda.empty_cache()
    per = a.layers * a.micro_batches
    keys = ["torch_scaled_mm_ms"] + (["vllm_cutlass_ms"] if vllm_mm is not None else [])
    summary = {k: round(sum(r[k] for r in rows) * per, 1) for k in keys}
    print("per training step (ms):", summary)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": a.tokens,
                       "rows": rows, "per_step_ms": summary}, f, indent=1)


if __name__ == "__main__":
    main()
