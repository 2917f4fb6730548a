"""Start (or reuse) the process's one vLLM engine, configured for colocated training."""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any

from trainserve._env import apply_env_defaults, require_inprocess_engine
from trainserve.engine import lora_kernel_configs
from trainserve.engine.loop import EngineLoop

logger = logging.getLogger("trainserve")

# vLLM sizes LoRA slots for one of these ranks; a requested max_lora_rank is rounded up.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Two slots, pinned, hold the live adapter (double-buffered: one may serve requests in flight
# while the next version is written into the other). Ids far from those load_lora hands out.
LIVE_LORA_IDS = (1_000_000_001, 1_000_000_002)


@dataclass(frozen=True)
class EngineSpec:
    """What identifies an engine: the same spec reuses the running engine."""

    model_path: str
    architecture: str
    dtype: str
    max_model_len: int
    max_lora_rank: int
    max_loras: int
    gpu_memory_utilization: float
    quantization: str | None
    seed: int
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    kv_cache_dtype: str = "auto"
    enable_sleep_mode: bool = False  # GPU: lets the KV cache stand by while the trainer runs
    # GPU: CUDA graphs per number of active adapters, so one adapter (the live one) runs vLLM's
    # LoRA kernels over one slot, not over every slot.
    specialize_active_lora: bool = False
    # Hub access, passed to vLLM as given to from_pretrained so both sides load the same files.
    revision: str | None = None
    trust_remote_code: bool = False
    disable_log_stats: bool = True
    # RoPE parameters (JSON of a transformers-5 ``rope_parameters`` dict) given to vLLM as an
    # ``hf_overrides`` entry: the trainer's config gets the very same dict.
    rope_parameters: str | None = None
    # Folder of tuned LoRA kernel configurations trainserve chose for vLLM (``lora_kernel_configs``;
    # None: vLLM's defaults, or a folder the user set in VLLM_TUNED_CONFIG_FOLDER)
    lora_kernel_configs: str | None = None
    # A secret: kept out of repr, of comparisons (it does not change what is loaded) and of errors.
    token: str | None = field(default=None, repr=False, compare=False)

    def public_fields(self) -> dict[str, Any]:
        """The spec's fields without secrets (for messages and logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.repr}


class Engine:
    """A started vLLM ``LLM`` with its loop; created by :func:`start_engine`."""

    def __init__(self, spec: EngineSpec, llm: Any, start_seconds: float):
        from trainserve.engine import vllm_compat

        self.spec = spec
        self.llm = llm
        self.loop = EngineLoop(llm)
        self.start_seconds = start_seconds
        self.model = vllm_compat.engine_model(llm)
        self.live_owner: object | None = None  # the LiveAdapter that holds the live slots
        self.adapters: Any = None  # the AdapterRegistry: saved-adapter ids are unique per engine
        # Set by full fine-tuning (trainserve.full_finetune): the weights are no longer the checkpoint's.
        self.base_modified = False
        from trainserve.engine.standby import KVStandby

        self.standby = KVStandby(self)

    @property
    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def lora_manager(self) -> Any:
        from trainserve.engine import vllm_compat

        return vllm_compat.lora_model_manager(self.llm)


_CURRENT: Engine | None = None


def current_engine() -> Engine | None:
    """The engine of this process, if one is running."""
    return _CURRENT


def round_lora_rank(rank: int) -> int:
    """The smallest rank vLLM can allocate slots for that is ≥ ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"max_lora_rank={rank} exceeds vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")


