"""The trainer's dequantisation of Machete-layout 4-bit weights on the GPU, per 7B projection.

The int4 trainer dequantises every projection before its forward GEMM and again before its
backward GEMM (``kernels/machete_dequant.py``): 8 passes over the model per 7B GRPO step with 4
micro-batches. This times its kernels (the table kernel, and the word kernel where the layout
allows it) at the real layer shapes against their floor (writing the bf16 weight and reading the
packed one once: ``2.5`` bytes per weight at the copy bandwidth measured in the same run), and
checks each bit-for-bit against the table kernel.

The layout comes from vLLM's packer (``--dump-layout FILE`` saves it) or from a saved file
(``--layout FILE``, for a machine without vLLM): the timing needs the real offset table, whose
locality decides the kernel's memory traffic.

``--gemms TOKENS`` also times the GEMMs the dequantised weight feeds, at ``TOKENS`` rows, with the
weight as the kernels write it (``(K, N)`` row-major) and as ``nn.Linear`` stores it (``(N, K)``):
the forward ``x @ W^T`` and the backward's ``dY @ W``. It answers whether the kernels should write
the other orientation.

    python3 -P scripts/bench_machete_dequant.py --shape 7b --dump-layout $OUT/machete_layout.pt --out r.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch
from trainserve.kernels import machete_dequant
from trainserve.kernels.machete_dequant import MacheteTensors
from trainserve.kernels.machete_layout import MacheteLayout, pack_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python3 -P` does not add it
from bench_fp8_train_gemms import cuda_time_ms  # noqa: E402
from bench_grpo_gpu_launch import host  # noqa: E402


def load_layout(args: argparse.Namespace) -> MacheteLayout:
    if args.layout:
        saved = torch.load(args.layout)
        return MacheteLayout(table=saved["table"], k_fastest=bool(saved["k_fastest"]))
    from trainserve.engine import vllm_compat

    layout = vllm_compat.machete_layout(vllm_compat.MacheteRunner(torch.bfloat16), torch.device("cuda"))
    if args.dump_layout:
        torch.save({"table": layout.table.cpu(), "k_fastest": layout.k_fastest}, args.dump_layout)
    return layout


def random_tensors(k: int, n: int, layout: MacheteLayout, group: int) -> MacheteTensors:
    """Random 4-bit values, scales and zero points, packed by the torch reference packer."""
    q = torch.randint(0, 16, (k, n), device="cuda", dtype=torch.int32)
    packed = pack_reference(q, layout)
    del q
    scales = torch.rand(k // group, n, device="cuda", dtype=torch.bfloat16) * 0.01 + 0.001
    zf = -scales * 8
    return MacheteTensors(packed, scales, zf, layout, group)


def copy_bandwidth_gb_s(reps: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written) of a 512 MiB bf16 buffer."""
    src = torch.empty(256 * 2**20, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / cuda_time_ms(lambda: dst.copy_(src), reps) / 1e6


def time_variant(fn, t: MacheteTensors, out: torch.Tensor, reps: int) -> float:
    return cuda_time_ms(lambda: fn(t, 0, t.n, out.dtype, out), reps)


def orientation_row(name: str, k: int, n: int, tokens: int, reps: int) -> dict:
    """One layer's forward and input-gradient GEMMs with the weight in both orientations (ms)."""
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    w_nk = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    w_kn = w_nk.t().contiguous()
    row = {"layer": name, "tokens": tokens, "k": k, "n": n,
           "forward_kn_ms": cuda_time_ms(lambda: x @ w_kn, reps),
           "forward_nk_ms": cuda_time_ms(lambda: x @ w_nk.t(), reps),
           "dgrad_kn_ms": cuda_time_ms(lambda: dy @ w_kn.t(), reps),
           "dgrad_nk_ms": cuda_time_ms(lambda: dy @ w_nk, reps)}
    return {key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}


def variants(layout: MacheteLayout) -> dict:
    """The dequantisers this layout can use: name → ``fn(t, n0, n1, dtype, out)``."""
    kernels = ("table", "words") if layout.prepack_bits else ("table",)
    return {name: functools.partial(machete_dequant.dequantize_machete, kernel=name) for name in kernels}


def main() -> None:
    from trainserve.random_model import QWEN2_SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="7b", choices=sorted(QWEN2_SHAPES))
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--layout", default=None, help="a saved layout (torch.save of table and k_fastest)")
    ap.add_argument("--dump-layout", default=None, help="save the learnt layout here")
    ap.add_argument("--gemms", type=int, default=0, metavar="TOKENS",
                    help="also time the forward and input-gradient GEMMs in both weight orientations")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = QWEN2_SHAPES[args.shape]
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    layers = {"qkv": (h, h + 2 * kv), "o": (h, h), "gate_up": (h, 2 * i), "down": (i, h)}
    if args.group <= 0 or any(k % args.group for k, _ in layers.values()):
        ap.error(f"--group {args.group} must be positive and divide every layer's input size")
    if args.gemms < 0:
        ap.error("--gemms must be a token count, or 0 to skip the GEMM timings")
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    if args.layout and args.dump_layout:
        ap.error("--dump-layout saves the layout learnt from vLLM; with --layout nothing is learnt")
    if not torch.cuda.is_available():
        raise SystemExit("bench_machete_dequant.py needs a CUDA GPU")
    layout = load_layout(args)

    copy_gbs = copy_bandwidth_gb_s(args.reps)

    rows, per_layer = [], {}
    for name, (k, n) in layers.items():
        t = random_tensors(k, n, layout, args.group)
        want = machete_dequant.dequantize_machete(t, 0, n, torch.bfloat16, kernel="table")
        floor_ms = k * n * 2.5 / copy_gbs / 1e6
        row = {"layer": name, "k": k, "n": n, "floor_ms": round(floor_ms, 4)}
        for vname, fn in variants(layout).items():
            out = torch.empty_like(want)
            fn(t, 0, n, torch.bfloat16, out)
            row[f"{vname}_equal"] = bool(torch.equal(out, want))
            ms = time_variant(fn, t, out, args.reps)
            row[f"{vname}_ms"] = round(ms, 4)
            row[f"{vname}_of_floor"] = round(floor_ms / ms, 3)
            per_layer[vname] = per_layer.get(vname, 0.0) + ms
        rows.append(row)
        print(json.dumps(row), flush=True)
        del t, want
    passes = 8  # 4 micro-batches × (forward + backward) per 7B GRPO step, no checkpointing
    summary = {v: {"ms_per_layer_pass": round(ms, 4),
                   "ms_per_grpo_step": round(ms * passes * cfg["num_hidden_layers"], 1)}
               for v, ms in per_layer.items()}
    result = {"command": "python3 -P " + " ".join(sys.argv), "host": host(), "shape": args.shape,
              "group": args.group, "copy_gb_s": round(copy_gbs, 1), "k_fastest": layout.k_fastest,
              "layers": rows, "summary": summary}
    if args.gemms:
        gemms = [orientation_row(name, k, n, args.gemms, args.reps) for name, (k, n) in layers.items()]
        for row in gemms:
            print(json.dumps(row), flush=True)
        layer_count = cfg["num_hidden_layers"] * 4  # per 7B GRPO step: 4 micro-batches
        result["gemms"] = gemms
        result["gemms_ms_per_grpo_step"] = {
            key: round(sum(r[key] for r in gemms) * layer_count, 1)
            for key in ("forward_kn_ms", "forward_nk_ms", "dgrad_kn_ms", "dgrad_nk_ms")}
        print(json.dumps(result["gemms_ms_per_grpo_step"]))
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
