"""One arm of the GPU GRPO benchmark, run in this process (``bench_grpo_gpu.py`` starts one per arm;
under ``--nproc N`` every torchrun rank runs this same code: ``bench_grpo_gpu_launch.py``).

Why each arm gets its own process: vLLM, Unsloth's patches of TRL/transformers and trainserve's
engine are process-wide, and device memory is only comparable from a clean start.

Every arm trains the same random-weight model with the same dataset, reward, LoRA (r=16, alpha=32
on all 7 linear modules), batch (8 prompts x 8 generations per optimizer step), completion length,
learning rate and seed; only the framework (and its own recommended gradient checkpointing)
differs. The resolved ``GRPOConfig`` fields are recorded per arm so that can be checked.

Rollout time is the time in TRL's generation hook ``_generate_single_turn`` (weight or adapter sync
included), wrapped on the trainer *instance* (not by subclassing: Unsloth replaces
``trl.GRPOTrainer`` with a generated class, and an instance wrapper works the same on all three).
TRL 1.16 calls it from ``_generate`` and Unsloth 2026.10.9 keeps it (it rewrites its body only).
An arm that fails records its exact error and traceback; the JSON is rewritten after every step,
so a run killed at a time limit still shows how far it got.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import bench_grpo_gpu_launch as launch
from bench_grpo_gpu_launch import compile_cache_entries, versions
from bench_grpo_gpu_memory import GIB, MemorySampler, PhasePeaks, wall
from bench_grpo_gpu_profile import (
    TrainingStepProfiler,
    attention_kinds_since,
    mlp_gate_up_since,
    shared_prefix_since,
    standby_since,
)
from bench_grpo_gpu_report import summarise
from bench_grpo_gpu_workload import length_reward, prompt_texts

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# kind: which builder; load: from_pretrained keyword arguments (passed as given, even ones the
# installed trainserve may not accept yet: the arm then fails with that error, recorded).
ARMS: dict[str, dict[str, Any]] = {
    "trainserve_int4": {"kind": "trainserve", "load": {"load_in_4bit": True}},
    "trainserve_bnb": {"kind": "trainserve", "load": {"load_in_4bit": True, "quant_backend": "bitsandbytes"}},
    "trainserve_fp8": {"kind": "trainserve", "load": {"load_in_4bit": False, "load_in_fp8": True}},
    "trainserve_fp8_block": {"kind": "trainserve", "load": {"load_in_4bit": False, "load_in_fp8": "block"}},
    "trainserve_int8": {"kind": "trainserve", "load": {"load_in_4bit": False, "load_in_8bit": True}},
    "trainserve_bf16": {"kind": "trainserve", "load": {"load_in_4bit": False, "load_in_16bit": True}},
    "trl_colocate": {"kind": "trl", "load": {}},
    "unsloth": {"kind": "unsloth", "load": {"load_in_4bit": True}},
}
# One-step-off training (issue 15): each trainserve arm again with GRPOTrainer(overlap=True), which needs
# TRL's importance-sampling correction (on, token_truncate, for these arms whatever --is-correction says).
# Separate names, so on-policy and overlapped runs sit side by side in one results table.
ARMS.update({f"{name}_overlap": {**spec, "overlap": True} for name, spec in list(ARMS.items())
             if spec["kind"] == "trainserve"})
# Each framework's own recommended checkpointing (recorded with the results).
GRADIENT_CHECKPOINTING = {"trainserve": "unsloth", "trl": True, "unsloth": "unsloth"}


def _checkpointing(s: dict[str, Any], kind: str) -> Any:
    """The arm's checkpointing: the framework's recommended mode, or ``--ts-checkpointing`` for trainserve."""
    choice = s.get("ts_checkpointing") if kind == "trainserve" else None
    if choice in (None, "default"):
        return GRADIENT_CHECKPOINTING[kind]
    return {"unsloth": "unsloth", "true": True, "false": False}[choice]


RECORDED_ARGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size",
                 "steps_per_generation", "num_generations", "max_completion_length", "temperature", "top_p",
                 "top_k", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "beta",
                 "loss_type", "num_iterations", "max_grad_norm", "seed", "bf16", "fp16", "gradient_checkpointing",
                 "use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_max_model_length",
                 "vllm_enable_sleep_mode", "vllm_importance_sampling_correction")


def log(arm: str, msg: str, every_rank: bool = False) -> None:
    """A progress line; under torchrun from rank 0 only (``every_rank``: from each, tagged with its rank)."""
    rank, world, _ = launch.world_from_env()
    if world == 1:
        print(f"[bench {wall()}] {arm}: {msg}", flush=True)
    elif rank == 0 or every_rank:
        print(f"[bench {wall()}] {arm}[rank {rank}]: {msg}", flush=True)


def grpo_config(s: dict[str, Any], kind: str, cuda: bool, out_dir: str, overlap: bool = False) -> Any:
    """The ``GRPOConfig``: identical for every arm except the engine and checkpointing fields (and the
    importance-sampling correction, which the overlapped trainserve arms need).

    ``trl.GRPOConfig`` is looked up at call time: in the Unsloth arm it is Unsloth's patched class."""
    import trl

    batch = s["prompts_per_step"] * s["generations"]
    micro = s["micro_batch"] or batch
    if batch % micro:
        raise ValueError(f"--micro-batch {micro} must divide the step's {batch} completions")
    # One optimizer step = one generation batch of `batch` completions per rank (TRL 1.16 sets
    # steps_per_generation = gradient_accumulation_steps and generation_batch_size = micro * world size * that:
    # under torchrun the global batch is world size x `batch`; the arithmetic is in bench_grpo_gpu_launch).
    kw: dict[str, Any] = dict(
        output_dir=out_dir, max_steps=s["steps"], seed=s["seed"], learning_rate=s["learning_rate"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch_fused",
        num_generations=s["generations"], per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro, max_completion_length=s["completion_length"],
        temperature=s["temperature"], top_p=1.0, beta=0.0, logging_steps=1, save_strategy="no",
        bf16=cuda, fp16=False, report_to="none", disable_tqdm=True, dataloader_pin_memory=cuda,
    )
    if kind == "trainserve":
        kw["gradient_checkpointing"] = False  # the model's own "unsloth" checkpointing (get_peft_model)
    elif kind == "trl":
        kw.update(gradient_checkpointing=True, use_vllm=True, vllm_mode="colocate",
                  vllm_gpu_memory_utilization=s["gpu_memory_utilization"],
                  vllm_max_model_length=s["max_seq_length"])
    # unsloth: checkpointing comes from get_peft_model(use_gradient_checkpointing="unsloth"), and
    # Unsloth turns use_vllm on itself for a fast_inference model (as its GRPO notebooks rely on).
    if s["is_correction"] == "off":  # trainserve ignores it (use_vllm stays off); recorded alike
        kw["vllm_importance_sampling_correction"] = False
    if overlap:  # one step stale by design: the correction is part of the method (one more logprob forward)
        kw.update(vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_truncate")
    kw.update(launch.config_kwargs(s, cuda))  # under torchrun only: collective timeout (and use_cpu on CPU)
    return trl.GRPOConfig(**kw)


def _lora(s: dict[str, Any]) -> dict[str, Any]:
    return dict(r=s["lora_rank"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, bias="none", target_modules=TARGETS)


def _checked_tokenizer(tok: Any, path: str, prompt: str, info: dict[str, Any]) -> Any:
    """The arm's tokenizer, or ``PreTrainedTokenizerFast`` from the checkpoint if it gives no ids
    (transformers 5 may map a qwen2 checkpoint to a slow class that mis-reads a non-BPE tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    info["tokenizer_class"] = type(tok).__name__
    text_tok = getattr(tok, "tokenizer", None)  # a processor's text tokenizer
    text_tok = text_tok if callable(text_tok) else tok
    try:
        n_ids = len(text_tok(prompt)["input_ids"])
    except Exception as exc:
        n_ids, info["tokenizer_error"] = 0, f"{type(exc).__name__}: {exc}"
    if n_ids >= 4:
        return tok
    info["tokenizer_replaced"] = f"{type(tok).__name__} gave {n_ids} ids; using PreTrainedTokenizerFast"
    fast = PreTrainedTokenizerFast.from_pretrained(path)
    if fast.pad_token is None:
        fast.pad_token = fast.eos_token
    return fast


def build(arm: str, s: dict[str, Any], cuda: bool, dataset: Any, info: dict[str, Any]) -> Any:
    """The arm's trainer, constructed (model loaded, engine started, adapter attached)."""
    spec, path = ARMS[arm], s["model_path"]
    kind, out_dir = spec["kind"], f"/tmp/bench_grpo_gpu/{arm}"
    prompt = dataset[0]["prompt"]
    t = time.perf_counter()
    if kind == "trainserve":
        import trainserve
        from trainserve import FastLanguageModel

        load = dict(max_seq_length=s["max_seq_length"], fast_inference=True,
                    gpu_memory_utilization=s["gpu_memory_utilization"], max_lora_rank=s["lora_rank"])
        load.update(spec["load"])
        load.update(s.get("ts_load_kwargs") or {})  # --ts-load-kwargs: the lead's extra/overriding options
        info["load_kwargs"] = load
        model, tok = FastLanguageModel.from_pretrained(path, **load)
        info["model_load_s"] = round(time.perf_counter() - t, 2)
        model = FastLanguageModel.get_peft_model(model, **_lora(s), random_state=s["seed"],
                                                 use_gradient_checkpointing=_checkpointing(s, kind))
        tok = _checked_tokenizer(tok, path, prompt, info)
        overlap = bool(spec.get("overlap"))
        info["overlap"] = overlap
        args = grpo_config(s, kind, cuda, out_dir, overlap=overlap)
        t = time.perf_counter()
        trainer = trainserve.GRPOTrainer(model=model, reward_funcs=[length_reward], args=args,
                                         train_dataset=dataset, processing_class=tok,
                                         **({"overlap": True} if overlap else {}))
    elif kind == "trl":
        import torch
        import trl
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
        info["model_load_s"] = round(time.perf_counter() - t, 2)
        tok = _checked_tokenizer(PreTrainedTokenizerFast.from_pretrained(path), path, prompt, info)
        args = grpo_config(s, kind, cuda, out_dir)
        t = time.perf_counter()
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[length_reward], args=args, train_dataset=dataset,
                                  processing_class=tok, peft_config=LoraConfig(**_lora(s), task_type="CAUSAL_LM"))
    else:  # unsloth, as its GRPO notebooks do it; `import unsloth` already ran first in this process
        from unsloth import FastLanguageModel

        info["load_kwargs"] = dict(spec["load"])
        model, tok = FastLanguageModel.from_pretrained(
            model_name=path, max_seq_length=s["max_seq_length"], fast_inference=True,
            gpu_memory_utilization=s["gpu_memory_utilization"], max_lora_rank=s["lora_rank"], **spec["load"])
        info["model_load_s"] = round(time.perf_counter() - t, 2)
        model = FastLanguageModel.get_peft_model(model, **_lora(s), random_state=s["seed"],
                                                 use_gradient_checkpointing=GRADIENT_CHECKPOINTING[kind])
        tok = _checked_tokenizer(tok, path, prompt, info)
        from trl import GRPOTrainer  # Unsloth's patched trainer

        args = grpo_config(s, kind, cuda, out_dir)
        t = time.perf_counter()
        trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[length_reward], args=args,
                              train_dataset=dataset)
    info["trainer_init_s"] = round(time.perf_counter() - t, 2)
    info["trainer_class"] = f"{type(trainer).__module__}.{type(trainer).__qualname__}"
    info["gradient_checkpointing_mode"] = _checkpointing(s, kind)
    info["trainer_args"] = {k: getattr(trainer.args, k, None) for k in RECORDED_ARGS}
    return trainer


def _lora_kernel_configs() -> dict[str, str] | None:
    from trainserve.engine.lora_kernel_configs import describe

    return describe()


def run(arm: str, s: dict[str, Any], result_path: str, t0: float) -> int:
    """Run ``arm`` and write its result JSON (after every step, and at the end)."""
    res: dict[str, Any] = {"arm": arm, "ok": False, "partial": True, "steps": [], "versions": versions(),
                           "host": launch.host(),
                           "settings": {k: v for k, v in s.items() if k != "ts_load_kwargs"},
                           "vllm_compile_cache_entries_at_start": compile_cache_entries()}
    kind = ARMS[arm]["kind"]
    sampler: MemorySampler | None = None
    rank, world, _ = launch.world_from_env()  # (0, 1, 0) in a plain process
    launch.note_pid(result_path)  # under torchrun (each rank has its own session): for the parent's clean-up

    def write() -> None:  # atomically: the parent may read it at any time after a kill; rank 0 only
        if rank:
            return
        if sampler is not None:
            res.update(sampler.report())
        tmp = Path(result_path + ".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        os.replace(tmp, result_path)

    try:
        launch.select_device()  # under torchrun: cuda:LOCAL_RANK before any framework touches CUDA
        if kind == "unsloth":
            import unsloth  # noqa: F401  (Unsloth must be imported before trl/transformers)
        elif kind == "trainserve":
            import trainserve

            res["trainserve_file"] = trainserve.__file__
        import torch
        from datasets import Dataset

        sampler = MemorySampler(s["mem_interval_ms"] / 1e3, devices=world).start()  # every rank's GPU
        cuda = torch.cuda.is_available()
        res["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
        res["world_size"] = world
        res["imports_s"] = round(time.time() - t0, 2)
        texts, lengths = prompt_texts(s["model_path"], s["dataset_size"], s["prompt_length"])
        res["prompt_tokens_mean"] = round(statistics.fmean(lengths), 1)
        res["prompt_tokens_max"] = max(lengths)
        dataset = Dataset.from_list([{"prompt": t} for t in texts])
        log(arm, f"building (process started {time.time() - t0:.1f} s ago)")
        write()
        trainer = build(arm, s, cuda, dataset, res)
        res["global_batch"] = launch.check_batch(trainer.args, s, world)  # completions per step, all ranks
        res["vllm_lora_kernel_configs"] = _lora_kernel_configs()  # which tiles vLLM's LoRA kernels ran
        res["trainserve_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("TRAINSERVE_")}
        res["vllm_lora_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_LORA_")}
        res["startup_s"] = round(time.time() - t0, 2)
        write()
        log(arm, f"trainer constructed: start-up {res['startup_s']} s (model load {res.get('model_load_s')} s)")
        train(trainer, arm, s, res, sampler, cuda, write)
        walks = getattr(trainer, "_walks", None)  # trainserve: did the per-micro-batch module walks move?
        if walks is not None:
            res["module_walks"] = {"elided_train_calls": walks.elided_train_calls,
                                   "cached_parameter_calls": walks.cached_parameter_calls}
        res.update(summarise(res, s), ok=True, partial=False)
        if not any(x.get("rollout_s") for x in res["steps"]):
            res["rollout_note"] = "the generation hook was never called: no rollout timing"
    except BaseException as exc:  # recorded, not hidden: the table says why an arm could not run
        res.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-6000:])
        try:
            res.update(summarise(res, s))  # what the steps that did run measured
        except Exception:
            pass
        log(arm, f"FAILED: {res['error'][:500]}", every_rank=True)
        if rank:  # only rank 0 writes a result: the other ranks' tracebacks go to the arm's log
            print(res["traceback"], file=sys.stderr, flush=True)
    finally:
        if sampler is not None:
            sampler.stop()
        res["wall_s"] = round(time.time() - t0, 1)
        write()
    log(arm, "done" if res["ok"] else "done (failed)")
    return 0 if res["ok"] else 3


def train(trainer: Any, arm: str, s: dict[str, Any], res: dict[str, Any], sampler: MemorySampler,
          cuda: bool, write: Any) -> None:
    """``trainer.train()`` with the generation hook and each step timed, memory per step recorded."""
    import torch
    from transformers import TrainerCallback

    pending: list[tuple[float, int | None, int]] = []
    syncs: list[float] = []
    hook = "_generate_single_turn" if hasattr(trainer, "_generate_single_turn") else "_generate"
    res["rollout_timer"] = hook
    inner = getattr(trainer, hook)
    marks: dict[str, Any] = {"last": 0.0, "step": 0}
    phases = PhasePeaks(sampler)
    profiler = TrainingStepProfiler(s["profile_step"]) if cuda and s.get("profile_step") else None

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        with phases.rollout():
            out = inner(*args, **kwargs)
        if profiler is not None:
            profiler.rollout_returned(marks["step"])
        ids = out[0] if hook == "_generate_single_turn" and isinstance(out, tuple) else None
        try:
            tokens, n = (sum(len(c) for c in ids), len(ids)) if ids is not None else (None, 0)
        except TypeError:
            tokens, n = None, 0
        pending.append((time.perf_counter() - t, tokens, n))
        return out

    setattr(trainer, hook, timed)
    vgen = getattr(trainer, "vllm_generation", None)
    if vgen is not None and hasattr(vgen, "sync_weights"):  # TRL colocate: merge + load weights
        sync_inner = vgen.sync_weights

        def timed_sync(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return sync_inner(*args, **kwargs)
            finally:
                syncs.append(time.perf_counter() - t)

        vgen.sync_weights = timed_sync

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            sampler.set_phase("warmup" if s["warmup"] else "measured")
            phases.start()
            marks["last"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            marks["step"] = state.global_step + 1

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            if profiler is not None and (summary := profiler.step_ended(state.global_step)) is not None:
                res["profile"] = summary
                now = time.perf_counter()  # the profiler's own clean-up is not the next step's time
            rolls, pending[:] = list(pending), []
            sync_s, syncs[:] = (sum(syncs) if syncs else None), []
            tokens = [x[1] for x in rolls]
            rec = {"step": state.global_step, "step_s": round(now - marks["last"], 4),
                   "rollout_s": round(sum(x[0] for x in rolls), 4) if rolls else None,
                   "rollout_tokens": None if not rolls or None in tokens else sum(tokens),
                   "completions": sum(x[2] for x in rolls), "weight_sync_s": sync_s,
                   "mem_peak_gib": (lambda p: p and round(p / GIB, 2))(sampler.take_step_peak())}
            rec.update(sampler.step_per_gpu())  # several GPUs (--nproc): each one's peak
            rec.update(phases.step_ended())
            if (kinds := attention_kinds_since(marks)) is not None:
                rec["attention_kinds"] = kinds
            if (standby := standby_since(marks)) is not None:
                rec["standby"] = standby
            if (gate_up := mlp_gate_up_since(marks)) is not None:
                rec["mlp_gate_up"] = gate_up
            if (shared := shared_prefix_since(marks)) is not None:
                rec["shared_prefix"] = shared
            marks["last"] = now
            res["steps"].append(rec)
            tps = (f", {rec['rollout_tokens'] / rec['rollout_s']:.0f} tok/s"
                   if rec["rollout_s"] and rec["rollout_tokens"] else "")
            log(arm, f"step {state.global_step}/{s['steps']}: {rec['step_s']:.2f} s "
                     f"(rollout {rec['rollout_s']} s, {rec['rollout_tokens']} tok{tps}), "
                     f"step peak {rec['mem_peak_gib']} GiB (rollout {rec['mem_peak_rollout_gib']}, "
                     f"training {rec['mem_peak_training_gib']}, torch cache unused at the rollout "
                     f"{rec.get('torch_cache_unused_gib_rollout')}), gate|up kept/recomputed "
                     f"{'/'.join(str(v) for v in rec.get('mlp_gate_up', {}).values()) or '-'}")
            if state.global_step == s["warmup"]:
                sampler.set_phase("measured")
                if cuda:
                    res["torch_max_allocated_gib_before_measured"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
                    torch.cuda.reset_peak_memory_stats()
            write()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                res.setdefault("logged", []).append(
                    {k: logs.get(k) for k in ("reward", "completions/mean_length", "rollout/adapter_swap_ms",
                                              "loss", "grad_norm", "step_time", "rollout/seconds",
                                              "rollout/wait_seconds", "rollout/staleness",
                                              "sampling/importance_sampling_ratio/mean")}
                    | {"step": state.global_step})
                log(arm, f"step {state.global_step}: reward {logs['reward']:.4f}, "
                         f"mean completion {logs.get('completions/mean_length')}")

    trainer.add_callback(Clock())
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
        res["torch_max_allocated_gib_measured"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        res["torch_max_reserved_gib_measured"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
