#!/usr/bin/env python3
"""GRPO on the tiny model with rollouts from the colocated engine (under a minute on a quiet 2-core CPU:
~20 s start-up, ~0.3 s per step; ~8 min measured on a busy one; see docs/grpo.md).

The task: mention the word "blue" in the answer, exactly once. Two programmatic rewards score
each completion; ``trainserve.rl.GRPOTrainer`` samples every rollout
from the vLLM engine that shares the model's weights, with the LoRA adapter exactly as the last
optimizer step left it. Writes ``metrics.jsonl``, ``reward.png`` and the adapter to ``--out``.

    .venv/bin/python examples/grpo_toy.py --steps 60 --out runs/grpo-example
    .venv/bin/python examples/grpo_toy.py --serve-port 8000   # query "live" while it trains

(``trainserve grpo`` is the same run as a command, with checkpoints and ``--resume``.)
"""

from __future__ import annotations

import argparse
import os
import re

from trainserve.logs import configure_logging

# Before vLLM is imported: hide vLLM's INFO lines and TRL/transformers start-up warnings
# (TRAINSERVE_LOG_LEVEL=info shows them).
configure_logging()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/grpo-example")
    parser.add_argument("--serve-port", type=int, default=None)
    args = parser.parse_args()

    print("loading torch, TRL and vLLM, then starting the engine on the tiny model (~20 s on a 2-core CPU)",
          flush=True)
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig

    from trainserve import FastLanguageModel, tiny_model
    from trainserve.rl import GRPOTrainer, MetricsLogger, RewardProgressBar, plot_rewards, toy_dataset

    # 1. The model: base weights owned by the colocated vLLM engine, a LoRA adapter it serves live.
    model, tokenizer = FastLanguageModel.from_pretrained(
        tiny_model(), max_seq_length=256, load_in_4bit=False, fast_inference=True,
        gpu_memory_utilization=0.3, max_lora_rank=16)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, random_state=0)

    # 2. Reward functions: TRL's signature, one float per completion (conversational completions
    #    are lists of messages). A function that raises or returns NaN stops training with an
    #    error naming it.
    def says_blue(completions, **kwargs):
        return [1.0 if re.search(r"\bblue\b", c[0]["content"], re.I) else 0.0 for c in completions]

    def just_once(completions, **kwargs):
        counts = [len(re.findall(r"\bblue\b", c[0]["content"], re.I)) for c in completions]
        return [1.0 / n if n else 0.0 for n in counts]

    # 3. A plain trl.GRPOConfig: num_generations, max_completion_length, temperature and top_p
    #    become the engine's SamplingParams. (use_vllm stays False: the engine is already here.)
    config = GRPOConfig(
        output_dir=args.out, max_steps=args.steps, seed=0, learning_rate=5e-3, lr_scheduler_type="linear",
        num_generations=8, per_device_train_batch_size=32, max_completion_length=16, temperature=1.0,
        logging_steps=1, save_strategy="no", bf16=False, gradient_checkpointing=False, report_to=[],
        disable_tqdm=True, dataloader_pin_memory=False)
    trainer = GRPOTrainer(
        model=model, reward_funcs=[says_blue, just_once], args=config,
        train_dataset=toy_dataset(256), processing_class=tokenizer,
        callbacks=[MetricsLogger(args.out), RewardProgressBar()])
    # disable_tqdm=True makes transformers print every step's log dict; RewardProgressBar replaces both.
    trainer.remove_callback(PrinterCallback)

    server = model.serve(port=args.serve_port) if args.serve_port else None
    if server is not None:
        print(f"live adapter served at {server.url}/v1 as model 'live'")
    try:
        trainer.train()
    finally:
        if server is not None:
            server.stop()

    model.save_lora(os.path.join(args.out, "adapter"))
    png = plot_rewards(os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "reward.png"),
                       reward_range=(0.0, 2.0))  # says_blue + just_once, each in [0, 1]
    print(f"reward plot: {png}")
    from trainserve import SamplingParams

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is two plus two?"}],
                                           tokenize=False, add_generation_prompt=True)
    answer = model.fast_generate(prompt, SamplingParams(temperature=0.0, max_tokens=16))[0].outputs[0].text
    print(f"policy now answers: {answer!r}")


if __name__ == "__main__":
    main()
