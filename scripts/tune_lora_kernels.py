"""Tune vLLM's LoRA (punica) Triton kernels for trainserve's decode shapes; write vLLM's config files.

Why: in a 7B decode step at batch 64 with the live adapter (H200, docs/quantization.md) vLLM's LoRA
shrink/expand kernels take ~1.3 ms of ~7 ms, as much as a fifth of the base GEMMs, and they run
vLLM's built-in default tile sizes: vLLM ships no tuned LoRA configs. vLLM reads tuned ones from
``VLLM_TUNED_CONFIG_FOLDER`` (its public switch; file names and JSON layout as in vLLM's
``lora/ops/triton_ops/README_TUNING.md``): ``<GPU>_SHRINK.json`` and ``<GPU>_EXPAND_TRUE.json``,
``config[max_loras][num_slices][m][k][n]``. This script times a grid of tile configurations for each
LoRA-wrapped projection of a Qwen2 shape — q/k/v (3 slices), o, gate/up (2 slices), down — at the
decode batch sizes asked for, inside CUDA graphs (as vLLM runs them), and writes the fastest per
shape, with the default config's time beside it in ``lora_tuning_<gpu>_<shape>.json``.

Then run any engine with ``VLLM_TUNED_CONFIG_FOLDER=<out>`` (trainserve's in-process engine reads
the variable like vLLM does). Needs CUDA and vLLM (GPU machine only).

    python3 -P scripts/tune_lora_kernels.py --shape 7b --m 64 --out /root/out/lora_configs
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

#: the engine's vLLM ``max_loras`` under trainserve's defaults: ``max_loras=1`` plus the two live slots;
#: the kernels see one more (the "no LoRA" id), which is the key vLLM looks configs up by
ENGINE_MAX_LORAS = 3
# rank 16 is one block_n of 16 for shrink and one block_k of 16 for expand; decode batches are <= 256 rows
SHRINK_SPACE = dict(block_m=[16, 64], block_n=[16], block_k=[64, 128, 256], split_k=[8, 16, 32, 64],
                    num_warps=[4], num_stages=[2, 3], num_ctas=[1])
EXPAND_SPACE = dict(block_m=[16, 64], block_n=[64, 128, 256], block_k=[16], num_warps=[4, 8],
                    num_stages=[2, 3], num_ctas=[1])


def projections(shape: dict[str, int]) -> dict[str, tuple[int, list[int]]]:
    """LoRA-wrapped projection -> (input size, output size of each slice), as vLLM stacks them."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    head = h // shape["num_attention_heads"]
    kv = head * shape["num_key_value_heads"]
    return {"qkv": (h, [h, kv, kv]), "o": (h, [h]), "gate_up": (h, [i, i]), "down": (i, [h])}


def grid(space: dict[str, list[int]]) -> list[dict[str, int]]:
    keys = list(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(space[k] for k in keys))]


def nest(entries: list[tuple[int, int, int, int, int, dict[str, Any]]]) -> dict[str, Any]:
    """vLLM's layout, ``config[max_loras][num_slices][m][k][n]``, from ``(max_loras, slices, m, k, n, cfg)``."""
    out: dict[str, Any] = {}
    for max_loras, slices, m, k, n, cfg in entries:
        out.setdefault(str(max_loras), {}).setdefault(str(slices), {}).setdefault(str(m), {}).setdefault(
            str(k), {})[str(n)] = cfg
    return out


#: batch sizes that get vLLM's own default entry in the written files: vLLM takes the *nearest*
#: entry for an untuned batch, so without them a batch of 1 would run batch 64's tiles. 127 and 128
#: sit on both sides of the shrink default's own switch at 128; 48 and 96 keep a batch-64 entry to
#: batches 57-80.
PAD_BATCHES = (1, 2, 4, 8, 16, 32, 48, 96, 127, 128, 256, 512, 1024, 2048, 4096, 8192)


