"""Where trainserve's rollout time goes, against vLLM's own loop on the same engine (issue 5).

One process, one trainserve engine (Qwen2 shape, random weights, bnb 4-bit on CUDA), LoRA r=16
on all 7 modules after an optimizer step. Each round times, interleaved, the same 256×128 → 256
``ignore_eos`` rollout through:

* ``fast_generate``: the public path (live-adapter sync, KV standby restore/release);
* ``loop_deferred``: ``EngineLoop.generate`` with decoding deferred to the end (the default);
* ``loop_streamed``: ``EngineLoop.generate`` with vLLM's per-step detokeniser;
* ``loop_deferred_nogc``: as ``loop_deferred`` with Python's cyclic GC paused;
* ``llm_generate``: vLLM's ``LLM.generate`` on the same engine with the live ``LoRARequest``;
* ``llm_generate_ids``: the same with ``detokenize=False``.

    python scripts/rollout_breakdown.py --shape 1.5b [--max-loras 4] [--specialize] [--no-standby]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rollout import ALL7, PeakMemory, _prompts, _train_step, add_workload_args  # noqa: E402


def _patch_spec(**changes) -> None:
    """Make the loader start its engine with ``changes`` applied to the ``EngineSpec``."""
    from trainserve.engine import launch

    original = launch.start_engine

    def start_engine(spec):
        return original(dataclasses.replace(spec, **changes))

    launch.start_engine = start_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--specialize", action="store_true", help="EngineSpec.specialize_active_lora=True")
    parser.add_argument("--no-standby", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    a = parser.parse_args()

    import torch
    from vllm import SamplingParams

    from trainserve import FastLanguageModel
    from trainserve.model_api import state_of
    from trainserve.random_model import random_qwen2

    cuda = torch.cuda.is_available()
    path = a.path or random_qwen2(a.shape, f"/tmp/trainserve-random-qwen2-{a.shape}")
    _patch_spec(specialize_active_lora=a.specialize)
    t0 = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=a.max_len, load_in_4bit=cuda,
                                                 fast_inference=True, gpu_memory_utilization=a.util,
                                                 max_lora_rank=a.rank, max_loras=a.max_loras,
                                                 standby=not a.no_standby)
    start_s = time.perf_counter() - t0
    model = FastLanguageModel.get_peft_model(model, r=a.rank, lora_alpha=2 * a.rank, target_modules=ALL7)
    device = "cuda" if cuda else "cpu"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _train_step(model, opt, device)
    state = state_of(model)
    loop, standby, llm = state.engine.loop, state.engine.standby, state.engine.llm
    prompts = _prompts(a.prompts, a.prompt_len)
    sp = SamplingParams(max_tokens=a.new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    sp_ids = sp.clone()
    sp_ids.detokenize = False
    mem = PeakMemory() if cuda else None
    model.fast_generate(prompts[:8], sampling_params=sp)  # warm-up

    def around(fn):
        req = state.live.sync_request()
        standby.before_generate()
        try:
            t = time.perf_counter()
            outs = fn(req)
            return time.perf_counter() - t, outs
        finally:
            standby.after_generate()

    def nogc(fn):
        def run(req):
            gc.disable()
            try:
                return fn(req)
            finally:
                gc.enable()
        return run

    # Every rollout gets a fresh prompt set: the variants share one adapter version per round, and a
    # repeated set would take most of its prefill from vLLM's prefix cache (fast_generate, first after
    # each optimizer step, never could).
    seeds = itertools.count(1)

    def fresh() -> list[list[int]]:
        return _prompts(a.prompts, a.prompt_len, seed=next(seeds))

    def as_tokens(ps: list[list[int]]) -> list[dict]:
        return [{"prompt_token_ids": p} for p in ps]

    variants = {
        "loop_deferred": lambda req: loop.generate(fresh(), sp, req),
        "loop_streamed": lambda req: loop.generate(fresh(), sp, req, defer_detokenize=False),
        "loop_deferred_nogc": nogc(lambda req: loop.generate(fresh(), sp, req)),
        "llm_generate": lambda req: llm.generate(as_tokens(fresh()), sp, lora_request=req, use_tqdm=False),
        "llm_generate_ids": lambda req: llm.generate(as_tokens(fresh()), sp_ids, lora_request=req, use_tqdm=False),
    }
    times: dict[str, list[float]] = {k: [] for k in ["fast_generate", *variants]}
    for _ in range(a.rounds):
        _train_step(model, opt, device)
        batch = fresh()
        t = time.perf_counter()
        outs = model.fast_generate(batch, sampling_params=sp)
        times["fast_generate"].append(time.perf_counter() - t)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        for name, fn in variants.items():
            dt, outs = around(fn)
            assert sum(len(o.outputs[0].token_ids) for o in outs) == tokens, name
            times[name].append(dt)
        if mem:
            mem.sample()
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "command": " ".join(["python", *sys.argv]),
        "shape": a.shape, "max_loras": a.max_loras, "slots": a.max_loras + 2,
        "specialize_active_lora": a.specialize, "standby": not a.no_standby,
        "engine_start_s": round(start_s, 1), "peak_gpu_gb": mem.gb if mem else None,
        "out_tok_s": {k: round(tokens / statistics.median(v), 1) for k, v in times.items()},
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    print("RESULT " + json.dumps(result), flush=True)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
