"""Where the GPU time of a rollout goes: CUDA kernel time by category, with and without the live adapter.

Issue 11 asks for 4-bit rollouts at 1.5× bf16. A GRPO rollout (batch 64, 256 new tokens) spends
most of its steps in decode, and what bounds a decode step is not obvious: the base GEMMs (what a
quantised format speeds up), vLLM's LoRA kernels (punica shrink/expand, launched per module and
per layer), attention, sampling, or idle GPU time while the CPU prepares the next step. This
script loads one trainserve format, trains one step so the live adapter is non-zero, and
profiles one rollout with ``torch.profiler`` (CUPTI records the kernels inside vLLM's CUDA graphs
too), once with the live adapter and once inside ``disable_adapter()`` (the base model). Every
rollout runs on a fresh prompt set; before 2026-12-02 the timed rollouts repeated the warm-up's
prompts under the same adapter version, so vLLM's prefix cache served most of their prefill (in
every format alike).

    python -P scripts/profile_decode_kernels.py --shape 7b --formats int4 bf16 fp8 --out /tmp/prof.json

Prints a table per run: kernel category → GPU ms per decode step and share of the wall time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_grpo_gpu_profile import category  # noqa: E402
from bench_rollout import ALL7, TS_FORMATS, _prompts, _train_step  # noqa: E402
from profile_rollout import thread_cpu_seconds  # noqa: E402

# First match wins; names are lower-cased kernel names.
CATEGORIES = [
    ("lora", ("lora", "sgmv", "bgmv", "shrink", "expand", "punica")),
    ("attention", ("flash", "fmha", "attention", "paged", "reshape_and_cache")),
    ("base_gemm", ("marlin", "machete", "gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "fp8", "scaled_mm")),
    ("norm_act_rope", ("rms", "norm", "silu", "act_and_mul", "rotary", "rope")),
    ("sampling", ("sample", "softmax", "topk", "top_k", "argmax", "gumbel", "exponential", "log_softmax")),
]


# CPU-side calls in which the stepping thread waits for the GPU (or copies device → host)
WAIT_OPS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
            "cudaMemcpyAsync", "aten::_local_scalar_dense")


def cpu_waits(events) -> dict[str, list]:
    """Wait-type CPU calls of a profiled rollout, ``{name: [ms, calls]}``: how long the engine loop
    blocked on the GPU explicitly. (The CUDA runtime events carry no Python stack, so this is by
    call, not by call site.)"""
    out: dict[str, list] = {}
    for evt in events:
        if evt.name in WAIT_OPS:
            entry = out.setdefault(evt.name, [0.0, 0])
            entry[0] += evt.self_cpu_time_total / 1e3
            entry[1] += 1
    return {k: [round(v[0], 2), v[1]] for k, v in sorted(out.items(), key=lambda kv: -kv[1][0])}


def _profile(fn) -> tuple[float, dict, list, dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    by_cat: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
        cat = category(evt.name, CATEGORIES)
        by_cat[cat] = by_cat.get(cat, 0.0) + us
        kernels[evt.name] = kernels.get(evt.name, 0.0) + us
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return wall, by_cat, top, cpu_waits(prof.events())


def engine_config(model) -> dict:
    """Whether the engine loop can overlap its CPU work with the GPU (vLLM's async scheduling runs
    the next step's scheduling while this one executes): read from the running engine, best effort."""
    from trainserve.model_api import state_of

    try:
        llm_engine = state_of(model).engine.llm.llm_engine
        cfg = llm_engine.vllm_config
        core = getattr(llm_engine.engine_core, "engine_core", None)
        return {"async_scheduling": cfg.scheduler_config.async_scheduling,
                "max_concurrent_batches": getattr(cfg, "max_concurrent_batches", None),
                "step_fn": getattr(getattr(core, "step_fn", None), "__name__", None),
                "cudagraph_mode": str(getattr(cfg.compilation_config, "cudagraph_mode", None))}
    except Exception as exc:  # a diagnostic: never the reason a profile is lost
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_format(a, fmt: str) -> dict:
    import torch
    from vllm import SamplingParams

    from trainserve import FastLanguageModel

    t0 = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(a.path, max_seq_length=a.max_len, fast_inference=True,
                                                 gpu_memory_utilization=a.util, max_lora_rank=a.rank,
                                                 **TS_FORMATS[fmt])
    free, total = torch.cuda.mem_get_info()
    load = {"load_s": round(time.perf_counter() - t0, 1),
            "int4_kernel": os.environ.get("TRAINSERVE_INT4_KERNEL", "auto"),
            "device_used_after_load_gib": round((total - free) / 2**30, 2),
            "torch_allocated_after_load_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
            "torch_max_allocated_during_load_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    load["engine"] = engine_config(model)
    model = FastLanguageModel.get_peft_model(model, r=a.rank, lora_alpha=2 * a.rank, target_modules=ALL7)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _train_step(model, opt)
    prompts = _prompts(a.batch, a.prompt_len)
    sp = SamplingParams(max_tokens=a.new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    model.fast_generate(prompts[:8], sampling_params=sp)
    out = {"format": fmt, **load}
    out["vllm_lora_dual_stream"] = os.environ.get("VLLM_LORA_ENABLE_DUAL_STREAM", "0")
    seeds = itertools.count(1)

    for mode in a.modes:
        def gen(mode=mode):
            # fresh prompts for every rollout: a repeated prompt set would take most of its prefill from
            # vLLM's prefix cache (same adapter version), which no RL rollout gets
            batch = _prompts(a.batch, a.prompt_len, seed=next(seeds))
            if mode == "base":
                with model.disable_adapter():
                    return model.fast_generate(batch, sampling_params=sp)
            return model.fast_generate(batch, sampling_params=sp)

        gen()  # warm (CUDA graphs for this batch size)
        cpu0, t = thread_cpu_seconds(), time.perf_counter()
        gen()
        torch.cuda.synchronize()
        plain_wall = time.perf_counter() - t
        cpu1 = thread_cpu_seconds()
        # the thread that steps the engine: near 1.0 means it never slept (CPU-bound, or spinning in a
        # CUDA wait: compare cpu_waits_ms_calls); well below 1.0, it slept waiting for the GPU
        busiest = max((cpu1[k] - cpu0.get(k, 0.0), k) for k in cpu1)
        wall, by_cat, top, waits = _profile(gen)
        steps = a.new_tokens
        out[mode] = {
            "wall_s_unprofiled": round(plain_wall, 3), "wall_s_profiled": round(wall, 3),
            "tok_s_unprofiled": round(a.batch * a.new_tokens / plain_wall, 1),
            "busiest_thread": busiest[1], "busiest_thread_cpu_share": round(busiest[0] / plain_wall, 3),
            "gpu_ms_per_step": {k: round(v / 1e3 / steps, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "gpu_busy_share": round(sum(by_cat.values()) / 1e6 / wall, 3),
            "wall_ms_per_step": round(wall * 1e3 / steps, 3),
            "top_kernels_ms": [(n[:120], round(us / 1e3, 2)) for n, us in top],
            "cpu_waits_ms_calls": waits,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="7b")
    p.add_argument("--path")
    p.add_argument("--formats", nargs="+", default=["int4", "bf16"], choices=sorted(TS_FORMATS))
    p.add_argument("--format", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--util", type=float, default=0.5)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--modes", nargs="+", default=["live_adapter", "base"], choices=["live_adapter", "base"],
                   help="profile the rollout with the live adapter, inside disable_adapter() (base), or both")
    p.add_argument("--dual-stream", nargs="+", default=["default"], choices=["default", "off", "on"],
                   help="run each format once per setting of vLLM's VLLM_LORA_ENABLE_DUAL_STREAM (LoRA kernels "
                        "on a second CUDA stream beside the base GEMM); default: the environment as it is")
    p.add_argument("--out")
    a = p.parse_args()
    if a.path is None:
        from trainserve.random_model import random_qwen2

        a.path = random_qwen2(a.shape, f"/tmp/trainserve-random-qwen2-{a.shape}")
    if a.format:
        print("RESULT " + json.dumps(run_format(a, a.format)), flush=True)
        return
    results = []
    for fmt in a.formats:  # one process per format and setting: each engine owns the GPU alone
        for dual in a.dual_stream:
            env = dict(os.environ)
            if dual != "default":
                env["VLLM_LORA_ENABLE_DUAL_STREAM"] = "1" if dual == "on" else "0"
            cmd = [sys.executable, "-P", __file__, "--format", fmt, "--path", a.path,
                   *[x for x in sys.argv[1:]]]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else {"format": fmt, "error": (proc.stderr or proc.stdout)[-3000:]}
            res["dual_stream_setting"] = dual
            results.append(res)
            print(json.dumps(res, indent=1)[:6000], flush=True)
            if a.out:  # after every run: a call that runs out of time keeps the runs it finished
                with open(a.out, "w") as f:
                    json.dump({"command": " ".join(["python", *sys.argv]), "shape": a.shape, "batch": a.batch,
                               "new_tokens": a.new_tokens, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