def with_vllm_defaults(entries: list[tuple[int, int, int, int, int, dict[str, Any]]], op: str, utils: Any,
                       rank: int) -> list[tuple[int, int, int, int, int, dict[str, Any]]]:
    """``entries`` plus vLLM's default config at every :data:`PAD_BATCHES` size that was not tuned
    (call with vLLM pointed at no folder, so the lookups return its defaults)."""
    tuned = {(loras, slices, m, k, n) for loras, slices, m, k, n, _ in entries}
    out = list(entries)
    for loras, slices, _, k, n, _ in entries:
        hidden = k if op == "shrink" else n
        for m in PAD_BATCHES:
            if (loras, slices, m, k, n) not in tuned:
                tuned.add((loras, slices, m, k, n))
                cfg = utils.get_lora_op_configs(op, loras, m, hidden, rank, slices, True if op == "expand" else None)
                out.append((loras, slices, m, k, n, dict(cfg)))
    return sorted(out, key=lambda e: e[:5])


def gpu_file_name(device_name: str, op: str) -> str:
    """vLLM's file name for ``op`` (``SHRINK`` or ``EXPAND_TRUE``) on this GPU."""
    return f"{device_name.replace(' ', '_').replace('-', '_')}_{op}.json"


class _Bench:
    """Times one op at one shape under a fixed kernel config, inside a CUDA graph."""

    def __init__(self, torch: Any, ops: Any, utils: Any, max_loras: int, rank: int, reps: int, folder: Path):
        self.torch, self.ops, self.utils, self.reps = torch, ops, utils, reps
        self.max_loras, self.rank, self.folder = max_loras, rank, folder

    def use(self, op_file: str | None, data: dict[str, Any] | None) -> None:
        """Point vLLM at a folder holding only ``data`` as ``op_file`` (None: vLLM's defaults)."""
        if op_file is None:
            os.environ.pop("VLLM_TUNED_CONFIG_FOLDER", None)
        else:
            (self.folder / op_file).write_text(json.dumps(data))
            os.environ["VLLM_TUNED_CONFIG_FOLDER"] = str(self.folder)
        import vllm.envs as envs

        if hasattr(envs, "disable_envs_cache"):
            envs.disable_envs_cache()
        # the config lookups are memoised: a new file is read only after clearing them
        self.utils.load_lora_op_config.cache_clear()
        self.utils.get_lora_op_configs.cache_clear()

    def time_us(self, op: str, m: int, k: int, slices: list[int]) -> float:
        torch = self.torch
        dev = torch.device("cuda")
        meta = self.ops.LoRAKernelMeta.make(self.max_loras, m, dev)
        meta.prepare_tensors(torch.zeros(m, dtype=torch.int32, device=dev))  # every token on adapter 0
        args = meta.meta_args(m, True)
        bf = torch.bfloat16
        if op == "shrink":
            x = torch.randn(m, k, device=dev, dtype=bf)
            a = [torch.randn(self.max_loras, self.rank, k, device=dev, dtype=bf) * 0.01 for _ in slices]
            y = torch.zeros(len(slices), m, self.rank, device=dev, dtype=torch.float32)

            def call() -> None:
                self.ops.lora_shrink(x, a, y, *args, 1.0)
        else:
            x = torch.randn(len(slices), m, self.rank, device=dev, dtype=torch.float32)
            b = [torch.randn(self.max_loras, n, self.rank, device=dev, dtype=bf) * 0.01 for n in slices]
            y = torch.zeros(m, sum(slices), device=dev, dtype=bf)

            def call() -> None:
                self.ops.lora_expand(x, b, y, *args, offset_start=0, add_inputs=True)
        call()  # compiles, and builds the pointer tables before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.reps):
                call()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000 / self.reps)
        return sorted(times)[2]


