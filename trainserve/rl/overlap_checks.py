"""Settings that one-step-off GRPO (``GRPOTrainer(..., overlap=True)``) cannot work with.

Each is refused when the trainer is constructed, with a ``ValueError`` that names the setting and
says why — never silently trained around: an overlapped run that quietly trains on stale samples
without correction, or reuses them for several iterations, still "learns" on easy tasks, so the
mistake would only show up as worse results much later.
"""

from __future__ import annotations

from typing import Any

from trainserve.engine import vllm_compat

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def check_overlap(args: Any, state: Any, *, tools: Any = None, rollout_func: Any = None,
                  environment_factory: Any = None) -> None:
    """Raise ``ValueError`` naming the first setting that rules out ``overlap=True``.

    ``args`` is the ``trl.GRPOConfig`` (``None``: TRL's defaults, which are fine); ``state`` the
    model's :class:`trainserve.model_api.ModelState` (``None``: no colocated engine)."""
    if state is None:
        raise ValueError(
            "overlap=True needs the colocated vLLM engine, which generates the next batch while the trainer "
            "trains: load the model with FastLanguageModel.from_pretrained(..., fast_inference=True) (this model "
            "has none: fast_inference=False, a model path, or a plain transformers model)")
    if getattr(state, "live_base", None) is not None:
        raise ValueError(
            "overlap=True needs LoRA training, not full_finetuning=True: the optimizer writes the base weights the "
            "engine generates with, so generation cannot use the previous step's weights while this step trains")
    for name, value in (("rollout_func", rollout_func), ("tools", tools),
                        ("environment_factory", environment_factory)):
        if value:
            raise ValueError(f"overlap=True does not support {name}: the next batch is generated ahead by the engine "
                             f"from the prompts alone; pass {name}=None or overlap=False")
    if args is None:
        return
    if args.num_iterations != 1:
        raise ValueError(
            f"overlap=True needs num_iterations=1 (got {args.num_iterations}): every batch is already one optimizer "
            "step stale when it is trained on, and reusing it for more iterations would train on samples up to "
            f"{args.num_iterations} steps old (the engine's behaviour logprobs are those of the generating version, "
            "which the correction relies on)")
    if not args.vllm_importance_sampling_correction:
        raise ValueError(
            "overlap=True needs vllm_importance_sampling_correction=True: the samples of every step are generated "
            "by the adapter one step older than the one being trained, and TRL's importance-sampling correction "
            "(with the engine's behaviour logprobs) is what accounts for that")
    if args.vllm_importance_sampling_mode not in IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode={args.vllm_importance_sampling_mode!r} is not one of "
                         f"{', '.join(IS_MODES)}")
    if args.loss_type == "vespo" and args.vllm_importance_sampling_mode not in ("token_truncate", "token_mask"):
        raise ValueError("overlap=True with loss_type='vespo' needs vllm_importance_sampling_mode 'token_truncate' "
                         f"or 'token_mask' (got {args.vllm_importance_sampling_mode!r})")
    if args.steps_per_generation != args.gradient_accumulation_steps:
        raise ValueError(
            f"overlap=True needs one generation per optimizer step: steps_per_generation ({args.steps_per_generation})"
            f" must equal gradient_accumulation_steps ({args.gradient_accumulation_steps}); leave steps_per_generation "
            "and generation_batch_size unset")
    temperature = (args.generation_kwargs or {}).get("temperature", args.temperature)
    mode = vllm_compat.logprobs_mode(state.engine.llm)  # VLLMInternalsChanged rather than a guessed default
    if mode == "raw_logprobs" and float(temperature) != 1.0:
        raise ValueError(
            f"overlap=True needs temperature=1.0 (got {temperature}): the engine returns raw logprobs "
            "(vLLM logprobs_mode='raw_logprobs', before temperature scaling), while the trainer's logprobs are "
            "temperature-scaled, so the importance-sampling ratios of every token would be biased")
