"""``FastLanguageModel``: the Unsloth-compatible entry point (``from_pretrained``, ``get_peft_model``)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from trainserve import model_api
from trainserve.adapters import SUPPORTED_TARGETS, AdapterRegistry

logger = logging.getLogger("trainserve")

# model_type → transformers architecture served by the shared-weight engine path
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}

# Seed arguments this release accepts only at their default value.
_DEFAULT_ONLY = {
    "resize_model_vocab": None, "offload_embedding": False, "float32_mixed_precision": None,
    "qat_scheme": None, "load_in_fp8": False, "unsloth_tiled_mlp": False, "use_exact_model_name": False,
}
_4BIT_WARNED = False


def _fast_model_class(model_type: str) -> Any:
    from trainserve.fast_llama import get_fast_model_class

    return get_fast_model_class(model_type)


def _reject_unsupported(kwargs: dict[str, Any]) -> None:
    for name, default in _DEFAULT_ONLY.items():
        value = kwargs.pop(name, default)
        if value != default:
            raise NotImplementedError(f"{name}={value!r} is not supported by trainserve yet")
    if kwargs:
        raise TypeError(f"from_pretrained got unexpected arguments {sorted(kwargs)}")


def _resolve_dtype(dtype: Any, cuda: bool) -> torch.dtype:
    if dtype is None:
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU: fp32 trains and serves faster and exactly on CPUs without AMX
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    return dtype


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
        load_in_4bit: bool = True,
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
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """Return ``(model, tokenizer)``. With ``fast_inference=True`` a colocated vLLM engine owns the
        base weights and the model's parameters are views of them; ``model.fast_generate`` generates.

        ``max_loras``: engine LoRA slots for saved adapters (``load_lora``), besides the two that hold
        the live adapter; more slots let one batch mix more saved adapters but slow vLLM's LoRA
        kernels a little. ``standby`` (CUDA): free the KV cache while the trainer runs."""
        from transformers import AutoConfig, AutoTokenizer

        global _4BIT_WARNED
        _reject_unsupported(kwargs)
        cuda = torch.cuda.is_available()
        if load_in_8bit:
            raise NotImplementedError("load_in_8bit=True is not supported; use load_in_4bit or 16-bit")
        if load_in_16bit or full_finetuning:
            load_in_4bit = False
        if load_in_4bit and not cuda:
            if not _4BIT_WARNED:
                warnings.warn("load_in_4bit=True needs CUDA; this machine has none, loading 16-bit weights instead",
                              stacklevel=2)
                _4BIT_WARNED = True
            load_in_4bit = False
        if full_finetuning and fast_inference:
            raise NotImplementedError("full_finetuning=True with fast_inference=True is not supported")
        if float8_kv_cache and not cuda:
            raise NotImplementedError("float8_kv_cache=True needs CUDA")
        if device_map not in ("sequential", "auto", None, "cpu", "cuda", "cuda:0", 0, {"": 0}):
            raise NotImplementedError(f"device_map={device_map!r} is not supported (single device only)")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if max_seq_length < 1:
            raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")

        config = AutoConfig.from_pretrained(model_name, token=token, revision=revision,
                                            trust_remote_code=trust_remote_code)
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise NotImplementedError(
                f"model_type {model_type!r} is not supported (supported: {sorted(ARCHITECTURES)})")
        fast_cls = _fast_model_class(model_type)
        if rope_scaling is not None:
            fast_cls.validate_config(config, rope_scaling=rope_scaling)
            if model_type == "qwen2":
                raise ValueError("Qwen2 does not support rope_scaling; leave it None")
            config.rope_scaling = rope_scaling
        if max_seq_length > config.max_position_embeddings and rope_scaling is None:
            warnings.warn(f"max_seq_length={max_seq_length} exceeds the model's max_position_embeddings="
                          f"{config.max_position_embeddings}; using {config.max_position_embeddings}", stacklevel=2)
            max_seq_length = config.max_position_embeddings
        torch_dtype = _resolve_dtype(dtype, cuda)
        tokenizer = AutoTokenizer.from_pretrained(model_name, token=token, revision=revision,
                                                  trust_remote_code=trust_remote_code)
        if fix_tokenizer:
            tokenizer = _fix_tokenizer(tokenizer)
        torch.manual_seed(random_state)

        if fast_inference:
            model = _load_colocated(model_name, config, torch_dtype, max_seq_length, max_lora_rank, max_loras,
                                    gpu_memory_utilization, random_state, float8_kv_cache, tokenizer,
                                    load_in_4bit=load_in_4bit, standby=cuda and standby)
        else:
            from transformers import AutoModelForCausalLM

            quant = None
            if load_in_4bit:
                from transformers import BitsAndBytesConfig

                quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch_dtype, bnb_4bit_use_double_quant=True)
            model = AutoModelForCausalLM.from_pretrained(
                model_name, config=config, dtype=torch_dtype, token=token, revision=revision,
                trust_remote_code=trust_remote_code, device_map="cuda" if cuda else None,
                quantization_config=quant)
            if not full_finetuning:
                model.requires_grad_(False)
        model.max_seq_length = max_seq_length
        model.__dict__["_trainserve_gc"] = use_gradient_checkpointing
        fast_cls.patch_model(model, use_gradient_checkpointing=False)
        model_api.attach_api(model, fast=fast_inference)
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
        state = model_api.state_of(model)
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if state is not None and r > state.max_lora_rank:
            raise ValueError(f"r={r} exceeds max_lora_rank={state.max_lora_rank} given to "
                             "from_pretrained; raise max_lora_rank there or lower r")
        if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if target_modules == "all-linear":
            target_modules = SUPPORTED_TARGETS
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        unknown = [t for t in target_modules if t not in SUPPORTED_TARGETS]
        if unknown or not target_modules:
            raise ValueError(
                f"unknown target modules {unknown or target_modules}; choose from {list(SUPPORTED_TARGETS)}")
        if bias != "none":
            raise NotImplementedError(f"bias={bias!r} is not supported; use bias='none'")
        if modules_to_save:
            raise NotImplementedError(f"modules_to_save={modules_to_save!r} is not supported yet")
        if loftq_config:
            raise NotImplementedError("loftq_config is not supported")
        if init_lora_weights not in (True, False, "gaussian"):
            raise NotImplementedError(f"init_lora_weights={init_lora_weights!r} is not supported")
        if hasattr(model, "peft_config"):
            raise ValueError("the model already has a PEFT adapter; call get_peft_model on the base model")

        torch.manual_seed(random_state)
        config = LoraConfig(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
            target_modules=list(target_modules), use_rslora=use_rslora, task_type="CAUSAL_LM",
            layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
            init_lora_weights=init_lora_weights,
        )
        peft_model = get_peft_model(model, config)
        _setup_gradient_checkpointing(peft_model, use_gradient_checkpointing)
        if max_seq_length is not None:
            peft_model.max_seq_length = max_seq_length
        if state is not None:
            from trainserve.engine.live_adapter import LiveAdapter

            state.peft_model = peft_model
            state.live = LiveAdapter(state.engine, peft_model)
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


def _setup_gradient_checkpointing(peft_model: Any, mode: Any) -> None:
    if mode not in (True, False, "unsloth"):
        raise ValueError(f"use_gradient_checkpointing must be True, False or 'unsloth', got {mode!r}")
    base = peft_model.get_base_model()
    _fast_model_class(base.config.model_type).patch_model(base, use_gradient_checkpointing=mode)


def _load_colocated(model_name: str, config: Any, dtype: torch.dtype, max_seq_length: int, max_lora_rank: int,
                    max_loras: int, gpu_memory_utilization: float, seed: int, float8_kv_cache: bool,
                    tokenizer: Any, load_in_4bit: bool = False, standby: bool = False) -> Any:
    from trainserve.engine.launch import EngineSpec, round_lora_rank, start_engine
    from trainserve.weights import build_shared_model

    spec = EngineSpec(
        model_path=model_name,
        architecture=ARCHITECTURES[config.model_type],
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=max_seq_length,
        max_lora_rank=round_lora_rank(max_lora_rank),
        max_loras=max_loras,
        gpu_memory_utilization=gpu_memory_utilization,
        quantization="bitsandbytes" if load_in_4bit else None,
        seed=seed,
        kv_cache_dtype="fp8" if float8_kv_cache else "auto",
        enable_sleep_mode=standby,
    )
    engine = start_engine(spec)
    if engine.adapters is None:
        engine.adapters = AdapterRegistry(engine, config)
    model = build_shared_model(engine.model, config, dtype)
    model.__dict__["_trainserve"] = model_api.ModelState(
        engine=engine, config=config, registry=engine.adapters, tokenizer=tokenizer, max_lora_rank=max_lora_rank)
    return model
