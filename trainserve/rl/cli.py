"""``trainserve grpo``: GRPO on the built-in toy task with rollouts from the colocated engine.

Writes ``<out>/metrics.jsonl`` (one line per step), ``<out>/reward.png``, ``<out>/summary.json``,
atomic ``<out>/checkpoint-<step>`` directories (``--save-every``), and the final adapter in
``<out>/adapter``. ``--resume`` continues from the last complete checkpoint; ``--serve-port``
serves the live adapter over the OpenAI-compatible HTTP API while training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Any


class GRPORunError(RuntimeError):
    """A usage problem of ``trainserve grpo`` (reported without a traceback)."""


def _start_server(model: Any, host: str, port: int) -> Any:
    """``model.serve(..., background=True)`` with a clear message when the server extra is missing."""
    try:
        return model.serve(host=host, port=port, background=True)
    except ImportError as exc:
        raise GRPORunError(
            f"--serve-port needs trainserve's HTTP server (trainserve.server.embed), which failed to import: "
            f"{exc}. Install the server dependencies (pip install 'trainserve[cpu]' or '[gpu]') or drop "
            "--serve-port.") from exc


def _say(message: str) -> None:
    """A progress line on stderr, at once (the heavy imports that follow take seconds)."""
    print(message, file=sys.stderr, flush=True)


def _summary(metrics: list[dict[str, Any]], first_step: int, seconds: float) -> dict[str, Any]:
    ran = [r for r in metrics if r["step"] > first_step]
    rewards = [r["reward_mean"] for r in metrics if "reward_mean" in r]
    k = max(1, min(5, len(rewards) // 4))
    tok_s = [r["rollout_tokens_per_s"] for r in ran if "rollout_tokens_per_s" in r]
    swap = [r["adapter_swap_ms"] for r in ran if r.get("adapter_swap_ms")]
    return {
        "steps": metrics[-1]["step"] if metrics else 0,
        "steps_this_run": len(ran),
        "train_seconds": round(seconds, 2),
        "steps_per_min": round(len(ran) / seconds * 60, 2) if seconds > 0 and ran else None,
        "rollout_tokens_per_s_median": round(statistics.median(tok_s), 1) if tok_s else None,
        "adapter_swap_ms_median": round(statistics.median(swap), 3) if swap else None,
        f"reward_first_{k}": round(statistics.fmean(rewards[:k]), 4) if rewards else None,
        f"reward_last_{k}": round(statistics.fmean(rewards[-k:]), 4) if rewards else None,
    }


def run_grpo(
    out: str,
    model_path: str | None = None,
    steps: int = 60,
    seed: int = 0,
    lr: float = 5e-3,
    num_generations: int = 8,
    batch_size: int = 32,
    max_completion_length: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    beta: float = 0.0,
    lora_rank: int = 16,
    target_word: str = "blue",
    plain_text: bool = False,
    save_every: int = 20,
    keep_checkpoints: int | None = 2,
    resume: bool = False,
    serve_port: int | None = None,
    serve_host: str = "127.0.0.1",
    max_seq_length: int = 256,
    gpu_memory_utilization: float = 0.3,
    plot: bool = True,
    progress: bool = True,
    overlap: bool = False,
    weights: str = "int4",
    gradient_checkpointing: bool | str = "unsloth",
) -> dict[str, Any]:
    """Train the toy task with :class:`trainserve.rl.GRPOTrainer`; return the run summary.

    Under ``torchrun`` (data parallel, :mod:`trainserve.distributed`) every rank trains with its own
    engine; rank 0 writes the adapter, summary and plot and returns the summary, the other ranks
    return ``{"rank": ..., "steps": ...}``.

    ``overlap``: one-step-off training (:mod:`trainserve.rl.overlap`) with TRL's token-level
    truncated importance-sampling correction (``token_truncate``, ratios clipped at 3).

    ``weights``: the base weight format, a key of :data:`trainserve.precision.WEIGHT_FORMAT_FLAGS`
    (``"fp8"`` with ``gradient_checkpointing=False`` was the fastest on an H200 at the 7B shape);
    ``gradient_checkpointing``: ``get_peft_model``'s ``use_gradient_checkpointing``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from trainserve import FastLanguageModel, tiny_model
    from trainserve.distributed import check_one_device_per_process, is_main_process
    from trainserve.precision import WEIGHT_FORMAT_FLAGS
    from trainserve.rl import checkpoint as ckpt
    from trainserve.rl.metrics import (
        METRICS_FILE,
        PLOT_FILE,
        MetricsLogger,
        RewardProgressBar,
        plot_rewards,
        read_metrics,
    )
    from trainserve.rl.rewards import completion_text
    from trainserve.rl.toy_task import toy_config, toy_dataset, toy_reward_funcs
    from trainserve.rl.trainer import GRPOTrainer

    if weights not in WEIGHT_FORMAT_FLAGS:
        raise GRPORunError(f"weights must be one of {sorted(WEIGHT_FORMAT_FLAGS)}, got {weights!r}")
    check_one_device_per_process()  # before anything loads: TRL would refuse it after the engine started
    main_process = is_main_process()  # under torchrun: rank 0 writes the adapter, summary and plot
    os.makedirs(out, exist_ok=True)
    last = ckpt.latest_checkpoint(out)
    if last is not None and not resume:
        raise GRPORunError(f"{out} already holds checkpoints ({os.path.basename(last)}); pass --resume to "
                           "continue that run or choose another --out")
    if resume and last is None:
        warnings.warn(f"--resume: no checkpoint in {out}, starting from step 0", UserWarning, stacklevel=2)
    t_load = time.perf_counter()
    with warnings.catch_warnings():
        if weights == "int4":  # the default's one-time "no CUDA, loading 16-bit" notice; an asked format keeps it
            warnings.simplefilter("ignore", UserWarning)
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_path or tiny_model(), max_seq_length=max_seq_length, fast_inference=True,
            gpu_memory_utilization=gpu_memory_utilization, max_lora_rank=lora_rank, **WEIGHT_FORMAT_FLAGS[weights])
    model = FastLanguageModel.get_peft_model(model, r=lora_rank, lora_alpha=2 * lora_rank, random_state=seed,
                                             use_gradient_checkpointing=gradient_checkpointing)
    if progress and main_process:
        _say(f"model and engine ready (loaded in {time.perf_counter() - t_load:.1f} s); training {steps} steps "
             f"({batch_size // num_generations} prompts x {num_generations} completions each)")
    config = toy_config(
        out, steps=steps, seed=seed, learning_rate=lr, num_generations=num_generations,
        per_device_train_batch_size=batch_size, max_completion_length=max_completion_length,
        temperature=temperature, top_p=top_p, beta=beta,
        save_strategy="steps" if save_every > 0 else "no", save_steps=max(save_every, 1),
        save_total_limit=keep_checkpoints or None, disable_tqdm=True,
        **({"vllm_importance_sampling_correction": True, "vllm_importance_sampling_mode": "token_truncate"}
           if overlap else {}))
    dataset = toy_dataset(max(256, steps * batch_size // num_generations), conversational=not plain_text)
    trainer = GRPOTrainer(
        model=model, reward_funcs=toy_reward_funcs(target_word), args=config,
        train_dataset=dataset, processing_class=tokenizer, callbacks=[MetricsLogger(out)], overlap=overlap)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    if progress:
        trainer.add_callback(RewardProgressBar())
    server = None
    if serve_port is not None and main_process:  # one server per job (rank 0's engine), not one port per rank
        server = _start_server(model, serve_host, serve_port)
        print(f"serving the live adapter at {getattr(server, 'url', f'http://{serve_host}:{serve_port}')} "
              "(model name 'live')", flush=True)
    start_step = ckpt.checkpoint_step(last) if (resume and last) else 0
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=last if resume else None)
    finally:
        if server is not None:
            server.stop()
    seconds = time.perf_counter() - t0
    if not main_process:  # data parallel: the other ranks hold the same adapter; rank 0 writes the results
        return {"rank": trainer.accelerator.process_index, "steps": trainer.state.global_step}
    model.save_lora(os.path.join(out, "adapter"))
    metrics_path = os.path.join(out, METRICS_FILE)
    summary = _summary(read_metrics(metrics_path), start_step, seconds)
    if overlap:  # how long steps waited for their batch (≈0: generation fully hidden behind training)
        waits = [r["rollout_wait_s"] for r in read_metrics(metrics_path) if "rollout_wait_s" in r]
        summary.update(overlap=True, rollout_wait_s_median=round(statistics.median(waits), 4) if waits else None)
    summary.update(resumed_from=start_step or None, target_word=target_word,
                   samples=[completion_text(c) for c in list(trainer._logs["completion"])[-3:]])
    if plot:
        title = f"GRPO toy task: mention '{target_word}', exactly once"
        summary["plot"] = plot_rewards(metrics_path, os.path.join(out, PLOT_FILE), title=title,
                                       reward_range=(0.0, 2.0))  # target_word + once, each in [0, 1]
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


CHECKPOINTING: dict[str, bool | str] = {"unsloth": "unsloth", "true": True, "false": False}

GRPO_HELP = """\
GRPO (reinforcement learning with TRL's GRPOTrainer) on a built-in toy task: the tiny Qwen2 (no
download; or --model) learns to mention --target-word exactly once in its answers. Rollouts
come from the colocated vLLM engine with the adapter as trained so far: no second engine, no merge.

Writes to --out: metrics.jsonl (one line per step), reward.png, summary.json, checkpoint-<step>
directories (atomic; --save-every, --keep-checkpoints) and the final adapter in adapter/.
--resume continues from the last complete checkpoint; --serve-port serves the adapter being trained
over the OpenAI-compatible HTTP API (model name 'live') while it trains."""


def _check(args: argparse.Namespace) -> str | None:
    """Problems between options, found before anything is imported or started."""
    if args.batch_size % args.num_generations:
        return (f"--batch-size {args.batch_size} must be a multiple of --num-generations "
                f"{args.num_generations} (each prompt of a step gets --num-generations completions)")
    return None


def register(subparsers: Any) -> None:
    """Add ``trainserve grpo``."""
    from trainserve.cli import (
        HelpFormatter,
        fraction,
        non_negative_float,
        non_negative_int,
        port,
        positive_float,
        positive_int,
    )
    from trainserve.precision import WEIGHT_FORMAT_FLAGS

    p = subparsers.add_parser("grpo", help="GRPO reinforcement learning on a built-in toy task",
                              description=GRPO_HELP, formatter_class=HelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded tiny Qwen2)")
    p.add_argument("--steps", type=positive_int, default=60,
                   help="optimizer steps (total, also when resuming: more than the checkpoint's run extends it, "
                   "the learning-rate schedule rebuilt for the new total)")
    p.add_argument("--out", default="runs/grpo-toy", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--save-every", type=non_negative_int, default=20,
                   help="checkpoint every N steps and at the end (0: none)")
    p.add_argument("--keep-checkpoints", type=non_negative_int, default=2,
                   help="how many checkpoints to keep (0: all)")
    p.add_argument("--serve-port", type=port, default=None,
                   help="serve the live adapter over HTTP on this port (0: any free port; default: no server)")
    p.add_argument("--serve-host", default="127.0.0.1", help="address for --serve-port")
    p.add_argument("--seed", type=int, default=0, help="random seed (adapter init, sampling, data order)")
    p.add_argument("--lr", type=positive_float, default=5e-3, help="learning rate (linear decay to 0)")
    p.add_argument("--num-generations", type=_at_least_two, default=8,
                   help="completions per prompt (GRPO compares them; at least 2)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="completions per step (prompts x --num-generations; a multiple of it)")
    p.add_argument("--max-completion-length", type=positive_int, default=16, help="tokens per completion")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--top-p", type=fraction, default=1.0, help="nucleus sampling of the rollouts")
    p.add_argument("--beta", type=non_negative_float, default=0.0,
                   help="KL coefficient (0: no reference model)")
    p.add_argument("--lora-rank", type=positive_int, default=16, help="LoRA rank (alpha is twice the rank)")
    p.add_argument("--target-word", default="blue", help="the word the reward asks for, exactly once")
    p.add_argument("--plain-text", action="store_true", help="plain-text prompts instead of chat messages")
    p.add_argument("--max-seq-length", type=positive_int, default=256, help="engine context length")
    p.add_argument("--gpu-memory-utilization", type=fraction, default=0.3,
                   help="share of the device's memory the engine may reserve (vLLM's --gpu-memory-utilization)")
    p.add_argument("--weights", default="int4", choices=list(WEIGHT_FORMAT_FLAGS),
                   help="base weight format shared by trainer and engine (fp8: per-channel FP8, the fastest "
                   "measured on an H200; without CUDA every format loads 16-bit)")
    p.add_argument("--gradient-checkpointing", default="unsloth", choices=list(CHECKPOINTING),
                   help="unsloth: per layer, inputs parked in host memory; true: per layer; false: none "
                   "(faster, more memory)")
    p.add_argument("--overlap", action="store_true",
                   help="one-step-off training: the engine generates the next batch (with the adapter one step "
                   "older) while this one trains; TRL's truncated importance-sampling correction accounts for it")
    p.add_argument("--no-plot", action="store_true", help="skip reward.png")
    p.add_argument("--verbose", action="store_true",
                   help="show vLLM's INFO logging and TRL/transformers start-up warnings, hidden by default "
                   "(also: TRAINSERVE_LOG_LEVEL=info)")
    p.set_defaults(func=_main, check=_check)


def _at_least_two(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2 (GRPO compares completions), got {text}")
    return value


def _main(args: argparse.Namespace) -> int:
    from trainserve.logs import configure_logging

    configure_logging(True if args.verbose else None)  # quiet unless --verbose / TRAINSERVE_LOG_LEVEL=info
    problem = _check(args)  # also when called without trainserve.cli.main
    if problem:
        print(f"trainserve grpo: error: {problem}", file=sys.stderr)
        return 2
    what = f"the model in {args.model}" if args.model else "the embedded tiny Qwen2 (built once into the cache)"
    from trainserve.distributed import LauncherError, is_main_process

    if is_main_process():  # under torchrun: once, from rank 0
        _say(f"trainserve grpo: loading torch, TRL and vLLM, then starting the engine on {what} "
             "(~20 s on a 2-core CPU)")
    try:
        summary = run_grpo(
            args.out, model_path=args.model, steps=args.steps, seed=args.seed, lr=args.lr,
            num_generations=args.num_generations, batch_size=args.batch_size,
            max_completion_length=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
            beta=args.beta, lora_rank=args.lora_rank, target_word=args.target_word,
            plain_text=args.plain_text, save_every=args.save_every,
            keep_checkpoints=args.keep_checkpoints, resume=args.resume, serve_port=args.serve_port,
            serve_host=args.serve_host, max_seq_length=args.max_seq_length,
            gpu_memory_utilization=args.gpu_memory_utilization, plot=not args.no_plot, overlap=args.overlap,
            weights=args.weights, gradient_checkpointing=CHECKPOINTING[args.gradient_checkpointing])
    except (GRPORunError, LauncherError) as exc:
        print(f"trainserve grpo: {exc}")
        return 2
    if summary.get("rank") is None:  # torchrun: rank 0 prints the job's summary
        print(json.dumps(summary, indent=2))
    return 0
