"""Everything trainserve touches inside vLLM that is not public API, in one place.

Public vLLM API (``LLM``, ``LLMEngine.add_request/step/add_lora/pin_lora``, ``LoRARequest``,
``SamplingParams``, ``ModelRegistry``) is used elsewhere. This module holds the rest:

* the registered subclass that keeps CPU linear weights in their plain layout (vLLM repacks
  them for oneDNN otherwise, leaving ``layer.weight`` empty, and there would be nothing to share);
* the path from an in-process ``LLM`` to its worker's LoRA model manager and slot table;
* the layout of the per-layer LoRA slot tensors (``lora_a_stacked``/``lora_b_stacked``).

``tests/test_vllm_compat.py`` checks each of these against the installed vLLM and fails with
:class:`VLLMInternalsChanged` naming what moved.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class VLLMInternalsChanged(RuntimeError):
    """The installed vLLM no longer has an internal that trainserve relies on."""


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def _fail(what: str) -> VLLMInternalsChanged:
    return VLLMInternalsChanged(
        f"vLLM {_vllm_version()}: {what}. trainserve.engine.vllm_compat must be updated for this release."
    )


_ENGINE_CLASSES = {
    "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2:Qwen2ForCausalLM",
    "LlamaForCausalLM": "vllm.model_executor.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "vllm.model_executor.models.qwen3:Qwen3ForCausalLM",
    "MistralForCausalLM": "vllm.model_executor.models.mistral:MistralForCausalLM",
}


def register_shared_weight_architecture(architecture: str) -> str:
    """Register ``Trainserve<architecture>`` with vLLM and return its name.

    The subclass marks every linear layer with ``_cpu_skip_gemm_dispatch`` so that on CPU vLLM
    keeps ``layer.weight`` as a plain ``(out, in)`` tensor the trainer can view (on GPU the flag
    is never read). Registering is idempotent.
    """
    from vllm import ModelRegistry
    from vllm.model_executor.layers.linear import LinearBase

    name = f"Trainserve{architecture}"
    if name in ModelRegistry.get_supported_archs():
        return name
    if architecture not in _ENGINE_CLASSES:
        raise NotImplementedError(f"no shared-weight engine class for architecture {architecture!r}")
    module_name, class_name = _ENGINE_CLASSES[architecture].split(":")
    try:
        base_cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise _fail(f"{_ENGINE_CLASSES[architecture]} is gone") from exc

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        base_cls.__init__(self, vllm_config=vllm_config, prefix=prefix)
        for module in self.modules():
            if isinstance(module, LinearBase):
                module._cpu_skip_gemm_dispatch = True

    subclass = type(name, (base_cls,), {"__init__": __init__, "__module__": __name__})
    ModelRegistry.register_model(name, subclass)
    return name


def read_head_weight_live(model: nn.Module) -> bool:
    """Make the engine's logits read ``lm_head.weight`` itself at every call; True if it did not.

    On CPU vLLM prepares the ``lm_head`` (or tied embedding) GEMM once at load (oneDNN/SGL pack a
    copy of the weight into ``layer.cpu_linear``): a weight changed in place afterwards (full
    fine-tuning) would still give the checkpoint's logits. ``torch.nn.functional.linear`` is what vLLM
    itself uses for layers marked ``_cpu_skip_gemm_dispatch``. On GPU the weight is read directly.
    """
    head = getattr(model, "lm_head", None)
    if head is None:
        raise _fail("the engine model has no lm_head")
    if not hasattr(head, "cpu_linear") or head.cpu_linear is torch.nn.functional.linear:
        return False
    head.cpu_linear = torch.nn.functional.linear
    return True


def engine_model(llm: Any) -> nn.Module:
    """The engine's ``torch.nn.Module`` (in-process engine only)."""
    models = llm.apply_model(lambda m: m)
    if not models or not isinstance(models[0], nn.Module):
        raise _fail("LLM.apply_model did not return the in-process model")
    return models[0]


