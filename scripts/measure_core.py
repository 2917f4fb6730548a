"""Measure the core numbers of issue 2 on this machine and write them as JSON.

* engine start time (fresh process), ``fast_generate`` latency, adapter-update-to-visible latency
  (median of 20), on the tiny model;
* peak RSS of trainer + engine with ``fast_inference=True`` (one copy of base weights) against an
  engine plus a separately loaded transformers model (two copies), each in its own process, on a
  random-weight model of the Qwen2-0.5B shape.

Usage: ``python scripts/measure_core.py [--rss-shape 0.5b] [--out benchmarks/results/core_cpu_<date>.json]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

PROMPT = "The secret phrase is"


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


def _train_step(model, tokenizer, optimizer) -> None:
    ids = tokenizer(PROMPT + " open the blue door slowly.", return_tensors="pt").input_ids
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()


def latency_arm() -> dict:
    import torch

    from trainserve import FastLanguageModel, SamplingParams, tiny_model
    from trainserve.model_api import state_of

    t0 = time.perf_counter()
    model, tok = FastLanguageModel.from_pretrained(tiny_model(), max_seq_length=256, load_in_4bit=False,
                                                   fast_inference=True, max_lora_rank=16)
    load_s = time.perf_counter() - t0
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    live = state_of(model).live
    sp16 = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    sp1 = SamplingParams(max_tokens=1, temperature=0.0)
    model.fast_generate(PROMPT, sampling_params=sp16)  # warm-up
    gen, copy, visible = [], [], []
    for _ in range(20):
        t = time.perf_counter()
        model.fast_generate(PROMPT, sampling_params=sp16)
        gen.append((time.perf_counter() - t) * 1e3)
    for _ in range(20):
        _train_step(model, tok, opt)
        t = time.perf_counter()
        model.fast_generate(PROMPT, sampling_params=sp1)
        visible.append((time.perf_counter() - t) * 1e3)
        copy.append(live.last_update_ms)
    return {
        "engine_start_s": round(state_of(model).engine.start_seconds, 2),
        "from_pretrained_s": round(load_s, 2),
        "fast_generate_16_tokens_ms_median": round(statistics.median(gen), 2),
        "adapter_copy_ms_median": round(statistics.median(copy), 3),
        "update_to_first_token_ms_median": round(statistics.median(visible), 2),
        "repeats": 20,
    }


def rss_arm(mode: str, path: str) -> dict:
    import torch

    from trainserve import FastLanguageModel, SamplingParams

    sp = SamplingParams(max_tokens=8, temperature=0.0)
    if mode == "shared":
        model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=512, dtype=torch.float32,
                                                       load_in_4bit=False, fast_inference=True, max_lora_rank=16)
        model = FastLanguageModel.get_peft_model(model, r=16)
        generate = lambda: model.fast_generate(PROMPT, sampling_params=sp)  # noqa: E731
    else:  # an engine plus a second, separately loaded copy for training
        from vllm import LLM

        llm = LLM(path, dtype="float32", max_model_len=512, enable_lora=True, max_lora_rank=16)
        model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=512, dtype=torch.float32,
                                                       load_in_4bit=False, fast_inference=False)
        model = FastLanguageModel.get_peft_model(model, r=16)
        generate = lambda: llm.generate([PROMPT], sp, use_tqdm=False)  # noqa: E731
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generate()
    _train_step(model, tok, opt)
    generate()
    return {"mode": mode, "peak_rss_gb": round(_peak_rss_gb(), 2)}


def _child(args: list[str]) -> dict:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rss-shape", default="0.5b")
    parser.add_argument("--out", default=None)
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm == "latency":
        print(json.dumps(latency_arm()))
        return
    if args.arm in ("shared", "separate"):
        print(json.dumps(rss_arm(args.arm, args.path)))
        return
    from trainserve.random_model import random_qwen2

    date = datetime.date.today().isoformat()
    path = random_qwen2(args.rss_shape, f"/tmp/trainserve-random-qwen2-{args.rss_shape}", dtype="float32")
    result = {
        "date": date, "device": f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "latency_tiny": _child(["--arm", "latency"]),
        "rss": {
            "shape": f"qwen2-{args.rss_shape} random weights, fp32",
            "shared_fast_inference": _child(["--arm", "shared", "--path", path]),
            "separate_two_copies": _child(["--arm", "separate", "--path", path]),
        },
    }
    out = args.out or f"benchmarks/results/core_cpu_{date}.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
