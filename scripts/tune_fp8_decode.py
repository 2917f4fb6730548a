#!/usr/bin/env python3
"""Time trainserve's FP8 decode GEMM (``kernels/fp8_decode_gemm.py``) against cuBLAS bf16 and the
CUTLASS FP8 GEMMs, per layer of a Qwen2 shape and decode batch M, on the GPU.

Every arm is timed on **cold weights**, as in a decode step (~7 GB of FP8 weights pass between two
uses of a layer): the timed CUDA graph cycles through enough copies of the layer (>= 256 MB) that
no copy is still in L2 when it is used again. FP8 arms include the per-token activation
quantisation they need:

* ``bf16`` — ``F.linear`` on the 16-bit weight (the 16-bit engine);
* ``scaled_mm`` — trainserve's per-token quantiser + ``torch._scaled_mm`` with row-wise scales
  (PyTorch's CUTLASS FP8 kernel; vLLM's own ``cutlass_scaled_mm`` computes the same product);
* ``vllm_cutlass`` — vLLM's ``scaled_fp8_quant`` + ``cutlass_scaled_mm`` (what ``load_in_fp8`` runs
  today), where vLLM is installed;
* ``triton`` — trainserve's quantiser + the decode kernel: best configuration of the grid and the
  one :func:`pick_config` chooses.

    python3 -P scripts/tune_fp8_decode.py --shape 7b --m 16,64,128 --out benchmarks/results
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
from tune_w4a16 import _finite, copies_for, graph_time_us  # noqa: E402


def grid():
    from trainserve.kernels.fp8_decode_gemm import Fp8GemmConfig

    for bn, bk, stages, warps, split in itertools.product((256, 128, 64), (128, 256), (4, 3), (8, 4),
                                                          (1, 2, 4, 8, 16)):
        if bn == 256 and bk == 256 and stages > 2:  # over the shared memory of one block
            continue
        yield Fp8GemmConfig(block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=stages)


def main() -> int:
    import torch
    from trainserve.kernels._triton_utils import device_sm_count
    from trainserve.kernels.fp8_activations import quantize_activations
    from trainserve.kernels.fp8_decode_gemm import fp8_decode_matmul, fp8_decode_matmul_reference, pick_config

    from trainserve.random_model import QWEN2_SHAPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="7b", choices=sorted(QWEN2_SHAPES))
    p.add_argument("--m", default="16,64,128")
    p.add_argument("--budget-s", type=float, default=400.0, help="stop sweeping (keep the best so far) after this")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = p.parse_args()
    t_start = time.monotonic()
    ms = [int(x) for x in a.m.split(",")]
    layers = layer_shapes(a.shape)
    sms = device_sm_count(torch.device("cuda"))
    try:
        from vllm import _custom_ops as vllm_ops
    except Exception as exc:  # noqa: BLE001 - the arm is skipped and the reason recorded
        vllm_ops, vllm_missing = None, f"{type(exc).__name__}: {exc}"
    else:
        vllm_missing = None
    torch.manual_seed(0)
    rows, truncated = [], False
    cell_s = a.budget_s / (len(layers) * len(ms))  # each (layer, M) gets an equal share of the sweep
    for lname, (n, k) in layers.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        w_scale = (w.float().abs().amax(1, keepdim=True) / 448.0).clamp_min(1e-12)
        w_q = (w.float() / w_scale).to(torch.float8_e4m3fn)
        fp8_copies = [(w_q.clone(), w_scale.clone()) for _ in range(copies_for(w_q.numel()))]
        bf16_copies = [w.clone() for _ in range(copies_for(w.numel() * 2))]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_activations(x, "token")
            ref = fp8_decode_matmul_reference(xq, xs, w_q, w_scale, None, torch.float32)
            row = {"layer": a.shape + "/" + lname, "n": n, "k": k, "m": m}
            row["bf16_us"] = round(graph_time_us([lambda w=w_, x=x: torch.nn.functional.linear(x, w)
                                                  for w_ in bf16_copies]), 2)
            row["quant_us"] = round(graph_time_us([lambda x=x: quantize_activations(x, "token")] * 16), 2)

            def scaled_mm(x, wq, ws):
                q, s = quantize_activations(x, "token")
                return torch._scaled_mm(q, wq.t(), scale_a=s, scale_b=ws.reshape(1, -1), out_dtype=x.dtype)

            row["scaled_mm_us"] = round(graph_time_us([lambda c=c, x=x: scaled_mm(x, *c) for c in fp8_copies]), 2)
            if vllm_ops is not None:
                def cutlass(x, wq, ws):
                    q, s = vllm_ops.scaled_fp8_quant(x, scale=None, use_per_token_if_dynamic=True)
                    return vllm_ops.cutlass_scaled_mm(q, wq.t(), scale_a=s, scale_b=ws, out_dtype=x.dtype)

                row["vllm_cutlass_us"] = round(graph_time_us([lambda c=c, x=x: cutlass(x, *c) for c in fp8_copies]),
                                               2)
            results, t_cell = [], time.monotonic()
            for cfg in grid():
                if time.monotonic() - t_cell > cell_s or time.monotonic() - t_start > a.budget_s:
                    truncated = True
                    break
                try:
                    got = fp8_decode_matmul(xq, xs, w_q, w_scale, None, torch.float32, config=cfg)
                    err = float((got - ref).norm() / ref.norm())
                    if err > 1e-3:  # FP8 tensor-core sums are not fp32-exact; a wrong result is ~1
                        raise RuntimeError(f"relative error {err:.3g} against the fp32 reference")
                    row.setdefault("max_rel_err", 0.0)
                    row["max_rel_err"] = max(row["max_rel_err"], round(err, 7))
                    us = graph_time_us([lambda c=c, x=x, cfg=cfg: _linear(x, *c, cfg) for c in fp8_copies])
                    results.append((us, cfg))
                except Exception as exc:  # noqa: BLE001 - an unusable configuration is skipped and counted
                    results.append((float("inf"), cfg))
                    fails = sum(us == float("inf") for us, _ in results)
                    if fails <= 2:  # the first failures of each (layer, M) say why
                        print(f"{lname} m={m} {cfg}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            picked = pick_config(m, n, k, sms)
            row["picked"] = picked.__dict__
            calls = [lambda c=c, x=x, cfg=picked: _linear(x, *c, cfg) for c in fp8_copies]
            row["picked_us"] = round(graph_time_us(calls), 2)
            if results:
                best_us, best = min(results, key=lambda r: r[0])
                row.update(best_us=_finite(best_us), best=best.__dict__, configs_timed=len(results))
            row["weight_tb_s_picked"] = round(w_q.numel() / row["picked_us"] / 1e6, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del fp8_copies, bf16_copies, w, w_q
        torch.cuda.empty_cache()
    n_layers = QWEN2_SHAPES[a.shape]["num_hidden_layers"]
    per_step = {}
    keys = ("bf16_us", "scaled_mm_us", "vllm_cutlass_us", "picked_us", "best_us")
    for m in ms:
        got = [r for r in rows if r["m"] == m]
        if len(got) == len(layers):
            per_step[m] = {key.replace("_us", "_ms"): round(sum(r[key] for r in got) * n_layers / 1e3, 3)
                           for key in keys if all(r.get(key) is not None for r in got)}
    dev = torch.cuda.get_device_name()
    report = {"date": datetime.date.today().isoformat(), "device": dev, "shape": a.shape,
              "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "torch": torch.__version__,
              "method": "CUDA-graph replays cycling through >= 256 MB of weight copies (cold L2); FP8 arms "
                        "include the per-token activation quantisation",
              "vllm_missing": vllm_missing, "truncated_by_budget": truncated, "rows": rows, "per_step_ms": per_step}
    os.makedirs(a.out, exist_ok=True)
    slug = dev.replace("NVIDIA ", "").replace(" ", "-").lower()
    path = os.path.join(a.out, f"fp8_decode_gemm_{slug}_{a.shape}_{report['date']}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print("\nper decode step, all linear layers, ms:")
    for m, d in per_step.items():
        base = d.get("bf16_ms")
        print(f"M={m}: " + ", ".join(f"{key} {v:.3f}" + (f" ({base / v:.2f}x bf16)" if base else "")
                                    for key, v in d.items()))
    print("wrote", path)
    return 0


def _linear(x, w_q, w_scale, cfg):
    from trainserve.kernels.fp8_activations import quantize_activations
    from trainserve.kernels.fp8_decode_gemm import fp8_decode_matmul

    xq, xs = quantize_activations(x, "token")
    return fp8_decode_matmul(xq, xs, w_q, w_scale, None, x.dtype, config=cfg)


if __name__ == "__main__":
    sys.exit(main())