def _driver_worker(llm: Any) -> Any:
    executor = getattr(llm.llm_engine, "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    if worker is None:
        raise _fail("llm.llm_engine.model_executor.driver_worker is missing (is the engine in-process?)")
    return getattr(worker, "worker", worker)  # WorkerWrapperBase wraps the real worker


def lora_model_manager(llm: Any) -> Any:
    """The worker's ``LoRAModelManager`` (owner of the slot table ``lora_index_to_id``)."""
    runner = getattr(_driver_worker(llm), "model_runner", None)
    worker_manager = getattr(runner, "lora_manager", None)
    if worker_manager is None:
        raise _fail("the model runner has no lora_manager (was the engine started with enable_lora=True?)")
    manager = getattr(worker_manager, "_adapter_manager", None)
    if manager is None or not hasattr(manager, "lora_index_to_id"):
        raise _fail("lora_manager._adapter_manager.lora_index_to_id is missing")
    return manager


def lora_slot(manager: Any, lora_int_id: int) -> int | None:
    """The slot index that holds adapter ``lora_int_id``, or None when it is not active."""
    try:
        return manager.lora_index_to_id.index(lora_int_id)
    except ValueError:
        return None


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every LoRA-wrapped layer; names as in the engine (fused)."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_a_stacked") and hasattr(module, "lora_b_stacked"):
            yield name, module


def unwrap_lora_layer(module: nn.Module) -> nn.Module:
    """The plain linear layer inside a ``...WithLoRA`` wrapper (or the module itself)."""
    return getattr(module, "base_layer", module)


