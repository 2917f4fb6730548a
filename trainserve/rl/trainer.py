"""``GRPOTrainer``: TRL's GRPO trainer with rollouts from the colocated engine and the live adapter.

Only TRL's generation hook (``_generate_single_turn``) is replaced: every rollout is sampled by the
process's vLLM engine through ``model.fast_generate``, which first copies the trainer's current
LoRA weights into the engine's live slot in memory (no disk, no merge, no second engine). TRL's
tokenisation, reward computation, advantages and loss are used unchanged, so configuration is a
plain ``trl.GRPOConfig``.

Models without a colocated engine (``fast_inference=False``, a path, a plain transformers model)
fall back to TRL's own transformers generation with a warning, so the class stays a drop-in.

``overlap=True`` trains one step off-policy: the engine generates the next batch while this one
trains (see :mod:`trainserve.rl.overlap`).

Under ``torchrun`` (data parallel, :mod:`trainserve.distributed`) each rank generates the prompts
TRL hands it with its own engine, as TRL's colocate mode does; rollout seeds include the rank, so a
prompt group split over ranks gets different samples on each.
"""

from __future__ import annotations

import copy
import hashlib
import time
import warnings
from typing import Any

import torch
import trl
from transformers import TrainerCallback
from trl.trainer.utils import split_tensor_dict

from trainserve.distributed import prepare_trainer_args
from trainserve.model_api import state_of
from trainserve.rl import checkpoint as ckpt
from trainserve.rl.group_batches import group_order, groups_may_stay_together, reorder_rows
from trainserve.rl.kv_budget import KVPrefetchAtStepEnd, advise_kv_cache
from trainserve.rl.module_walks import ModuleWalkCache
from trainserve.rl.overlap import EngineBatch, OneStepOff, RolloutRecord
from trainserve.rl.overlap_checks import check_overlap
from trainserve.rl.rewards import check_model_rewards, checked_reward_func
from trainserve.rl.rollout_batch import group_runs, unpack_outputs

__all__ = ["GRPOTrainer"]


def _lora_kwargs(peft_config: Any) -> dict[str, Any]:
    """``FastLanguageModel.get_peft_model`` arguments equivalent to a ``peft.LoraConfig``."""
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise NotImplementedError(
            f"the colocated engine serves LoRA adapters only; got peft_config={type(peft_config).__name__}")
    targets = peft_config.target_modules
    return dict(
        r=peft_config.r, lora_alpha=peft_config.lora_alpha, lora_dropout=peft_config.lora_dropout,
        target_modules=sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        bias=peft_config.bias, use_rslora=peft_config.use_rslora,
        layers_to_transform=peft_config.layers_to_transform, layers_pattern=peft_config.layers_pattern,
        init_lora_weights=peft_config.init_lora_weights,
    )