def tune(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import torch
    import vllm.lora.ops.triton_ops as ops
    import vllm.lora.ops.triton_ops.utils as utils

    from trainserve.random_model import QWEN2_SHAPES

    shape = QWEN2_SHAPES[args.shape]
    kernel_loras = args.max_loras + 1
    bench = _Bench(torch, ops, utils, kernel_loras, args.rank, args.reps, Path(tempfile.mkdtemp(prefix="lora_tune_")))
    name = torch.cuda.get_device_name()
    files = {"shrink": gpu_file_name(name, "SHRINK"), "expand": gpu_file_name(name, "EXPAND_TRUE")}
    best: dict[str, list[tuple[int, int, int, int, int, dict[str, Any]]]] = {"shrink": [], "expand": []}
    rows = []
    t0 = time.time()
    for m in args.m:
        for proj, (k_in, slices) in projections(shape).items():
            for op, space in (("shrink", SHRINK_SPACE), ("expand", EXPAND_SPACE)):
                k, n = (k_in, args.rank) if op == "shrink" else (args.rank, max(slices))
                bench.use(None, None)
                default_us = bench.time_us(op, m, k_in, slices)
                found = (default_us, None)
                for cfg in grid(space):
                    if time.time() - t0 > args.budget_s:
                        break
                    bench.use(files[op], nest([(kernel_loras, len(slices), m, k, n, cfg)]))
                    try:
                        us = bench.time_us(op, m, k_in, slices)
                    except Exception as exc:  # a tile the kernel cannot compile (registers, shared memory)
                        print(f"  {op} {proj} m={m} {cfg}: {type(exc).__name__}", file=sys.stderr)
                        continue
                    if us < found[0]:
                        found = (us, cfg)
                default_won = found[1] is None
                if default_won:  # the default won: write it, or vLLM would give this layer the
                    bench.use(None, None)  # nearest tuned layer's tiles
                    hidden = k_in if op == "shrink" else max(slices)
                    found = (found[0], dict(utils.get_lora_op_configs(op, kernel_loras, m, hidden, args.rank,
                                                                      len(slices), True if op == "expand" else None)))
                best[op].append((kernel_loras, len(slices), m, k, n, found[1]))
                rows.append({"m": m, "projection": proj, "op": op, "k": k, "n": n, "slices": slices,
                             "default_us": round(default_us, 2), "tuned_us": round(found[0], 2),
                             "config": found[1], "default_won": default_won})
                print(f"m={m} {proj:8s} {op:6s} default {default_us:7.2f} us  tuned {found[0]:7.2f} us", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench.use(None, None)
    for op, entries in best.items():
        if entries:
            padded = with_vllm_defaults(entries, op, utils, args.rank)
            (out / files[op]).write_text(json.dumps(nest(padded), indent=1))
    layers = shape["num_hidden_layers"]
    per_step = {str(m): {"default_ms": round(sum(r["default_us"] for r in rows if r["m"] == m) * layers / 1000, 3),
                         "tuned_ms": round(sum(r["tuned_us"] for r in rows if r["m"] == m) * layers / 1000, 3)}
                for m in args.m}
    report = {"date": time.strftime("%Y-%m-%d"), "device": name, "shape": args.shape, "rank": args.rank,
              "engine_max_loras": args.max_loras, "command": " ".join(sys.argv), "per_decode_step": per_step,
              "rows": rows, "files": [files[op] for op in best if best[op]],
              "searched": {"shrink": SHRINK_SPACE, "expand": EXPAND_SPACE},
              "budget_exhausted": time.time() - t0 > args.budget_s}
    slug = name.replace(" ", "_").lower()
    (out / f"lora_tuning_{slug}_{args.shape}.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="7b", choices=["0.5b", "1.5b", "7b"])
    ap.add_argument("--m", type=int, nargs="+", default=[64], help="decode batch sizes (tokens per step)")
    ap.add_argument("--rank", type=int, default=16, help="the engine's max_lora_rank (vLLM pads adapters to it)")
    ap.add_argument("--max-loras", type=int, default=ENGINE_MAX_LORAS,
                    help="the engine's vLLM max_loras (trainserve: from_pretrained's max_loras + 2 live slots)")
    ap.add_argument("--reps", type=int, default=20, help="calls per CUDA graph")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop searching after this many seconds")
    ap.add_argument("--out", required=True, help="folder for the config files (VLLM_TUNED_CONFIG_FOLDER)")
    args = ap.parse_args(argv)
    if args.rank < 1 or args.max_loras < 1 or any(m < 1 for m in args.m):
        ap.error("--rank, --max-loras and --m must be positive")
    import torch

    if not torch.cuda.is_available():
        ap.error("needs CUDA (vLLM's LoRA kernels are Triton GPU kernels)")
    report = tune(args)
    print(json.dumps(report["per_decode_step"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
