"""The FP8 trainer's two big GEMMs, timed per layer of a Qwen2 shape at a training micro-batch's
token count, on the GPU. Kernel timings only: they tell where an FP8 training step's GEMM time goes
and what another kernel or precision would save there.

``forward``: per-token FP8 input × per-channel FP8 weight → bf16, through ``torch._scaled_mm`` with
row-wise scales (what :func:`trainserve.kernels.fp8_activations.fp8_rowwise_matmul` calls) and
through vLLM's CUTLASS ``cutlass_scaled_mm`` (what the engine's FP8 layers call), same operands.

``backward``: the input gradient ``dX = dY @ W``. Today it runs on the weight dequantised to bf16
(:func:`trainserve.kernels.fp8_dequant.dequantize_fp8`, then a bf16 GEMM). The FP8 alternative
scales ``dY`` by the weight's channel scales, rounds it to e4m3 per token, and multiplies by an FP8
copy of the weight transposed to K-major (Hopper's FP8 GEMMs take K-major operands only). Timed
whole, with the transpose cached, and as the GEMM alone; plus both paths' relative error against
an fp32 product of the same FP8 weight.

    python3 -P scripts/bench_fp8_train_gemms.py forward --shape 7b --tokens 6144 --out fwd.json
    python3 -P scripts/bench_fp8_train_gemms.py backward --shape 7b --tokens 6144 --out bwd.json

Prints one JSON line per layer and the sums per training step (all layers × --micro-batches).
Needs a CUDA GPU of compute capability 9.0 or newer; the vLLM arm of ``forward`` needs vLLM's ops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable

import torch
from trainserve.kernels.fp8_activations import E4M3, quantize_activations
from trainserve.kernels.fp8_dequant import dequantize_fp8

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python3 -P` does not add it
from bench_quant_gemm import layer_shapes  # noqa: E402


def cuda_time_ms(fn: Callable[[], object], reps: int) -> float:
    """Median ms of ``fn`` between CUDA events, after 3 warm-up calls."""
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


def _fp8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``(N, K)`` weight as the engine stores it: FP8 row-major, fp32 scale per row ``(N, 1)``."""
    w = torch.randn(n, k, device="cuda") * 0.02
    s_w = (w.abs().amax(1, keepdim=True) / 448.0).float()
    return (w / s_w).clamp(-448, 448).to(E4M3), s_w


def _forward_layer(name: str, n: int, k: int, a: argparse.Namespace, vllm_mm) -> dict:
    wq, s_w = _fp8_weight(n, k)
    q, s_x = quantize_activations(torch.randn(a.tokens, k, device="cuda").bfloat16(), "token")
    s_row = s_w.reshape(1, -1).contiguous()

    def torch_mm():
        return torch._scaled_mm(q, wq.t(), scale_a=s_x, scale_b=s_row, out_dtype=torch.bfloat16)

    flop = 2 * a.tokens * n * k
    row = {"layer": name, "n": n, "k": k, "torch_scaled_mm_ms": cuda_time_ms(torch_mm, a.reps)}
    row["torch_tflops"] = round(flop / row["torch_scaled_mm_ms"] / 1e9, 1)
    if vllm_mm is not None:
        def cutlass():
            return vllm_mm(q, wq.t(), s_x, s_w, torch.bfloat16)

        row["vllm_cutlass_ms"] = cuda_time_ms(cutlass, a.reps)
        row["vllm_tflops"] = round(flop / row["vllm_cutlass_ms"] / 1e9, 1)
        ref = torch_mm().float()
        row["max_abs_diff"] = (cutlass().float() - ref).abs().max().item()
        row["ref_abs_max"] = ref.abs().max().item()
    return row


def _backward_layer(name: str, n: int, k: int, a: argparse.Namespace) -> dict:
    wq, s = _fp8_weight(n, k)
    g = (torch.randn(a.tokens, n, device="cuda") * torch.exp(torch.randn(a.tokens, 1, device="cuda"))).bfloat16()
    ones = torch.ones(1, k, device="cuda", dtype=torch.float32)
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
    return {"layer": name, "n": n, "k": k, "bf16_ms": cuda_time_ms(bf16_path, a.reps),
            "fp8_ms": cuda_time_ms(fp8_path, a.reps),
            "fp8_cached_transpose_ms": cuda_time_ms(lambda: fp8_path(wt_cached), a.reps),
            "fp8_gemm_only_ms": cuda_time_ms(lambda: torch._scaled_mm(q_cached, wt_cached.t(), scale_a=sa_cached,
                                                                      scale_b=ones, out_dtype=torch.bfloat16),
                                             a.reps),
            "bf16_gemm_only_ms": cuda_time_ms(lambda: g @ w_bf16, a.reps),
            "transpose_ms": cuda_time_ms(lambda: wq.t().contiguous(), a.reps),
            "dequant_ms": cuda_time_ms(lambda: dequantize_fp8(wq, s, "channel", torch.bfloat16), a.reps),
            "rel_err_bf16": err_bf16, "rel_err_fp8": err_fp8}


def main() -> None:
    from trainserve.random_model import QWEN2_SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("forward", "backward"))
    ap.add_argument("--shape", default="7b", choices=sorted(QWEN2_SHAPES))
    ap.add_argument("--tokens", type=int, default=6144, help="tokens per micro-batch (16 x 384 in the GRPO bench)")
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("bench_fp8_train_gemms.py needs a CUDA GPU of compute capability 9.0 or newer "
                         "(row-wise scaled FP8 GEMMs)")
    layers = layer_shapes(a.shape)
    vllm_mm = None
    if a.part == "forward":
        try:
            from vllm import _custom_ops as ops

            vllm_mm = ops.cutlass_scaled_mm
        except Exception as exc:  # noqa: BLE001 - the torch arm still runs
            print(f"vLLM's cutlass_scaled_mm is not available ({exc}); timing torch only")
    torch.manual_seed(0)
    rows = []
    for name, (n, k) in layers.items():
        rows.append(_forward_layer(name, n, k, a, vllm_mm) if a.part == "forward" else _backward_layer(name, n, k, a))
        print(json.dumps(rows[-1]))
        torch.cuda.empty_cache()
    per = QWEN2_SHAPES[a.shape]["num_hidden_layers"] * a.micro_batches
    keys = [key for key in rows[0] if key.endswith("_ms") and key not in ("transpose_ms", "dequant_ms")]
    summary = {key: round(sum(r[key] for r in rows) * per, 1) for key in keys}
    print("per training step (ms):", summary)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "part": a.part,
                       "shape": a.shape, "tokens": a.tokens, "rows": rows, "per_step_ms": summary}, f, indent=1)


if __name__ == "__main__":
    main()
