#!/usr/bin/env python3
"""Per-layer GEMM speed and quantisation error of the engine weight formats, on the GPU.

For each linear layer of a Qwen2 shape (q/k/v fused, o, gate/up fused, down) and each batch of
decode tokens M, the median time of ``y = x W^T`` through:

* ``bf16`` — cuBLAS on the 16-bit weight (what the 16-bit engine runs);
* ``int4`` / ``int8`` — vLLM's Marlin kernel on trainserve's layout (``vllm_compat.MarlinRunner``);
* ``int4_machete`` — the same 4-bit format through vLLM's Hopper Machete kernel (``vllm_compat.MacheteRunner``);
* ``nf4_bnb`` — ``bitsandbytes.matmul_4bit`` as vLLM's bitsandbytes method calls it;
* ``fp8`` — dynamic per-token FP8 activations × per-channel FP8 weights (vLLM's ``cutlass_scaled_mm``);
* ``int4_triton`` — the same 4-bit weights, unshuffled (GPTQ order), through trainserve's own Triton
  GEMM (``kernels/w4a16_gemm.py``);
* ``int4_gemlite`` — the same kind of 4-bit weights (asymmetric, groups of 64) through gemlite's Triton
  kernels (``A16Wn``, HQQ convention ``(q - zero) * scale``), to see whether a Triton W4A16 GEMM beats
  Machete at decode batches of 16-128; gemlite is not in the GPU bundle: put its source folder on
  ``PYTHONPATH`` (``pip download --no-deps gemlite==0.6.0.post2``, extract ``gemlite/``, carry it);
* ``w4a8`` — timing only: vLLM's CUTLASS W4A8 kernel (Hopper; symmetric int4 weights in groups of 128 with
  FP8 group scales × per-channel scales, per-token FP8 activations, as ``CutlassW4A8LinearKernel`` runs it),
  on random weights: to see how fast a 4-bit format with FP8 activations could decode;

plus the trainer's dequantisation time (Triton Marlin dequant, NF4 dequant, FP8 ``to``), a whole
decoder stack's sum ("per step", all layers), and each format's relative weight and output error
against bf16 on the real-shape layers. Timings are CUDA-graph replays (``do_bench_cudagraph``,
median) where the op can be captured, else ``do_bench``.

    python3 -P scripts/bench_quant_gemm.py --shape 7b --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from types import SimpleNamespace

ARMS = ("bf16", "int4", "int4_machete", "int4_triton", "int4_gemlite", "int8", "nf4_bnb", "fp8", "w4a8")


def layer_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of one decoder layer's linear layers as vLLM fuses them (q|k|v, o, gate|up, down)."""
    from trainserve.random_model import QWEN2_SHAPES

    s = QWEN2_SHAPES[shape]
    h, inter = s["hidden_size"], s["intermediate_size"]
    head = h // s["num_attention_heads"]
    q, kv = h, s["num_key_value_heads"] * head
    return {"qkv": (q + 2 * kv, h), "o": (h, h), "gate_up": (2 * inter, h), "down": (h, inter)}


def _bench(fn) -> float:
    import torch
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    try:
        return float(tt.do_bench_cudagraph(fn, rep=60, return_mode="median")) * 1e3
    except Exception:  # noqa: BLE001 - an op that cannot be captured is timed without graphs
        return float(tt.do_bench(fn, warmup=25, rep=60, return_mode="median")) * 1e3


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def int4_groups(w, group: int):
    """Asymmetric round-to-nearest 4-bit quantisation in groups along the input dimension:
    ``(q uint8 (N, K), scale (N, K/g), zero (N, K/g), dense bf16 (N, K))``, ``w ≈ (q - zero) * scale``."""
    import torch

    n, k = w.shape
    wg = w.float().view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    zero = (-lo / scale).round()
    q = (wg / scale[..., None] + zero[..., None]).round().clamp(0, 15)
    dense = ((q - zero[..., None]) * scale[..., None]).view(n, k).to(torch.bfloat16)
    return q.view(n, k).to(torch.uint8), scale, zero, dense


