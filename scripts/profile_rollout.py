"""cProfile one rollout on the stepping thread: trainserve ``fast_generate`` or vLLM's in-process ``LLM.generate``.

Shows where the CPU time of the thread that drives the engine goes, and how much of it is spent
waiting for the GPU (a GPU-bound loop waits; a CPU-bound one leaves the GPU idle).

    python scripts/profile_rollout.py --arm trainserve --shape 1.5b --out prof.txt
    python scripts/profile_rollout.py --arm vllm --shape 1.5b --out prof.txt   # detokenize=False
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rollout import ALL7, _prompts, _train_step, _write_random_adapter  # noqa: E402


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by each thread of this process, keyed ``name/tid`` (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[f"{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _python_speed() -> float:
    """Milliseconds for a fixed pure-Python loop (a slower interpreter thread shows here)."""
    t = time.perf_counter()
    d: dict[int, int] = {}
    for i in range(300_000):
        d[i & 1023] = d.get(i & 1023, 0) + i
    return round((time.perf_counter() - t) * 1e3, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=["trainserve", "vllm"], required=True)
    parser.add_argument("--shape", default="1.5b")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default=None)
    a = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import SamplingParams

    from trainserve.random_model import random_qwen2

    path = random_qwen2(a.shape, f"/tmp/trainserve-random-qwen2-{a.shape}")
    speed = {"before_engine_ms": _python_speed()}
    prompts = _prompts(a.prompts, 128)
    sp = SamplingParams(max_tokens=a.new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    if a.arm == "trainserve":
        from trainserve import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=1024, load_in_4bit=True,
                                                     fast_inference=True, gpu_memory_utilization=0.5,
                                                     max_lora_rank=a.rank)
        model = FastLanguageModel.get_peft_model(model, r=a.rank, lora_alpha=2 * a.rank, target_modules=ALL7)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        _train_step(model, opt)
        model.fast_generate(prompts[:8], sampling_params=sp)

        def rollout():
            return model.fast_generate(prompts, sampling_params=sp)
    else:
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        llm = LLM(path, quantization="bitsandbytes", enable_lora=True, max_lora_rank=a.rank, max_loras=2,
                  gpu_memory_utilization=0.5, max_model_len=1024)
        req = LoRARequest("a0", 1, _write_random_adapter("/tmp/profile-adapter", a.shape, a.rank, 0))
        sp.detokenize = False
        token_prompts = [{"prompt_token_ids": p} for p in prompts]
        llm.generate(token_prompts[:8], sp, lora_request=req, use_tqdm=False)

        def rollout():
            return llm.generate(token_prompts, sp, lora_request=req, use_tqdm=False)

    rollout()
    speed["after_warmup_ms"] = _python_speed()
    before, t = thread_cpu_seconds(), time.perf_counter()
    rollout()
    wall = time.perf_counter() - t
    after = thread_cpu_seconds()
    busy = sorted(((after[k] - before.get(k, 0.0), k) for k in after), reverse=True)[:12]
    report = [f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
              f"python speed {speed}, rollout {wall:.2f} s without profiler; CPU s per thread during it:"]
    report += [f"  {cpu:7.2f}  {name}" for cpu, name in busy]
    print("\n".join(report), flush=True)
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.enable()
    outs = rollout()
    profiler.disable()
    dt = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    buf = io.StringIO()
    buf.write("\n".join(report) + "\n")
    buf.write(f"{a.arm}: {tokens} tokens in {dt:.3f} s = {tokens / dt:.0f} tok/s (under cProfile)\n")
    stats = pstats.Stats(profiler, stream=buf)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    text = buf.getvalue()
    print(text[:6000])
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
