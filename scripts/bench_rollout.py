"""Rollout and hot-swap benchmark (issue 5): trainserve vs plain vLLM vs Unsloth, one arm per process.

Qwen2 shape with random weights, bitsandbytes 4-bit, LoRA r=16 on all 7 modules, N prompts of
128 tokens → 256 new tokens with ``ignore_eos``. Per arm: output tokens/s (median over timed
rollouts, each on a fresh prompt set, the same sets in every arm), prompt tokens taken from the
prefix cache (should be 0), adapter-update-to-visible latency (median of 20), engine start, peak
GPU memory (device-level, sampled). Before 2026-12-02 the timed rollouts repeated one prompt set,
and the plain-vLLM and Unsloth arms, which reuse one adapter id, took most of each repeat's
prefill from the prefix cache; trainserve's live adapter never can (a new cache key per version).

    python scripts/bench_rollout.py --all --shape 1.5b      # every arm, each in its own process
    python scripts/bench_rollout.py --arm trainserve          # one arm, prints JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

from trainserve.precision import WEIGHT_FORMAT_FLAGS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python3 -P` does not add it
from bench_grpo_gpu_launch import host  # noqa: E402

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# trainserve's weight formats by short name (bitsandbytes NF4 keeps this script's arm name "bnb")
TS_FORMATS = {("bnb" if name == "nf4" else name): flags for name, flags in WEIGHT_FORMAT_FLAGS.items()}


class PeakMemory:
    """Device-level memory in use (total − free), sampled at the points that matter."""

    def __init__(self) -> None:
        self.peak = 0

    def sample(self) -> None:
        import torch

        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        self.peak = max(self.peak, total - free)

    @property
    def gb(self) -> float:
        return round(self.peak / 1e9, 2)


def _prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(length)] for _ in range(n)]


def _rollout_prompts(a, first: int = 1) -> list[list[list[int]]]:
    """One fresh prompt set per timed rollout (seeds ``first``, ``first + 1``, ...), the same in every arm.

    Why fresh: vLLM's prefix cache keeps the prompts' KV between two rollouts that reuse prompts and
    adapter id, so a repeat with the same prompts skips most of its prefill (112 of 128 tokens
    per prompt with 16-token blocks). An RL rollout never gets that (new prompts every step, and
    trainserve's live adapter takes a new cache key at every version), so no arm may either.
    """
    return [_prompts(a.prompts, a.prompt_len, seed=first + r) for r in range(a.repeats)]


def _rollout_token_prompts(a, first: int = 1) -> list[list[dict]]:
    """:func:`_rollout_prompts` as vLLM ``TokensPrompt`` dicts (what ``LLM.generate`` takes)."""
    return [[{"prompt_token_ids": p} for p in ps] for ps in _rollout_prompts(a, first)]


def _cached_tokens(outputs) -> int:
    """Prompt tokens vLLM took from its prefix cache in these outputs (0 when none or not reported)."""
    return sum(getattr(o, "num_cached_tokens", None) or 0 for o in outputs)


def _write_random_adapter(path: str, shape: str, rank: int, seed: int) -> str:
    """A PEFT LoRA directory with random non-zero weights (no model needed)."""
    import torch
    from safetensors.torch import save_file

    from trainserve.random_model import QWEN2_SHAPES

    s = QWEN2_SHAPES[shape]
    h, inter = s["hidden_size"], s["intermediate_size"]
    head = h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * head, s["num_key_value_heads"] * head
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(s["num_hidden_layers"]):
        for name, (fin, fout) in dims.items():
            kind = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{i}.{kind}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fin, generator=g) * 0.01).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fout, rank, generator=g) * 0.01).to(torch.bfloat16)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ALL7,
                   "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": ""}, f)
    return path


def _timed(fn, prompt_sets: list, before=None) -> tuple[float, list, int]:
    """Median seconds of ``fn(prompts)`` over the prompt sets (``before()`` untimed ahead of each),
    the last outputs, and the prompt tokens taken from the prefix cache over all calls."""
    seconds, outs, cached = [], None, 0
    for prompts in prompt_sets:
        if before is not None:
            before()
        t = time.perf_counter()
        outs = fn(prompts)
        seconds.append(time.perf_counter() - t)
        cached += _cached_tokens(outs)
    return statistics.median(seconds), outs, cached


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The rollout workload's options (shared by the rollout scripts)."""
    parser.add_argument("--shape", default="1.5b")
    parser.add_argument("--path", default=None)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--util", type=float, default=0.5)
    parser.add_argument("--max-len", type=int, default=1024)


def _train_step(model, opt, device="cuda") -> None:
    import torch

    ids = torch.randint(3, 500, (2, 128), device=device)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def arm_trainserve(a) -> dict:
    import torch
    from vllm import SamplingParams

    from trainserve import FastLanguageModel
    from trainserve.model_api import state_of

    mem = PeakMemory()
    t0 = time.perf_counter()
    extra = {} if a.ts_max_loras is None else {"max_loras": a.ts_max_loras}
    extra.update(TS_FORMATS[a.ts_format])
    model, _ = FastLanguageModel.from_pretrained(a.path, max_seq_length=a.max_len,
                                                 fast_inference=True, gpu_memory_utilization=a.util,
                                                 max_lora_rank=a.rank, standby=not a.no_standby, **extra)
    start_s = time.perf_counter() - t0
    model = FastLanguageModel.get_peft_model(model, r=a.rank, lora_alpha=2 * a.rank, target_modules=ALL7)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _train_step(model, opt)
    mem.sample()
    prompts = _prompts(a.prompts, a.prompt_len)
    sp = SamplingParams(max_tokens=a.new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    model.fast_generate(prompts[:8], sampling_params=sp)  # warm-up
    # the live adapter right after an optimizer step
    dt, outs, cached = _timed(lambda p: model.fast_generate(p, sampling_params=sp), _rollout_prompts(a),
                              before=lambda: _train_step(model, opt))
    mem.sample()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    live = state_of(model).live
    one = SamplingParams(max_tokens=1, temperature=0.0)
    copy_ms, visible_ms = [], []
    for _ in range(20):
        _train_step(model, opt)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.fast_generate(prompts[0], sampling_params=one)
        visible_ms.append((time.perf_counter() - t) * 1e3)
        copy_ms.append(live.last_update_ms)
    mem.sample()
    standby = state_of(model).engine.standby
    spec = state_of(model).engine.spec
    return {"arm": "trainserve", "format": a.ts_format, "engine_quantization": spec.quantization,
            "prompt_tokens_from_cache": cached,
            "max_loras": spec.max_loras, "specialize_active_lora": spec.specialize_active_lora,
            "standby": not a.no_standby,
            "out_tok_s": round(tokens / dt, 1), "engine_start_s": round(start_s, 1),
            "adapter_copy_ms_median": round(statistics.median(copy_ms), 3),
            "update_to_first_token_ms_median": round(statistics.median(visible_ms), 2),
            "peak_gpu_gb": mem.gb, "standby_freed_gb": round(standby.freed_bytes / 1e9, 2),
            "standby_restore_ms": round(standby.last_restore_ms, 1),
            "standby_release_ms": round(standby.last_release_ms, 1),
            "standby_last_wait_ms": round(standby.last_wait_ms, 1), "standby_prefetches": standby.prefetches,
            "standby_restores": standby.restores}


def arm_vllm(a) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    mem = PeakMemory()
    t0 = time.perf_counter()
    quant = None if a.vllm_quant == "none" else a.vllm_quant
    llm = LLM(a.path, quantization=quant, enable_lora=True, max_lora_rank=a.rank, max_loras=2,
              gpu_memory_utilization=a.util, max_model_len=a.max_len)
    start_s = time.perf_counter() - t0
    adapters = [_write_random_adapter(f"/tmp/bench-adapter-{i}", a.shape, a.rank, i) for i in range(21)]
    prompts = [{"prompt_token_ids": p} for p in _prompts(a.prompts, a.prompt_len)]
    sp = SamplingParams(max_tokens=a.new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    req = LoRARequest("a0", 1, adapters[0])
    llm.generate(prompts[:8], sp, lora_request=req, use_tqdm=False)
    dt, outs, cached = _timed(lambda p: llm.generate(p, sp, lora_request=req, use_tqdm=False),
                              _rollout_token_prompts(a))
    mem.sample()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    sp_ids = sp.clone()
    sp_ids.detokenize = False  # token ids only: what vLLM gives without its per-step detokeniser
    dt_ids, _, cached_ids = _timed(lambda p: llm.generate(p, sp_ids, lora_request=req, use_tqdm=False),
                                   _rollout_token_prompts(a, first=1 + a.repeats))
    one = SamplingParams(max_tokens=1, temperature=0.0)
    switch = []
    for i in range(1, 21):  # a new adapter id from disk, as a user reloading a freshly saved adapter would
        t = time.perf_counter()
        llm.generate(prompts[:1], one, lora_request=LoRARequest(f"a{i}", i + 1, adapters[i]), use_tqdm=False)
        switch.append((time.perf_counter() - t) * 1e3)
    mem.sample()
    return {"arm": a.arm, "quantization": a.vllm_quant, "prompt_tokens_from_cache": cached + cached_ids,
            "out_tok_s": round(tokens / dt, 1), "out_tok_s_detokenize_false": round(tokens / dt_ids, 1),
            "engine_start_s": round(start_s, 1),
            "update_to_first_token_ms_median": round(statistics.median(switch), 2), "peak_gpu_gb": mem.gb}


def arm_unsloth(a) -> dict:
    import torch
    import unsloth  # noqa: F401  (must be imported before transformers)
    from unsloth import FastLanguageModel
    from vllm import SamplingParams

    mem = PeakMemory()
    t0 = time.perf_counter()
    model, tok = FastLanguageModel.from_pretrained(a.path, max_seq_length=a.max_len, load_in_4bit=True,
                                                   fast_inference=True, gpu_memory_utilization=a.util,
                                                   max_lora_rank=a.rank)
    start_s = time.perf_counter() - t0
    model = FastLanguageModel.get_peft_model(model, r=a.rank, lora_alpha=2 * a.rank, target_modules=ALL7)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _train_step(model, opt)
    mem.sample()
    model.save_lora("/tmp/unsloth-lora")
    req = model.load_lora("/tmp/unsloth-lora")
    prompts = [{"prompt_token_ids": p} for p in _prompts(a.prompts, a.prompt_len)]
    sp = SamplingParams(max_tokens=a.new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    model.fast_generate(prompts[:8], sampling_params=sp, lora_request=req, use_tqdm=False)
    dt, outs, cached = _timed(lambda p: model.fast_generate(p, sampling_params=sp, lora_request=req, use_tqdm=False),
                              _rollout_token_prompts(a))
    mem.sample()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    swap = []
    for i in range(20):
        _train_step(model, opt)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.save_lora(f"/tmp/unsloth-lora-{i}")
        req = model.load_lora(f"/tmp/unsloth-lora-{i}")
        model.fast_generate(prompts[:1], sampling_params=one, lora_request=req, use_tqdm=False)
        swap.append((time.perf_counter() - t) * 1e3)
    mem.sample()
    return {"arm": "unsloth", "prompt_tokens_from_cache": cached, "out_tok_s": round(tokens / dt, 1),
            "engine_start_s": round(start_s, 1),
            "update_to_first_token_ms_median": round(statistics.median(swap), 2), "peak_gpu_gb": mem.gb}


ARMS = {"trainserve": arm_trainserve, "vllm": arm_vllm, "vllm-inproc": arm_vllm, "unsloth": arm_unsloth}
# Plain vLLM runs with vLLM's own default (engine core in a child process); "vllm-inproc" runs it in
# this process like trainserve must (colocation), to separate that cost from trainserve's own.
ARM_ENV = {"vllm": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, "vllm-inproc": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=sorted(ARMS))
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--arms", default="trainserve,vllm,unsloth")
    add_workload_args(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed rollouts per arm (the median is reported)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--ts-max-loras", type=int, default=None,
                        help="trainserve: saved-adapter slots (+2 live); default: from_pretrained's")
    parser.add_argument("--no-standby", action="store_true", help="trainserve: keep the KV cache mapped")
    parser.add_argument("--ts-format", choices=sorted(TS_FORMATS), default="int4",
                        help="trainserve: engine weight format (default: int4, trainserve's own 4-bit)")
    parser.add_argument("--vllm-quant", default="bitsandbytes",
                        help="plain vLLM arm: quantization (bitsandbytes, fp8_per_channel, none)")
    a = parser.parse_args()
    if a.path is None:
        from trainserve.random_model import random_qwen2

        a.path = random_qwen2(a.shape, f"/tmp/trainserve-random-qwen2-{a.shape}")
    if a.arm:
        print("RESULT " + json.dumps(ARMS[a.arm](a)), flush=True)
        return
    import torch

    results = []
    for arm in a.arms.split(","):
        cmd = [sys.executable, __file__, "--arm", arm, *[x for x in sys.argv[1:] if x != "--all"], "--path", a.path]
        t = time.perf_counter()
        env = {**os.environ, **ARM_ENV.get(arm, {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
        if line is None:
            results.append({"arm": arm, "error": (proc.stderr or proc.stdout)[-2500:]})
        else:
            results.append(json.loads(line[7:]))
        results[-1]["wall_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps(results[-1])[:3000], flush=True)
    date = datetime.date.today().isoformat()
    record = {"date": date, "device": torch.cuda.get_device_name(0), "host": host(),
              "command": " ".join(["python", *sys.argv]),
              "shape": a.shape, "prompts": a.prompts, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
              "rank": a.rank, "gpu_memory_utilization": a.util, "repeats": a.repeats, "results": results}
    out = a.out or f"benchmarks/results/rollout_{a.shape}_{date}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    base = next((r for r in results if r.get("arm") == "vllm" and "out_tok_s" in r), None)
    print("\n| arm | out tok/s | vs vLLM | update→visible ms | engine start s | peak GPU GB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "out_tok_s" not in r:
            print(f"| {r['arm']} | failed | | | | |")
            continue
        ratio = f"{r['out_tok_s'] / base['out_tok_s']:.2f}x" if base else "-"
        print(f"| {r['arm']} | {r['out_tok_s']:.0f} | {ratio} | {r['update_to_first_token_ms_median']} | "
              f"{r['engine_start_s']} | {r['peak_gpu_gb']} |")


if __name__ == "__main__":
    main()