def slot_tensors(layer: nn.Module, slot: int, sub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(A, B)`` of one slot of one sub-projection: A is ``(max_rank, in)``, B ``(out, max_rank)``.

    ``sub`` indexes the fused sub-projections (q, k, v for ``qkv_proj``; gate, up for
    ``gate_up_proj``; 0 otherwise).
    """
    a_stacked, b_stacked = layer.lora_a_stacked, layer.lora_b_stacked
    if not isinstance(a_stacked, (tuple, list)) or sub >= len(a_stacked):
        raise _fail(f"{type(layer).__name__}.lora_a_stacked is not a tuple with sub-projection {sub}")
    a, b = a_stacked[sub], b_stacked[sub]
    if a.ndim != 4 or b.ndim != 4:
        raise _fail(f"lora stacked tensors are {a.ndim}-d/{b.ndim}-d, expected (slots, 1, rank, in)")
    return a[slot, 0], b[slot, 0]


def render_prompts(llm: Any, prompts: list[Any]) -> list[Any]:
    """Turn str / ``TokensPrompt`` prompts into engine inputs the way ``LLM.generate`` does.

    vLLM ≥ 0.30 renders prompts (tokenisation, arrival time) before ``LLMEngine.add_request``
    and deprecates raw prompts there; older releases take raw prompts directly.
    """
    preprocess = getattr(llm, "_preprocess_cmpl", None)
    if preprocess is None:
        return list(prompts)
    return list(preprocess(prompts))


def _cumem_allocator() -> Any:
    try:
        from vllm.device_allocator.cumem import CuMemAllocator
    except ImportError as exc:
        raise _fail("vllm.device_allocator.cumem.CuMemAllocator is gone") from exc
    return CuMemAllocator.get_instance()


def cumem_bytes_in_use() -> int:
    """Bytes still allocated through vLLM's sleep-mode allocator (0 when it was never used).

    vLLM allows one sleep-mode engine per process and refuses to start another while memory of
    an earlier one is still allocated there (e.g. tensors a dropped model still references).
    """
    try:
        from vllm.device_allocator.cumem import CuMemAllocator
    except Exception:  # noqa: BLE001 - no CUDA build of vLLM: no sleep-mode allocator
        return 0
    instance = getattr(CuMemAllocator, "instance", None)
    if instance is None:
        return 0
    try:
        return int(instance.get_current_usage())
    except AttributeError as exc:
        raise _fail("CuMemAllocator.get_current_usage is gone") from exc


def kv_cache_ranges() -> list[tuple[int, int]]:
    """``[start, end)`` device addresses of the sleep-mode allocator's ``kv_cache``-tagged allocations."""
    try:
        from vllm.device_allocator.cumem import CuMemAllocator
    except Exception:  # noqa: BLE001 - no CUDA build of vLLM: no sleep-mode allocator
        return []
    instance = getattr(CuMemAllocator, "instance", None)
    if instance is None:
        return []
    try:
        return [(ptr, ptr + int(data.handle[1])) for ptr, data in instance.pointer_to_data.items()
                if data.tag == "kv_cache"]
    except AttributeError as exc:
        raise _fail("CuMemAllocator.pointer_to_data entries lost .tag/.handle") from exc


def release_cumem_pools() -> None:
    """Drop the sleep-mode allocator's kept-alive memory pools (after an engine is shut down)."""
    try:
        from vllm.device_allocator.cumem import CuMemAllocator
    except Exception:  # noqa: BLE001 - no CUDA build of vLLM: nothing to release
        return
    instance = getattr(CuMemAllocator, "instance", None)
    if instance is not None and hasattr(instance, "release_pools"):
        instance.release_pools()


def release_kv_cache() -> int:
    """Unmap the physical memory behind every ``kv_cache``-tagged allocation; return bytes freed.

    Weights stay mapped (the trainer views them). Needs ``enable_sleep_mode=True``. The virtual
    addresses stay reserved, so CUDA graphs that captured them remain valid after
    :func:`restore_kv_cache`.
    """
    from vllm.device_allocator.cumem import unmap_and_release

    freed = 0
    for data in _cumem_allocator().pointer_to_data.values():
        if data.tag == "kv_cache" and not getattr(data, "is_asleep", False):
            unmap_and_release(data.handle)
            data.is_asleep = True
            freed += data.handle[1]
    return freed


def restore_kv_cache(llm: Any) -> None:
    """Map fresh memory behind the KV cache again (content is gone: the prefix cache is reset)."""
    import torch

    torch.cuda.empty_cache()  # hand cached blocks back so the driver can map them for the KV cache
    # The worker's wake_up maps the tagged allocations and runs the runner's post-KV-wake hook; the
    # executor-level wake_up would refuse, as the engine never went through its own sleep().
    llm.collective_rpc("wake_up", kwargs={"tags": ["kv_cache"]})
    llm.llm_engine.reset_prefix_cache()


class MarlinRunner:
    """Calls vLLM's Marlin weight-only GEMM for one layer quantised by :mod:`trainserve.engine.quant_method`.

    ``apply_gptq_marlin_linear`` and ``marlin_make_workspace_new`` are vLLM utilities, not public
    API (their arguments changed across releases): keyword arguments, checked by the GPU contract
    test in ``tests/gpu/test_int_engine.py``.
    """

    def __init__(self, layer: nn.Module, fmt: Any):
        try:
            from vllm.model_executor.layers.quantization.utils import marlin_utils
            from vllm.scalar_type import scalar_types
        except ImportError as exc:
            raise _fail("vllm.model_executor.layers.quantization.utils.marlin_utils is gone") from exc
        for name in ("apply_gptq_marlin_linear", "marlin_make_workspace_new", "marlin_make_empty_g_idx"):
            if not hasattr(marlin_utils, name):
                raise _fail(f"marlin_utils.{name} is gone")
        self._apply = marlin_utils.apply_gptq_marlin_linear
        device = layer.qweight.device
        self.wtype = (scalar_types.uint4 if fmt.zero_point else
                      scalar_types.uint4b8 if fmt.bits == 4 else scalar_types.uint8b128)
        self.workspace = marlin_utils.marlin_make_workspace_new(device)
        self.empty = marlin_utils.marlin_make_empty_g_idx(device)
        self.n, self.k = layer.trainserve_shape

    def __call__(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
        # The bias is added here, not by the kernel: Marlin expects it permuted like the scales, and
        # the trainer views the engine's bias in its natural order.
        out = self._apply(
            input=x, weight=qweight, weight_scale=scales, weight_zp=qzeros, g_idx=self.empty,
            g_idx_sort_indices=self.empty, workspace=self.workspace, wtype=self.wtype,
            output_size_per_partition=self.n, input_size_per_partition=self.k, is_k_full=True, bias=None)
        return out if bias is None else out.add_(bias)


class MacheteRunner:
    """vLLM's Machete weight-only GEMM (Hopper ``wgmma``) for trainserve's 4-bit asymmetric format.

    ``machete_prepack_B``/``machete_mm`` are vLLM custom ops (``vllm._custom_ops``), used the way
    vLLM's own ``MacheteLinearKernel`` uses them: weights GPTQ-packed along K and prepacked once,
    natural-order ``(K // group, N)`` scales, zero points pre-multiplied (``-scale * zero``).
    The prepacked layout is learnt from the packer (:mod:`trainserve.kernels.machete_layout`) and
    checked by ``tests/gpu/test_machete_gpu.py``.
    """

    def __init__(self, dtype: torch.dtype):
        try:
            from vllm import _custom_ops as ops
            from vllm.scalar_type import scalar_types
        except ImportError as exc:
            raise _fail("vllm._custom_ops or vllm.scalar_type is gone") from exc
        for name in ("machete_mm", "machete_prepack_B"):
            if not hasattr(ops, name):
                raise _fail(f"vllm._custom_ops.{name} is gone")
        self._ops, self.wtype, self.dtype = ops, scalar_types.uint4, dtype

    def prepack(self, words_kn: torch.Tensor) -> torch.Tensor:
        """GPTQ-packed ``(K // 8, N)`` int32 → Machete's prepacked tensor (same size)."""
        return self._ops.machete_prepack_B(words_kn.t().contiguous().t(), a_type=self.dtype, b_type=self.wtype,
                                           group_scales_type=self.dtype)

    def __call__(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zf: torch.Tensor,
                 group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out = self._ops.machete_mm(a=x2, b_q=qweight, b_type=self.wtype, b_group_zeros=zf, b_group_scales=scales,
                                   b_group_size=group_size)
        if bias is not None:
            out.add_(bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def machete_unsupported(k: int, n: int, group_size: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why Machete cannot run this layer here (None when it can)."""
    if device.type != "cuda":
        return "not a CUDA device"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return "Machete needs compute capability 9.0 (Hopper)"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"Machete needs bf16/fp16 activations, not {dtype}"
    if not hasattr(torch.ops._C, "machete_mm"):
        return "this vLLM build has no Machete kernels"
    try:
        from vllm.model_executor.layers.quantization.utils.machete_utils import (
            check_machete_supports_shape,
            query_machete_supported_group_sizes,
        )
    except ImportError:
        return "vllm...machete_utils is gone"
    if group_size not in query_machete_supported_group_sizes(dtype):
        return f"group size {group_size} is not supported by Machete"
    ok, why = check_machete_supports_shape(k, n)
    return None if ok else why


_MACHETE_LAYOUTS: dict[tuple[str, torch.dtype], Any] = {}


def machete_layout(runner: MacheteRunner, device: torch.device) -> Any:
    """The :class:`~trainserve.kernels.machete_layout.MacheteLayout` of this vLLM build (learnt once)."""
    from trainserve.kernels.machete_layout import learn_layout

    key = (str(device), runner.dtype)
    if key not in _MACHETE_LAYOUTS:
        _MACHETE_LAYOUTS[key] = learn_layout(runner.prepack, device)
    return _MACHETE_LAYOUTS[key]


def reset_prefix_cache(llm: Any, running: bool = False) -> bool:
    """Drop vLLM's prefix cache; with ``running=True`` also preempt running requests so their KV is
    recomputed (``reset_running_requests``: vLLM ≥ 0.26; checked by the contract test)."""
    engine = llm.llm_engine
    if running:
        try:
            return bool(engine.reset_prefix_cache(reset_running_requests=True))
        except TypeError as exc:
            raise _fail("LLMEngine.reset_prefix_cache(reset_running_requests=...) is gone") from exc
    return bool(engine.reset_prefix_cache())


def logprobs_mode(llm: Any) -> str:
    """vLLM's ``model_config.logprobs_mode`` (``raw_logprobs`` = before temperature scaling)."""
    config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    if config is None or not hasattr(config, "logprobs_mode"):
        raise _fail("llm.llm_engine.model_config.logprobs_mode is gone")
    return str(config.logprobs_mode)


def kv_cache_tokens(llm: Any) -> int:
    """Tokens the engine's KV cache holds: ``cache_config.num_gpu_blocks`` × ``block_size``."""
    config = getattr(getattr(getattr(llm, "llm_engine", None), "vllm_config", None), "cache_config", None)
    blocks, size = getattr(config, "num_gpu_blocks", None), getattr(config, "block_size", None)
    if not blocks or not size:
        raise _fail("llm.llm_engine.vllm_config.cache_config.num_gpu_blocks/block_size are gone")
    return int(blocks) * int(size)


def forget_lora_kernel_configs() -> None:
    """Make vLLM read ``VLLM_TUNED_CONFIG_FOLDER`` again for the next engine: its LoRA kernel config
    lookups (``vllm.lora.ops.triton_ops.utils``) are ``lru_cache``-memoised, and a started engine
    freezes vLLM's environment variables (``envs.enable_envs_cache``)."""
    import vllm.envs as envs

    try:
        from vllm.lora.ops.triton_ops import utils
    except ImportError:  # a build without the LoRA Triton ops: nothing reads the folder
        return
    if hasattr(envs, "disable_envs_cache"):
        envs.disable_envs_cache()
    for lookup in (utils.load_lora_op_config, utils.get_lora_op_configs):
        lookup.cache_clear()