class GRPOTrainer(trl.GRPOTrainer):
    """Drop-in ``trl.GRPOTrainer`` whose rollouts come from the colocated engine with the live adapter.

    Pass a model from ``FastLanguageModel.from_pretrained(..., fast_inference=True)``, either already
    wrapped by ``FastLanguageModel.get_peft_model`` or together with a ``peft_config`` (a
    ``LoraConfig``, applied through ``get_peft_model`` so the engine serves it). ``num_generations``,
    ``max_completion_length``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
    ``repetition_penalty`` and ``generation_kwargs`` (as vLLM ``SamplingParams`` fields) come from
    ``args``. ``args.use_vllm`` must stay ``False``: the engine is already colocated.

    Each rollout is seeded from ``(args.seed, global_step, call, prompt)``, so a seeded run samples
    the same completions again, and a resumed run continues as the uninterrupted one would (with a
    larger ``max_steps`` it extends the run: the learning-rate schedule is rebuilt for the new total).
    Reward functions are validated (see :mod:`trainserve.rl.rewards`); checkpoints are atomic and
    resuming loads the adapter in place (see :mod:`trainserve.rl.checkpoint`). Where TRL's loss allows
    it, a micro-batch holds every sample of its prompts, so the forward computes each prompt once
    (:mod:`trainserve.rl.group_batches`, :mod:`trainserve.models.shared_prefix`).

    ``overlap=True``: one-step-off training. While step k trains on batch k, the engine generates
    batch k+1 with the adapter of step k-1 (pinned in one slot of the live adapter's double
    buffer), on the engine loop's thread; TRL's importance-sampling correction
    (``args.vllm_importance_sampling_correction``, ``..._mode``, ``..._clip_min/max``) reweights each
    token with the engine's behaviour logprobs of that version. ``rollout_records`` lists, per
    step, the version that generated every sample. Settings that cannot work with it raise a
    ``ValueError`` naming the setting. See :mod:`trainserve.rl.overlap`.
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: trl.GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: list[Any] | None = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
        overlap: bool = False,
    ):
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be True or False, got {overlap!r}")
        if args is not None and not isinstance(args, trl.GRPOConfig):
            raise TypeError(f"args must be a trl.GRPOConfig, got {type(args).__name__}")
        if args is not None and args.use_vllm:
            raise ValueError(
                "GRPOConfig(use_vllm=True) asks TRL to start its own vLLM, but trainserve's GRPOTrainer "
                "already generates with the colocated engine that shares the model's weights. Leave "
                "use_vllm=False (the default): rollouts use model.fast_generate with the live adapter.")
        prepare_trainer_args(args)  # under torchrun: DDP over every rank, not one run per rank
        state = None if isinstance(model, str) else state_of(model)
        if overlap:  # before anything is built: every refusal names the setting
            check_overlap(args, state, tools=tools, rollout_func=rollout_func,
                          environment_factory=environment_factory)
        if state is None:
            warnings.warn(
                "trainserve.GRPOTrainer: the model has no colocated vLLM engine (load it with "
                "FastLanguageModel.from_pretrained(..., fast_inference=True)); falling back to TRL's own "
                "transformers generation, which is much slower.", UserWarning, stacklevel=2)
        else:
            model, peft_config = self._prepare_fast_model(model, state, peft_config)
            if args is not None and args.use_transformers_continuous_batching:
                raise ValueError("use_transformers_continuous_batching=True conflicts with the colocated "
                                 "engine, which generates every rollout; leave it False")
            if args is not None and args.bf16 and not torch.cuda.is_available():
                warnings.warn(
                    "GRPOConfig(bf16=True) on CPU trains under bf16 autocast while the engine samples in the "
                    "model's dtype; pass bf16=False for matching rollout and training logprobs (and speed).",
                    UserWarning, stacklevel=2)
            if processing_class is None:
                processing_class = state.tokenizer
        self._engine_state = state
        self._fast_model = model if state is not None else None
        self._seed_step, self._seed_calls = -1, 0
        self._version_offset = 0  # resumed runs: the adapter_version metric continues the saved run's count
        self._walks = ModuleWalkCache()
        super().__init__(
            model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class,
            reward_processing_classes=reward_processing_classes, callbacks=callbacks, optimizers=optimizers,
            quantization_config=quantization_config, peft_config=peft_config, tools=tools,
            rollout_func=rollout_func, environment_factory=environment_factory,
        )
        if args is None:  # TRL built a default config: check it as a given one is checked above
            prepare_trainer_args(self.args)
        self._groups_together = state is not None and groups_may_stay_together(
            self.args, self.loss_type, self.top_entropy_quantile)
        if state is not None:
            advise_kv_cache(state.engine, self.args, state.config)
            self.add_callback(KVPrefetchAtStepEnd(state.engine.standby))
        for i, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names, strict=True)):
            if not isinstance(func, torch.nn.Module):
                self.reward_funcs[i] = checked_reward_func(func, name)
        self._overlap: OneStepOff | None = None
        if overlap:
            # TRL computes its vLLM importance-sampling correction (old logprobs under the current
            # weights vs the engine's behaviour logprobs, truncated or masked ratio in the loss) only
            # when `use_vllm` is set. The *trainer attribute* (not args.use_vllm: TRL starts no second
            # vLLM, that was decided in its __init__) turns it on; the other places TRL reads it —
            # its own generation, tools, rollout_func — are overridden or refused with overlap.
            self.use_vllm = True
            self._overlap = OneStepOff(state.engine, state.live, self._lookahead_batch,
                                       lambda: self._version_offset)

    @property
    def rollout_records(self) -> list[RolloutRecord]:
        """Overlapped runs: how each training batch was generated (version per sample); else empty."""
        return self._overlap.records if self._overlap is not None else []

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; with ``overlap=True`` inside the overlap session (engine loop in its own
        thread and CUDA stream, KV cache kept mapped, a batch generated ahead aborted at the end)."""
        if self._overlap is None:
            return super().train(*args, **kwargs)
        with self._overlap.session():
            return super().train(*args, **kwargs)

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """TRL's training step; transformers' per-micro-batch module walks happen after ``backward()``
        returns, with the backward still queued on the GPU (:mod:`trainserve.rl.module_walks`)."""
        with self._walks.train_call_elided(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._walks.refresh(model, parameters=self.accelerator.sync_gradients)  # the clip comes next
        return loss

    def _prepare_inputs(self, generation_batch: dict[str, Any]) -> dict[str, Any]:
        """TRL's, but where the loss allows it whole prompt groups are shuffled instead of rows, so a
        micro-batch holds every sample of its prompts and computes each prompt once
        (:mod:`trainserve.rl.group_batches`, :mod:`trainserve.models.shared_prefix`)."""
        if not (self._groups_together and self.model.training):
            return super()._prepare_inputs(generation_batch)
        if self._step % (self.args.steps_per_generation * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = reorder_rows(batch, group_order(batch["prompt_ids"], batch["prompt_mask"]))
            self._buffered_inputs = split_tensor_dict(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _clip_grad_norm(self, model: Any) -> Any:
        """transformers' gradient clip, given the parameter list walked after this micro-batch's backward."""
        with self._walks.parameters_cached(model):
            return super()._clip_grad_norm(model)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """With overlap, also look at the next optimizer step's prompts (to generate them ahead)."""
        if self._overlap is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        return self._overlap.batch_samples(super().get_batch_samples, epoch_iterator, num_batches, device)

    @staticmethod
    def _prepare_fast_model(model: Any, state: Any, peft_config: Any) -> tuple[Any, Any]:
        from trainserve.engine.live_adapter import LiveAdapterRevoked
        from trainserve.loader import FastLanguageModel

        if not hasattr(model, "peft_config"):
            if peft_config is None:
                raise ValueError(
                    "GRPO with the colocated engine trains a LoRA adapter: wrap the model with "
                    "FastLanguageModel.get_peft_model(model, ...) or pass peft_config=LoraConfig(...)")
            model = FastLanguageModel.get_peft_model(model, **_lora_kwargs(peft_config))
            return model, None
        if peft_config is not None:
            raise ValueError("the model already has a PEFT adapter; do not pass peft_config as well")
        if state.live is None or state.peft_model is not model:
            raise ValueError(
                "the model's adapter is not the engine's live adapter: create it with "
                "FastLanguageModel.get_peft_model (not peft.get_peft_model) so rollouts use it")
        if state.live.engine.live_owner is not state.live:
            raise LiveAdapterRevoked(
                "a newer FastLanguageModel.get_peft_model() on this engine took over the live adapter; "
                "train the newest model")
        return model, None

    # ------------------------------------------------------------------ rollouts
    def _rollout_seed(self, call: int, group: int, step: int | None = None) -> int:
        step = self.state.global_step if step is None else step
        key = f"{self.args.seed}/{step}/{call}/{group}"
        if self.accelerator.num_processes > 1:  # data parallel: a group split over ranks must not repeat samples
            key += f"/rank{self.accelerator.process_index}"
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little") & 0x3FFFFFFF

    def _sampling_params(self, n: int, seed: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = dict(
            n=n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0,
            min_p=0.0 if self.min_p is None else self.min_p, repetition_penalty=self.repetition_penalty,
            max_tokens=self.max_completion_length, stop_token_ids=list(self.eos_token_ids),
            seed=seed, detokenize=False,  # TRL decodes completion ids itself; the engine need not
        )
        if self._uses_sampled_logprobs():
            kwargs["logprobs"] = 0  # the sampled token's logprob only
        kwargs.update(self.args.generation_kwargs or {})
        # FINAL_ONLY: the engine aggregates the n samples of a request into one output.
        kwargs["output_kind"] = RequestOutputKind.FINAL_ONLY
        return SamplingParams(**kwargs)

    def _uses_sampled_logprobs(self) -> bool:
        """Whether TRL reads the engine's per-token logprobs (its IS correction, ``use_vllm``, set by
        ``overlap=True``; the off-policy mask). Otherwise they cost a vocabulary log-softmax per token
        and, on the host with the GPU idle, 64 × 256 Python floats and a tensor nobody reads."""
        return bool(self.use_vllm) or getattr(self, "off_policy_mask_threshold", None) is not None

    def _generate_single_turn(
        self, prompt_ids: Any, images: Any, multimodal_fields: Any, num_generations: int,
        has_tool_images: bool = False,
    ) -> tuple[list[list[int]], list[list[float | None]] | None]:
        """Sample completions for ``prompt_ids`` with the colocated engine and the adapter as trained now."""
        if self._engine_state is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        if images is not None or multimodal_fields or has_tool_images:
            raise NotImplementedError("the colocated engine generates from text prompts only (no images)")
        if self._overlap is not None and self.model.training:
            return self._overlapped_rollout(prompt_ids, num_generations)
        if self.state.global_step != self._seed_step:
            self._seed_step, self._seed_calls = self.state.global_step, 0
        call = self._seed_calls
        self._seed_calls += 1
        batch = self._engine_batch(prompt_ids, num_generations, self.state.global_step, call)
        live = self._engine_state.live
        updates = live.updates
        t0 = time.perf_counter()
        outputs = self._fast_model.fast_generate(batch.prompts, sampling_params=batch.params)
        seconds = time.perf_counter() - t0
        completion_ids, logprobs = unpack_outputs(outputs, batch, self._uses_sampled_logprobs())
        mode = "train" if self.model.training else "eval"
        tokens = sum(len(c) for c in completion_ids)
        self._metrics[mode]["rollout/tokens_per_s"].append(tokens / max(seconds, 1e-9))
        self._metrics[mode]["rollout/seconds"].append(seconds)
        swap_ms = live.last_update_ms if live.updates > updates else 0.0  # 0: adapter unchanged
        self._metrics[mode]["rollout/adapter_swap_ms"].append(swap_ms)
        self._metrics[mode]["rollout/adapter_version"].append(float(live.version + self._version_offset))
        return completion_ids, logprobs

    def _engine_batch(self, prompt_ids: Any, num_generations: int, step: int, call: int) -> EngineBatch:
        """The engine requests for ``prompt_ids``, seeded for global step ``step``."""
        max_len = self._engine_state.engine.spec.max_model_len
        longest = max((len(p) for p in prompt_ids), default=0)
        if longest >= max_len:
            raise ValueError(f"a prompt has {longest} tokens but the engine's max_seq_length is {max_len}; "
                             "load the model with a larger max_seq_length or shorten the prompts")
        groups = group_runs(prompt_ids, num_generations)
        params = [self._sampling_params(n, self._rollout_seed(call, g, step)) for g, (_, n) in enumerate(groups)]
        return EngineBatch([list(p) for p in prompt_ids], [p for p, _ in groups], [n for _, n in groups], params)

    def _lookahead_batch(self, inputs: list[dict[str, Any]], step: int) -> EngineBatch:
        """Overlap: the engine requests for a data-loader item that global step ``step`` will train on,
        tokenised as TRL's ``_generate`` will tokenise it then."""
        prompt_ids, images, multimodal_fields = self._tokenize_prompts(copy.deepcopy([x["prompt"] for x in inputs]))
        if images is not None or multimodal_fields:
            raise NotImplementedError("the colocated engine generates from text prompts only (no images)")
        return self._engine_batch(prompt_ids, self.num_generations, step, call=0)

    def _overlapped_rollout(self, prompt_ids: Any, num_generations: int) -> tuple[list[list[int]], list[Any]]:
        assert self._overlap is not None
        step = self.state.global_step
        batch = self._engine_batch(prompt_ids, num_generations, step, call=0)
        outputs, record = self._overlap.rollout(batch, step, self.state.max_steps)
        completion_ids, logprobs = unpack_outputs(outputs, batch, True)
        metrics = self._metrics["train"]
        metrics["rollout/tokens_per_s"].append(sum(len(c) for c in completion_ids) / max(record.generate_seconds, 1e-9))
        metrics["rollout/seconds"].append(record.generate_seconds)
        metrics["rollout/wait_seconds"].append(record.wait_seconds)
        metrics["rollout/adapter_swap_ms"].append(self._overlap.last_swap_ms)
        metrics["rollout/adapter_version"].append(float(record.adapter_version))
        metrics["rollout/policy_step"].append(float(record.policy_step))
        metrics["rollout/staleness"].append(float(record.staleness))
        self._log_completion_extra("adapter_version", record.sample_versions)  # per sample, in the completions table
        return completion_ids, logprobs

    # ------------------------------------------------------------------ rewards
    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any,
                           completion_ids_list: Any) -> Any:
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        for i, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names, strict=True)):
            if isinstance(func, torch.nn.Module):
                check_model_rewards(name, rewards[:, i])
        return rewards

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        ckpt.save_checkpoint(self, self._get_output_dir(trial=trial))

    def trainserve_checkpoint_state(self) -> dict[str, Any]:
        """What :func:`trainserve.rl.checkpoint.save_checkpoint` stores beside the Hugging Face layout."""
        live = self._engine_state.live if self._engine_state is not None else None
        return {"adapter_version": None if live is None else live.version + self._version_offset}

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self._engine_state is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        ckpt.load_adapter_in_place(self._fast_model, resume_from_checkpoint)
        saved = ckpt.read_trainserve_state(resume_from_checkpoint).get("adapter_version")
        if saved is not None:  # the next rollout syncs the loaded adapter: saved + 1, as without the stop
            self._version_offset = int(saved) - self._engine_state.live.version

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restore the optimizer and scheduler (resuming only), then take the learning rate from *this*
        run's schedule at the restored step (a resume with a larger ``max_steps`` extends the run; see
        :func:`trainserve.rl.checkpoint.rebuild_lr_schedule`) and this run's save/logging intervals."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        # transformers keeps the saved run's logging/save/eval intervals; this run's arguments apply.
        self.state.compute_steps(self.args, self.state.max_steps)
        if self.lr_scheduler is None:
            return
        if not ckpt.rebuild_lr_schedule(self.optimizer, self.lr_scheduler):
            saved_total = ckpt.checkpoint_max_steps(checkpoint)
            if saved_total is not None and saved_total != self.state.max_steps:
                warnings.warn(
                    f"resuming a {saved_total}-step run as a {self.state.max_steps}-step one: the learning-rate "
                    f"scheduler {type(self.lr_scheduler).__name__} continues from its saved state (only "
                    "LambdaLR schedules, every transformers schedule, are rebuilt for the new total)",
                    UserWarning, stacklevel=2)
