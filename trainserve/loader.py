"""``FastLanguageModel``: the Unsloth-compatible entry point (``from_pretrained``, ``get_peft_model``)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import torch

from trainserve import model_api
from trainserve.adapters import SUPPORTED_TARGETS, AdapterRegistry
from trainserve.arg_checks import (
    cap_max_seq_length,
    check_cpu_engine,
    check_device_map,
    check_load_arguments,
    check_model_source,
    check_peft_arguments,
    check_peft_model_input,
)
from trainserve.checkpoint_check import check_checkpoint_complete
from trainserve.distributed import check_parallel_config, exclude_frozen_from_ddp, launcher_world
from trainserve.hf_kwargs import pop_hf_kwargs, resolve_model_path
from trainserve.lora_variants import check_bias, resolve_loftq
from trainserve.models import get_fast_model_class
from trainserve.models.checkpointing import normalize_gc_mode
from trainserve.precision import check_model_dims, resolve_precision, warn_cpu_fallback
from trainserve.reload import load_saved_adapter, saved_adapter_base
from trainserve.rope_config import apply_rope_parameters, check_supported, normalize_rope_scaling, position_limit
from trainserve.trainable_modules import check_lora_targets, lora_config_arguments, refuse_with_engine, split_targets
from trainserve.vocab import check_vocab_size, pop_resize_model_vocab, resize_for_from_pretrained

logger = logging.getLogger("trainserve")

# model_type → transformers architecture served by the shared-weight engine path
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mistral": "MistralForCausalLM"}

# Seed arguments this release accepts only at their default value.
_DEFAULT_ONLY = {
    "offload_embedding": False,
    "qat_scheme": None, "unsloth_tiled_mlp": False,
}
# Seed arguments whose other harmless values mean what trainserve does anyway: trainserve never
# swaps the model name for another repository (use_exact_model_name=True), and it trains in the
# model's dtype (float32_mixed_precision=False).
_ACCEPTED_VALUES: dict[str, tuple[Any, ...]] = {
    "use_exact_model_name": (False, True), "float32_mixed_precision": (None, False),
}

def _reject_unsupported(kwargs: dict[str, Any]) -> None:
    for name, default in _DEFAULT_ONLY.items():
        value = kwargs.pop(name, default)
        if value != default:
            raise NotImplementedError(f"{name}={value!r} is not supported by trainserve yet")
    for name, allowed in _ACCEPTED_VALUES.items():
        value = kwargs.pop(name, allowed[0])
        if not any(value is a for a in allowed):
            raise NotImplementedError(f"{name}={value!r} is not supported (accepted: {allowed})")
    if kwargs:
        raise TypeError(f"from_pretrained got unexpected arguments {sorted(kwargs)}")


def _resolve_dtype(dtype: Any, cuda: bool) -> torch.dtype:
    if dtype is None:
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU: fp32 trains and serves faster and exactly on CPUs without AMX
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16 (or their names), "
                         f"got {dtype!r}")
    return resolved


def _fix_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class FastLanguageModel:
    """Load a causal LM for LoRA training, optionally colocated with a vLLM engine (``fast_inference``)."""

    @staticmethod
    def from_pretrained(
        model_name: str,
        max_seq_length: int = 2048,
        dtype: Any = None,
        load_in_4bit: bool | None = None,
        load_in_8bit: bool = False,
        load_in_16bit: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        device_map: Any = "sequential",
        rope_scaling: dict | None = None,
        fix_tokenizer: bool = True,
        trust_remote_code: bool = False,
        use_gradient_checkpointing: Any = "unsloth",
        revision: str | None = None,
        fast_inference: bool = False,
        gpu_memory_utilization: float = 0.5,
        float8_kv_cache: bool = False,
        random_state: int = 3407,
        max_lora_rank: int = 64,
        max_loras: int = 1,
        disable_log_stats: bool = True,
        standby: bool = True,
        load_in_fp8: bool | str = False,
        quant_backend: str = "trainserve",
        tensor_parallel_size: int = 1,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """Return ``(model, tokenizer)``. With ``fast_inference=True`` a colocated vLLM engine owns the
        base weights and the model's parameters are views of them; ``model.fast_generate`` generates.

        ``max_loras``: engine LoRA slots for saved adapters (``load_lora``), besides the two that hold
        the live adapter; more slots let one batch mix more saved adapters but slow vLLM's LoRA
        kernels a little. ``standby`` (CUDA): free the KV cache while the trainer runs.

        Weight formats (one of): ``load_in_4bit`` (the default when no other is asked: trainserve's
        own int4 engine format, or NF4 through vLLM's bitsandbytes with ``quant_backend="bitsandbytes"``),
        ``load_in_8bit`` (int8), ``load_in_fp8`` (``True``: FP8 with per-channel weight scales and
        per-token activations; ``"block"``: 128x128 weight blocks, 1x128 activation groups; the trainer
        rounds its GEMM inputs as the engine does), ``load_in_16bit`` / ``full_finetuning`` (16-bit). Without CUDA the
        quantised formats warn once and load ``dtype`` weights. A saved LoRA directory as ``model_name``
        loads its base model (adapter_config.json) and the adapter on top, trainable.
        ``tensor_parallel_size`` must be 1: under torchrun each rank runs its own engine (data
        parallel, :mod:`trainserve.distributed`); larger values are refused by name."""
        # the arguments as given (locals() holds only them here): a saved adapter's base loads with them
        call = {**{k: v for k, v in locals().items() if k not in ("model_name", "kwargs")}, **kwargs}
        from transformers import AutoConfig, AutoTokenizer

        check_load_arguments(max_seq_length=max_seq_length, gpu_memory_utilization=gpu_memory_utilization,
                             random_state=random_state, max_lora_rank=max_lora_rank, max_loras=max_loras,
                             fast_inference=fast_inference, fix_tokenizer=fix_tokenizer,
                             trust_remote_code=trust_remote_code, float8_kv_cache=float8_kv_cache,
                             disable_log_stats=disable_log_stats, standby=standby)
        model_name = check_model_source(model_name, revision, token)
        dtype, hf = pop_hf_kwargs(kwargs, dtype)
        resize_model_vocab = pop_resize_model_vocab(kwargs, fast_inference)
        _reject_unsupported(kwargs)
        model_name = resolve_model_path(model_name, hf, revision, token)
        adapter_base = saved_adapter_base(model_name)
        if adapter_base is not None:
            model, tokenizer = FastLanguageModel.from_pretrained(adapter_base, **call)
            return load_saved_adapter(model, tokenizer, model_name, FastLanguageModel.get_peft_model,
                                      use_gradient_checkpointing, random_state,
                                      _fix_tokenizer if fix_tokenizer else None)
        cuda = torch.cuda.is_available()
        torch_dtype = _resolve_dtype(dtype, cuda)
        precision = resolve_precision(
            load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, load_in_16bit=load_in_16bit,
            load_in_fp8=load_in_fp8, full_finetuning=full_finetuning, quant_backend=quant_backend,
            fast_inference=fast_inference, cuda=cuda)
        check_cpu_engine(fast_inference=fast_inference, cuda=cuda, gpu_memory_utilization=gpu_memory_utilization,
                         float8_kv_cache=float8_kv_cache)
        check_device_map(device_map, cuda)
        gc_mode = normalize_gc_mode(use_gradient_checkpointing)

        config = AutoConfig.from_pretrained(model_name, token=token, revision=revision,
                                            trust_remote_code=trust_remote_code, **hf.config_kwargs())
        check_vocab_size(resize_model_vocab, config.vocab_size)  # before anything loads
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise NotImplementedError(
                f"model_type {model_type!r} is not supported (supported: {sorted(ARCHITECTURES)})")
        fast_cls = get_fast_model_class(model_type)
        # Everything that can be refused is refused here, before an engine starts.
        fast_cls.validate_config(config, rope_scaling=rope_scaling)
        rope_parameters = None
        if rope_scaling is not None:
            rope_parameters = normalize_rope_scaling(config, rope_scaling)
            apply_rope_parameters(config, rope_parameters)
        check_parallel_config(tensor_parallel_size, config, launcher_world())  # torchrun: one engine per rank
        if fast_inference:
            _check_engine_config(config)
            check_checkpoint_complete(model_name, config)
        max_seq_length = cap_max_seq_length(max_seq_length, *position_limit(config))
        check_model_dims(precision, config)
        warn_cpu_fallback(precision, str(torch_dtype).removeprefix("torch."))
        tokenizer = AutoTokenizer.from_pretrained(model_name, token=token, revision=revision,
                                                  trust_remote_code=trust_remote_code)
        if fix_tokenizer:
            tokenizer = _fix_tokenizer(tokenizer)
        torch.manual_seed(random_state)

        if fast_inference:
            engine_options = dict(revision=revision, token=token, trust_remote_code=trust_remote_code,
                                  disable_log_stats=disable_log_stats,
                                  rope_parameters=None if rope_parameters is None else json.dumps(
                                      rope_parameters, sort_keys=True))
            with _shutdown_on_failure():
                model = _load_colocated(model_name, config, torch_dtype, max_seq_length, max_lora_rank, max_loras,
                                        gpu_memory_utilization, random_state, float8_kv_cache, tokenizer,
                                        quantization=precision.engine_quantization, standby=cuda and standby,
                                        engine_options=engine_options)
                _finish_model(model, fast_cls, max_seq_length, gc_mode, fast=True)
                if full_finetuning:
                    from trainserve.full_finetune import enable_full_finetuning

                    state = model_api.state_of(model)
                    state.live_base = enable_full_finetuning(model, state.engine)
            return model, tokenizer
        else:
            from transformers import AutoModelForCausalLM

            quant = None
            if precision.hf_bnb_bits is not None:  # no engine: the trainer alone, on bitsandbytes
                from transformers import BitsAndBytesConfig

                quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch_dtype, bnb_4bit_use_double_quant=True)
                         if precision.hf_bnb_bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
            model = AutoModelForCausalLM.from_pretrained(
                model_name, config=config, dtype=torch_dtype, token=token, revision=revision,
                trust_remote_code=trust_remote_code, device_map="cuda" if cuda else None,
                quantization_config=quant)
            resize_for_from_pretrained(model, resize_model_vocab)
            model.requires_grad_(full_finetuning)
            model.__dict__["_trainserve_full_finetuning"] = full_finetuning  # get_peft_model refuses it
        _finish_model(model, fast_cls, max_seq_length, gc_mode, fast=False)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model: Any,
        r: int = 16,
        target_modules: Any = SUPPORTED_TARGETS,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        layers_to_transform: Any = None,
        layers_pattern: Any = None,
        use_gradient_checkpointing: Any = "unsloth",
        random_state: int = 3407,
        max_seq_length: int | None = None,
        use_rslora: bool = False,
        modules_to_save: Any = None,
        init_lora_weights: Any = True,
        loftq_config: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Wrap ``model`` with a PEFT LoRA adapter; with ``fast_inference`` the engine serves it live."""
        from peft import LoraConfig, get_peft_model

        if kwargs:
            raise TypeError(f"get_peft_model got unexpected arguments {sorted(kwargs)}")
        check_peft_model_input(model)
        state = model_api.state_of(model)
        check_peft_arguments(r=r, lora_alpha=lora_alpha, random_state=random_state, use_rslora=use_rslora,
                             max_seq_length=max_seq_length, target_modules=target_modules,
                             modules_to_save=modules_to_save, layers_to_transform=layers_to_transform,
                             loftq_config=loftq_config, num_layers=getattr(model.config, "num_hidden_layers", None))
        if max_seq_length is not None:  # the engine's length, or the positions the model supports
            limit = (state.engine.spec.max_model_len, "the engine's max_model_len") if state is not None else \
                position_limit(model.config)
            max_seq_length = cap_max_seq_length(max_seq_length, *limit)
        gc_mode = normalize_gc_mode(use_gradient_checkpointing)  # before peft changes the model
        if state is not None and r > state.max_lora_rank:
            raise ValueError(f"r={r} exceeds max_lora_rank={state.max_lora_rank} given to "
                             "from_pretrained; raise max_lora_rank there or lower r")
        if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if target_modules == "all-linear":
            target_modules = SUPPORTED_TARGETS
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        target_modules, full_modules = split_targets(target_modules, modules_to_save)
        check_lora_targets(state, target_modules, full_modules, model)
        check_bias(bias, fast=state is not None)
        if full_modules and state is not None:
            refuse_with_engine(full_modules)
        init_lora_weights, loftq = resolve_loftq(model, loftq_config, init_lora_weights, fast=state is not None)
        if init_lora_weights not in (True, False, "gaussian", "loftq"):
            raise NotImplementedError(f"init_lora_weights={init_lora_weights!r} is not supported")
        if hasattr(model, "peft_config"):
            raise ValueError("the model already has a PEFT adapter; call get_peft_model on the base model")

        torch.manual_seed(random_state)
        config = LoraConfig(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
            target_modules=list(target_modules), use_rslora=use_rslora, task_type="CAUSAL_LM",
            layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
            init_lora_weights=init_lora_weights, loftq_config=loftq,
            **lora_config_arguments(model.config, full_modules),
        )
        peft_model = get_peft_model(model, config)
        _setup_gradient_checkpointing(peft_model, gc_mode)
        if max_seq_length is not None:
            peft_model.max_seq_length = max_seq_length
        if state is not None:
            from trainserve.engine.live_adapter import LiveAdapter
            from trainserve.merge_guard import guard_merges

            guard_merges(peft_model)  # the base is the engine's: merging would change what it serves
            state.peft_model = peft_model
            state.live = LiveAdapter(state.engine, peft_model)
            if launcher_world() is not None:  # DDP must not broadcast the engine's base weights
                exclude_frozen_from_ddp(peft_model)
        model_api.attach_api(peft_model, fast=state is not None)
        return peft_model

    @staticmethod
    def for_training(model: Any, use_gradient_checkpointing: bool = True) -> Any:
        """Put the model in training mode (seed API)."""
        model.train()
        return model

    @staticmethod
    def for_inference(model: Any) -> Any:
        """Put the model in evaluation mode (seed API)."""
        model.eval()
        return model


def _check_engine_config(config: Any) -> None:
    """Refuse, before the engine starts, configs that vLLM would reject after loading (leaving
    nothing useful behind) or serve differently from the trainer."""
    check_supported(config)
    kinds = sorted(set(getattr(config, "layer_types", None) or []))
    if len(kinds) > 1:
        raise NotImplementedError(
            f"the model's config mixes attention types per layer ({kinds}: sliding-window attention on some "
            "layers only, e.g. use_sliding_window with max_window_layers < num_hidden_layers); vLLM does not "
            "serve that. Use fast_inference=False or a config with one attention type")


@contextlib.contextmanager
def _shutdown_on_failure() -> Iterator[None]:
    """Stop the engine this load started if the load then fails, so the next load can start one.

    An engine that was already running (reused: the same settings) keeps running: other models
    of this process are built on it.
    """
    from trainserve.engine.launch import current_engine, shutdown_engine

    before = current_engine()
    try:
        yield
    except BaseException:
        started = current_engine()
        if started is not None and started is not before:
            logger.warning("loading failed after the vLLM engine started; shutting the engine down")
            shutdown_engine()
        raise


def _finish_model(model: Any, fast_cls: Any, max_seq_length: int, gc_mode: Any, fast: bool) -> None:
    """Patch the training forward (with ``from_pretrained``'s checkpointing mode, which full
    fine-tuning uses; ``get_peft_model`` sets its own) and bind the trainserve methods."""
    model.max_seq_length = max_seq_length
    fast_cls.patch_model(model, use_gradient_checkpointing=gc_mode)
    model_api.attach_api(model, fast=fast)


def _setup_gradient_checkpointing(peft_model: Any, mode: Any) -> None:
    base = peft_model.get_base_model()
    get_fast_model_class(base.config.model_type).patch_model(base, use_gradient_checkpointing=mode)


def _load_colocated(model_name: str, config: Any, dtype: torch.dtype, max_seq_length: int, max_lora_rank: int,
                    max_loras: int, gpu_memory_utilization: float, seed: int, float8_kv_cache: bool,
                    tokenizer: Any, quantization: str | None = None, standby: bool = False,
                    engine_options: dict[str, Any] | None = None) -> Any:
    from trainserve.engine.launch import EngineSpec, round_lora_rank, start_engine
    from trainserve.engine.lora_kernel_configs import folder_for
    from trainserve.engine.standby import install_trainer_hook
    from trainserve.weights import build_shared_model

    spec = EngineSpec(
        model_path=model_name,
        architecture=ARCHITECTURES[config.model_type],
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=max_seq_length,
        max_lora_rank=round_lora_rank(max_lora_rank),
        max_loras=max_loras,
        gpu_memory_utilization=gpu_memory_utilization,
        quantization=quantization,
        seed=seed,
        kv_cache_dtype="fp8" if float8_kv_cache else "auto",
        enable_sleep_mode=standby,
        lora_kernel_configs=folder_for(config.hidden_size, round_lora_rank(max_lora_rank)),
        **(engine_options or {}),
    )
    engine = start_engine(spec)
    if engine.adapters is None:
        engine.adapters = AdapterRegistry(engine, config)
    model = build_shared_model(engine.model, config, dtype)
    engine.standby.check_weights_outside_kv_cache(list(engine.model.parameters()) + list(engine.model.buffers()))
    install_trainer_hook(model, engine.standby)
    model.__dict__["_trainserve"] = model_api.ModelState(
        engine=engine, config=config, registry=engine.adapters, tokenizer=tokenizer, max_lora_rank=max_lora_rank)
    return model