def _arms(w, want: set[str]):
    """{arm: (matmul(x) -> y, dequant() -> dense or None, dense weight for the error)}"""
    import torch
    from trainserve.kernels.marlin_dequant import dequantize_marlin
    from trainserve.kernels.marlin_layout import IntFormat, quantize_to_marlin

    n, k = w.shape
    out = {}
    if "bf16" in want:
        out["bf16"] = (lambda x: torch.nn.functional.linear(x, w), None, w)
    for name, fmt in (("int4", IntFormat(4, 64, True)), ("int8", IntFormat(8, 128, False))):
        if name not in want:
            continue
        from trainserve.engine.vllm_compat import MarlinRunner

        t = quantize_to_marlin(w, fmt, torch.bfloat16)
        zeros = t.zeros if t.zeros is not None else torch.empty(0, dtype=torch.int32, device=w.device)
        runner = MarlinRunner(SimpleNamespace(qweight=t.qweight, trainserve_shape=(n, k)), fmt)
        dense = dequantize_marlin(t, fmt, torch.bfloat16).t()
        out[name] = ((lambda x, r=runner, t=t, z=zeros: r(x, t.qweight, t.scales, z, None)),
                     (lambda t=t, f=fmt: dequantize_marlin(t, f, torch.bfloat16)), dense)
    if "int4_machete" in want:
        from trainserve.kernels.machete_dequant import MacheteTensors, dequantize_machete
        from trainserve.kernels.machete_layout import quantize_for_machete

        from trainserve.engine.vllm_compat import MacheteRunner, machete_layout

        runner = MacheteRunner(torch.bfloat16)
        words, scales, zf = quantize_for_machete(w, 64, torch.bfloat16)
        t = MacheteTensors(runner.prepack(words), scales, zf, machete_layout(runner, w.device), 64)
        out["int4_machete"] = ((lambda x, r=runner, t=t: r(x, t.qweight, t.scales, t.zf, 64, None)),
                               (lambda t=t: dequantize_machete(t, 0, t.n, torch.bfloat16)),
                               dequantize_machete(t, 0, t.n, torch.bfloat16).t())
    if "int4_triton" in want:
        from trainserve.kernels.machete_layout import quantize_for_machete
        from trainserve.kernels.w4_dequant import W4Tensors, dequantize_w4
        from trainserve.kernels.w4a16_gemm import w4a16_matmul

        t4 = W4Tensors(*quantize_for_machete(w, 64, torch.bfloat16), 64)
        out["int4_triton"] = ((lambda x, t=t4: w4a16_matmul(x, t.qweight, t.scales, t.zf, 64)),
                              (lambda t=t4: dequantize_w4(t, torch.bfloat16)),
                              dequantize_w4(t4, torch.bfloat16).t())
    if "int4_gemlite" in want:
        try:
            import gemlite
            from gemlite.helper import A16Wn

            if "h200" in torch.cuda.get_device_name().lower():  # gemlite ships H100 configs, none for H200
                gemlite.load_config(os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json"))

            q, scale, zero, dense = int4_groups(w, 64)
            layer = A16Wn(device=w.device, dtype=torch.bfloat16).from_weights(
                q, scale.to(torch.bfloat16), zero.to(torch.bfloat16), W_nbits=4, group_size=64)
            out["int4_gemlite"] = ((lambda x, m=layer: m(x)), None, dense)
        except Exception as exc:  # noqa: BLE001 - recorded
            print(f"int4_gemlite unavailable: {exc}", flush=True)
    if "nf4_bnb" in want:
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bf
            from trainserve.kernels.nf4 import dequantize_nf4

            packed, qs = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
            dense = bf.dequantize_4bit(packed, qs)
            out["nf4_bnb"] = ((lambda x, p=packed, q=qs: bnb.matmul_4bit(x, p.t(), q)),
                              (lambda p=packed, q=qs: dequantize_nf4(p, q, torch.bfloat16)), dense)
        except Exception as exc:  # noqa: BLE001 - recorded
            print(f"nf4_bnb unavailable: {exc}", flush=True)
    if "fp8" in want:
        try:
            from vllm import _custom_ops as ops

            qw, sw = ops.scaled_fp8_quant(w, scale=None, use_per_token_if_dynamic=True)
            w_t = qw.t()
            dense = (qw.to(torch.float32) * sw).to(torch.bfloat16)

            def fp8_mm(x, w_t=w_t, sw=sw):
                xq, sx = ops.scaled_fp8_quant(x, scale=None, use_per_token_if_dynamic=True)
                return ops.cutlass_scaled_mm(xq, w_t, scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)

            out["fp8"] = (fp8_mm, (lambda q=qw, s=sw: (q.to(torch.bfloat16) * s.to(torch.bfloat16)).t()), dense)
        except Exception as exc:  # noqa: BLE001 - recorded
            print(f"fp8 unavailable: {exc}", flush=True)
    if "w4a8" in want:
        try:
            from vllm import _custom_ops as ops

            packed = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=w.device)
            b_q = ops.cutlass_encode_and_reorder_int4b(packed.t().contiguous().t())
            group_scales = ops.cutlass_pack_scale_fp8(
                (torch.rand(k // 128, n, device=w.device) * 0.5 + 0.5).to(torch.float8_e4m3fn).contiguous())
            chan_scales = torch.full((n, 1), 0.01, device=w.device, dtype=torch.float32)

            def w4a8_mm(x, b_q=b_q, gs=group_scales, cs=chan_scales):
                xq, sx = ops.scaled_fp8_quant(x, scale=None, use_per_token_if_dynamic=True)
                return ops.cutlass_w4a8_mm(a=xq, b_q=b_q, b_group_scales=gs, b_group_size=128,
                                           b_channel_scales=cs, a_token_scales=sx)

            out["w4a8"] = (w4a8_mm, None, None)
        except Exception as exc:  # noqa: BLE001 - recorded
            print(f"w4a8 unavailable: {exc}", flush=True)
    return out


def main() -> int:
    import torch

    from trainserve.random_model import QWEN2_SHAPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="7b", choices=sorted(QWEN2_SHAPES))
    p.add_argument("--m", default="1,16,64,128,256")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = p.parse_args()
    ms = [int(m) for m in a.m.split(",")]
    want = set(a.arms.split(","))
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    layers = layer_shapes(a.shape)
    n_layers = QWEN2_SHAPES[a.shape]["num_hidden_layers"]
    rows, errors, dequant = [], {}, {}
    for lname, (n, k) in layers.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        arms = _arms(w, want)
        xe = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
        ref = xe.float() @ w.float().t()
        for name, (_, deq, dense) in arms.items():
            if name != "bf16" and dense is not None:
                errors.setdefault(name, {})[lname] = {
                    "weight_rel_err": round(_rel(dense, w), 5),
                    "output_rel_err": round(_rel(arms[name][0](xe), ref), 5)}
            if name != "bf16" and deq is not None:
                dequant.setdefault(name, {})[lname] = round(_bench(deq), 2)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"layer": lname, "n": n, "k": k, "m": m}
            for name, (mm, _, _) in arms.items():
                row[name] = round(_bench(lambda mm=mm, x=x: mm(x)), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del arms, w
        torch.cuda.empty_cache()
    per_step = {}
    for m in ms:
        per_step[m] = {name: round(sum(r[name] for r in rows if r["m"] == m and name in r) * n_layers / 1e3, 3)
                       for name in ARMS if any(name in r for r in rows)}
    report = {"date": datetime.date.today().isoformat(), "device": dev, "shape": a.shape,
              "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "torch": torch.__version__, "unit": "microseconds per GEMM (median); per_step in ms (all layers)",
              "rows": rows, "per_step_ms": per_step, "error_vs_bf16": errors, "trainer_dequant_us": dequant}
    os.makedirs(a.out, exist_ok=True)
    slug = dev.replace("NVIDIA ", "").replace(" ", "-").lower()
    path = os.path.join(a.out, f"quant_gemm_{slug}_{a.shape}_{report['date']}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    names = [x for x in ARMS if x in per_step[ms[0]]]
    print(f"\n{dev}, Qwen2-{a.shape}: all linear layers of one decode step, ms (x over bf16)")
    print("| M | " + " | ".join(names) + " |")
    for m in ms:
        base = per_step[m].get("bf16")
        cells = [f"{per_step[m][x]:.3f}" + (f" ({base / per_step[m][x]:.2f}x)" if base and x != "bf16" else "")
                 for x in names]
        print(f"| {m} | " + " | ".join(cells) + " |")
    print("errors vs bf16:", json.dumps(errors))
    print("trainer dequant us:", json.dumps(dequant))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
