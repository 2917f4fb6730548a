"""One rank of the data-parallel GRPO test (``tests/test_data_parallel.py`` starts it under torchrun).

Every rank loads the tiny model with its own colocated engine, trains a few GRPO steps with
``trainserve.rl.GRPOTrainer`` (DDP averages the LoRA gradients), then checks on its own engine
that the live adapter is served: the engine's logprobs of its greedy completion are the trainer's.
The adapters of all ranks and their greedy completions are gathered; rank 0 writes everything to
``<out>/result.json`` for the test to assert on. With a third argument (a rank), the reward
function raises on that rank, and the job must end with the error instead of hanging.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist


def letters(completions, **kwargs):
    """A dense reward (fraction of lowercase letters), so that every step surely moves the adapter."""
    from trainserve.rl.rewards import completion_text

    texts = [completion_text(c) for c in completions]
    return [sum(ch.islower() for ch in t) / max(1, len(t)) for t in texts]


def lora_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for n, p in sorted(model.named_parameters()) if "lora_" in n])


def trainer_logprobs(trainer, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids),
                                                                  len(completion))
    return logps[0]


def failing_on(rank: int):
    """A reward function that raises on one rank only (the job must fail, not hang)."""
    def letters_or_fail(completions, **kwargs):
        if dist.get_rank() == rank:
            raise RuntimeError(f"reward deliberately failing on rank {rank}")
        return letters(completions)
    return letters_or_fail


def main(out: str, steps: int, fail_rank: int | None = None) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from trainserve import FastLanguageModel, SamplingParams, shutdown_engine, tiny_model
    from trainserve.rl import GRPOTrainer, MetricsLogger, toy_config, toy_dataset
    from trainserve.rl.rewards import completion_text

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the one-time "no CUDA, loading 16-bit" warning
        model, tok = FastLanguageModel.from_pretrained(tiny_model(), max_seq_length=256, load_in_4bit=True,
                                                       fast_inference=True, gpu_memory_utilization=0.3,
                                                       max_lora_rank=16)
    rank, world = dist.get_rank(), dist.get_world_size()  # the engine joined the launcher's world
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=1)
    initial = lora_vector(model)
    # 1 prompt x 4 completions per step over 2 ranks: each rank samples 2 of the prompt's group (TRL's
    # layout), which must differ between ranks (the rollout seed includes the rank).
    args = toy_config(out, steps=steps, seed=1, learning_rate=1e-2, per_device_train_batch_size=2,
                      num_generations=4, max_completion_length=8, save_strategy="steps", save_steps=steps,
                      logging_steps=1)
    rewards = [letters] if fail_rank is None else [failing_on(fail_rank)]
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=toy_dataset(64),
                          processing_class=tok, callbacks=[MetricsLogger(out)])
    trainer.train()
    ddp = trainer.model_wrapped
    wrapped = isinstance(ddp, DistributedDataParallel)
    ignored = set(ddp.parameters_to_ignore) if wrapped else set()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}

    # The completions each rank generated (TRL keeps the gathered table of the last step).
    completions = [completion_text(c) for c in trainer._logs["completion"]]
    prompts = [str(p) for p in trainer._logs["prompt"]]

    final = lora_vector(trainer.model)
    adapters = [torch.zeros_like(final) for _ in range(world)]
    dist.all_gather(adapters, final)

    # This rank's engine with the live adapter: greedy completion, engine logprobs vs the trainer's.
    trainer.model.eval()
    text = tok.apply_chat_template([{"role": "user", "content": "What color is the sky?"}], tokenize=False,
                                   add_generation_prompt=True)
    prompt = tok(text)["input_ids"]
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0)
    sample = model.fast_generate([{"prompt_token_ids": prompt}], sampling_params=params)[0].outputs[0]
    ids = list(sample.token_ids)
    engine = torch.tensor([entry[t].logprob for t, entry in zip(ids, sample.logprobs, strict=True)])
    live = trainer_logprobs(trainer, prompt, ids)
    with model.disable_adapter():
        base = trainer_logprobs(trainer, prompt, ids)
    report = {"rank": rank, "wrapped_in_ddp": wrapped, "ddp_skips_frozen": frozen <= ignored,
              "ddp_syncs_trainable": bool(trainable) and not trainable & ignored,
              "num_processes": trainer.accelerator.num_processes,
              "adapter_sha": hashlib.sha256(final.numpy().tobytes()).hexdigest(),
              "adapter_changed": float((final - initial).abs().max()),
              "engine_vs_trainer": float((engine - live).abs().max()),
              "base_vs_trainer": float((base - live).abs().max()), "greedy": ids,
              "version": trainer._engine_state.live.version}
    reports: list = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        result = {"reports": reports, "completions": completions, "prompts": prompts,
                  "global_step": trainer.state.global_step,
                  "adapter_max_rank_diff": max(float((a - adapters[0]).abs().max()) for a in adapters)}
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()
    shutdown_engine()  # vLLM's shutdown also ends this process's torch.distributed group


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