def start_engine(spec: EngineSpec) -> Engine:
    """Start the engine for ``spec``, or return the running one if its spec is the same.

    One engine per process: a different spec while one runs raises; call
    :func:`shutdown_engine` first.
    """
    global _CURRENT
    if _CURRENT is not None:
        if _CURRENT.spec == spec:
            if _CURRENT.base_modified:
                raise RuntimeError(
                    "the running vLLM engine's weights were changed by full fine-tuning "
                    "(full_finetuning=True, fast_inference=True), so they are no longer the checkpoint's; "
                    "call trainserve.shutdown_engine() before loading the model again")
            return _CURRENT
        want = spec.public_fields()
        diff = {k: (v, want[k]) for k, v in _CURRENT.spec.public_fields().items() if want[k] != v}
        raise RuntimeError(
            "trainserve runs one vLLM engine per process and one is already running with other "
            f"settings {diff} (running, requested). Call trainserve.shutdown_engine() first."
        )
    apply_env_defaults()
    require_inprocess_engine()
    from vllm import LLM

    from trainserve.engine import vllm_compat

    arch = vllm_compat.register_shared_weight_architecture(spec.architecture)
    overrides: dict[str, Any] = {"architectures": [arch]}
    if spec.rope_parameters is not None:
        overrides["rope_parameters"] = json.loads(spec.rope_parameters)
    kwargs: dict[str, Any] = dict(
        model=spec.model_path,
        tokenizer=spec.model_path,
        dtype=spec.dtype,
        max_model_len=spec.max_model_len,
        enable_lora=True,
        max_lora_rank=spec.max_lora_rank,
        max_loras=spec.max_loras + len(LIVE_LORA_IDS),
        max_cpu_loras=max(16, spec.max_loras + len(LIVE_LORA_IDS)),
        gpu_memory_utilization=spec.gpu_memory_utilization,
        seed=spec.seed,
        enable_prefix_caching=spec.enable_prefix_caching,
        # TRAINSERVE_ENFORCE_EAGER=1: no torch.compile / CUDA graphs (fast start for GPU tests)
        enforce_eager=spec.enforce_eager or os.environ.get("TRAINSERVE_ENFORCE_EAGER") == "1",
        hf_overrides=overrides,
        kv_cache_dtype=spec.kv_cache_dtype,
        revision=spec.revision,
        tokenizer_revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        disable_log_stats=spec.disable_log_stats,
    )
    if spec.token is not None:
        kwargs["hf_token"] = spec.token
    from trainserve.logs import quiet

    if quiet():  # trainserve.logs.configure_logging(verbose=False): no checkpoint-loading bar
        kwargs["use_tqdm_on_load"] = False
    if spec.quantization:
        if spec.quantization.startswith("trainserve_"):
            from trainserve.engine.quant_method import register

            register(spec.quantization)  # vLLM's public registration API; idempotent
        kwargs["quantization"] = spec.quantization
    sleep_mode = spec.enable_sleep_mode
    if sleep_mode and vllm_compat.cumem_bytes_in_use():
        # vLLM allows one sleep-mode engine per process while memory of an earlier one is alive
        # (a model built on the old engine that is still referenced keeps it): run without standby.
        logger.warning("KV standby is off for this engine: %.1f GB of an earlier engine's memory is still "
                       "allocated (drop models built on it before trainserve.shutdown_engine())",
                       vllm_compat.cumem_bytes_in_use() / 1e9)
        sleep_mode = False
    if sleep_mode:
        kwargs["enable_sleep_mode"] = True
    if spec.specialize_active_lora:
        kwargs["specialize_active_lora"] = True
    from trainserve.distributed import engine_kwargs, keep_launcher_env

    lora_kernel_configs.apply(spec.lora_kernel_configs)

    kwargs.update(engine_kwargs())  # under torchrun: join the launcher's world, vLLM's external launcher
    t0 = time.perf_counter()
    try:
        with keep_launcher_env():
            llm = LLM(**kwargs)
    except BaseException:
        lora_kernel_configs.restore()  # a failed start leaves no engine, and no folder chosen for it
        raise
    _CURRENT = Engine(spec, llm, time.perf_counter() - t0)
    _CURRENT.standby.enabled = sleep_mode
    logger.info("vLLM engine started in %.1f s", _CURRENT.start_seconds)
    return _CURRENT


def shutdown_engine() -> None:
    """Stop this process's engine and free its memory (models built on it stop working)."""
    global _CURRENT
    if _CURRENT is None:
        return
    from trainserve.engine import vllm_compat

    engine, _CURRENT = _CURRENT, None
    lora_kernel_configs.restore()
    engine.loop.stop_background(drain=False)
    try:  # freed KV memory must be mapped again before its allocations can be freed normally
        engine.standby.before_generate()
    except Exception:  # best effort
        logger.debug("standby restore at shutdown raised", exc_info=True)
    try:
        engine.llm.llm_engine.engine_core.shutdown()
    except Exception:  # best effort: the objects are dropped below either way
        logger.debug("engine shutdown raised", exc_info=True)
    del engine
    gc.collect()
    vllm_compat.release_cumem_pools()  # so a later engine may use sleep mode again
    gc.collect()
