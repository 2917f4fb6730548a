"""``trainserve demo``: train a LoRA adapter while the colocated engine generates with it live.

Loads the embedded tiny Qwen2 with ``fast_inference=True``, teaches it a few question → answer
facts, and between optimizer steps generates through the engine (no disk, no sync call) so the
answers visibly change. Ends with the latencies it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Any

FACTS = [
    ("Question: What is the capital of Japan? Answer:", " Tokyo."),
    ("Question: What color is grass? Answer:", " green."),
    ("Question: How many legs does a spider have? Answer:", " eight."),
    ("Question: Who wrote the tiny model? Answer:", " the trainserve team."),
]


def _batch(tokenizer: Any, pairs: list[tuple[str, str]]) -> tuple[Any, Any, Any]:
    import torch

    rows, labels = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt).input_ids
        a = tokenizer(answer).input_ids + [tokenizer.eos_token_id]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    return ids, mask, lab


def run_demo(model_path: str | None, steps: int, every: int, lr: float, seed: int, quiet_engine: bool) -> dict:
    """Run the demo and return the measured numbers (also printed)."""
    import sys

    from trainserve.logs import configure_logging

    configure_logging(None if quiet_engine else True)  # quiet unless --verbose / TRAINSERVE_LOG_LEVEL=info
    print("trainserve demo: loading torch and vLLM, then starting the engine on "
          f"{model_path or 'the embedded tiny Qwen2'} (~20 s on a 2-core CPU)", file=sys.stderr, flush=True)
    import torch
    from tqdm.auto import tqdm

    from trainserve import FastLanguageModel, SamplingParams, tiny_model
    from trainserve.model_api import state_of

    path = model_path or tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, tokenizer = FastLanguageModel.from_pretrained(
            path, max_seq_length=256, load_in_4bit=True, fast_inference=True,
            gpu_memory_utilization=0.3, max_lora_rank=16, random_state=seed)
    engine = state_of(model).engine
    print(f"engine started in {engine.start_seconds:.1f} s; every base weight is a view of the engine's tensors")
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, lora_dropout=0, bias="none", random_state=seed,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth")
    live = state_of(model).live
    prompts = [p for p, _ in FACTS]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, stop=["\n"])
    one_token = SamplingParams(max_tokens=1, temperature=0.0)

    def answers() -> list[str]:
        return [o.outputs[0].text for o in model.fast_generate(prompts, sampling_params=greedy)]

    with model.disable_adapter():
        base = answers()
    print("base model answers:", json.dumps(base))
    ids, mask, labels = _batch(tokenizer, FACTS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    swap_ms, visible_ms, generate_ms = [], [], []
    bar = tqdm(range(1, steps + 1), desc="training (live adapter)", unit="step")
    for step in bar:
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        t0 = time.perf_counter()
        model.fast_generate(prompts[0], sampling_params=one_token)  # first token under the new weights
        visible_ms.append((time.perf_counter() - t0) * 1e3)
        swap_ms.append(live.last_update_ms)
        bar.set_postfix(loss=f"{loss.item():.3f}", swap_ms=f"{live.last_update_ms:.2f}")
        if step % every == 0 or step == steps:
            t0 = time.perf_counter()
            now = answers()
            generate_ms.append((time.perf_counter() - t0) * 1e3)
            correct = sum(a.strip() == t.strip() for a, (_, t) in zip(now, FACTS, strict=True))
            bar.write(f"step {step:3d}  loss {loss.item():.3f}  correct {correct}/{len(FACTS)}  {json.dumps(now)}")
    final = answers()
    with model.disable_adapter():
        base_after = answers()
    result = {
        "engine_start_s": round(engine.start_seconds, 2),
        "adapter_copy_ms_median": round(statistics.median(swap_ms), 3),
        "update_to_first_token_ms_median": round(statistics.median(visible_ms), 2),
        "fast_generate_4x12_ms_median": round(statistics.median(generate_ms), 1),
        "correct": sum(a.strip() == t.strip() for a, (_, t) in zip(final, FACTS, strict=True)),
        "base_unchanged": base_after == base,
    }
    print("\nfinal answers (live adapter):", json.dumps(final))
    print("base model (disable_adapter): ", json.dumps(base_after))
    print(f"\nhot swap: adapter copied into the engine in {result['adapter_copy_ms_median']} ms (median of {steps}); "
          f"optimizer step → first token under the new weights {result['update_to_first_token_ms_median']} ms")
    print(json.dumps(result))
    return result


def _main(args: argparse.Namespace) -> int:
    result = run_demo(args.model, args.steps, args.every, args.lr, args.seed, not args.verbose)
    if not result["base_unchanged"]:
        print("demo: the base model's answers changed while training the adapter: something is wrong")
        return 1
    if result["correct"] < len(FACTS) // 2:
        if args.steps < 40:
            print(f"demo: {args.steps} steps were too few to learn the facts (the default 40 learns them)")
            return 0
        print("demo did not learn the facts: something is wrong")
        return 1
    return 0


DEMO_HELP = """\
Train a LoRA adapter on the embedded tiny Qwen2 (no download) to answer four questions, while
the colocated vLLM engine answers them between optimizer steps with the adapter as trained so far:
the answers change as it learns, with no saving, merging or syncing. Ends with the measured
latencies (adapter copy into the engine, optimizer step to first token under the new weights)."""


def register(subparsers: Any) -> None:
    """Add ``trainserve demo``."""
    from trainserve.cli import HelpFormatter, positive_float, positive_int

    p = subparsers.add_parser(
        "demo", help="watch a tiny model learn facts through the live adapter (no download)",
        description=DEMO_HELP, formatter_class=HelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded tiny Qwen2)")
    p.add_argument("--steps", type=positive_int, default=40, help="optimizer steps")
    p.add_argument("--every", type=positive_int, default=5, help="print the engine's answers every N steps")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="learning rate")
    p.add_argument("--seed", type=int, default=3407, help="random seed of the adapter's initial weights")
    p.add_argument("--verbose", action="store_true",
                   help="show vLLM's INFO logging and start-up warnings, hidden by default "
                   "(also: TRAINSERVE_LOG_LEVEL=info)")
    p.set_defaults(func=_main)
