"""trainserve's own weight-only integer quantisation for vLLM, registered through vLLM's public API.

Why our own method rather than ``quantization="bitsandbytes"``: vLLM's bitsandbytes path
dequantises every whole weight to bf16 and runs a GEMM on each decode step above one token,
which reads *more* bytes than bf16 (4-bit 7B rollouts ran at half of bf16 speed), and vLLM is
moving bitsandbytes out of tree. This method quantises the 16-bit checkpoint while loading (group
scales, optional integer zero points; :mod:`trainserve.kernels.marlin_layout` says exactly how)
and runs vLLM's Marlin weight-only GEMM on CUDA — CUDA-graph capturable and under vLLM's LoRA
wrappers, which call ``quant_method.apply`` on the base layer. Elsewhere ``apply`` dequantises
with the torch reference (correct, slow: for testing the format end to end on CPU).

The trainer never gets a copy: :mod:`trainserve.weights.marlin_int` views ``qweight``, ``scales``
and ``qzeros`` of each layer. Registered names: ``trainserve_int4`` (4-bit, g64, asymmetric: as
accurate as NF4 with 64-blocks on real-shape layers, see docs) and ``trainserve_int8`` (8-bit,
g128, symmetric).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainserve.kernels.machete_dequant import MacheteTensors
from trainserve.kernels.machete_layout import check_prepacked, quantize_for_machete
from trainserve.kernels.marlin_dequant import dequantize_marlin
from trainserve.kernels.marlin_layout import IntFormat, MarlinTensors, check_shape, quantize_to_marlin

logger = logging.getLogger("trainserve")

FORMATS = {
    "trainserve_int4": IntFormat(bits=4, group_size=64, zero_point=True),
    "trainserve_int8": IntFormat(bits=8, group_size=128, zero_point=False),
}

_REGISTERED: set[str] = set()
_CHECKED_SHAPES: set[tuple[int, int]] = set()


@torch.library.custom_op("trainserve::int_linear_reference", mutates_args=())
def reference_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                     bias: torch.Tensor | None, bits: int, group_size: int, zero_point: bool) -> torch.Tensor:
    """``x @ W.t() + bias`` through the torch reference dequantisation (no CUDA kernel needed).

    A custom op so that vLLM's ``torch.compile`` treats it as one opaque call instead of tracing
    the layout's index tables.
    """
    fmt = IntFormat(bits, group_size, zero_point)
    t = MarlinTensors(qweight, scales, qzeros if qzeros.numel() else None)
    return F.linear(x, dequantize_marlin(t, fmt, x.dtype).t(), bias)


@reference_linear.register_fake
def _(x, qweight, scales, qzeros, bias, bits, group_size, zero_point):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


def layer_tensors(layer: nn.Module) -> MarlinTensors | MacheteTensors:
    """The Marlin or Machete tensors a processed layer holds (plain tensors, same storage)."""
    layout = getattr(layer, "trainserve_machete_layout", None)
    if layout is not None:
        return MacheteTensors(qweight=layer.qweight.data, scales=layer.scales.data, zf=layer.qzeros.data,
                              layout=layout, group_size=layer.trainserve_format.group_size)
    zeros = getattr(layer, "qzeros", None)
    return MarlinTensors(qweight=layer.qweight.data, scales=layer.scales.data,
                         zeros=zeros.data if zeros is not None and zeros.numel() else None)


def layer_format(layer: nn.Module) -> IntFormat | None:
    """The :class:`IntFormat` of an engine linear layer quantised by this method, else None."""
    return getattr(layer, "trainserve_format", None)


def int4_kernel_choice() -> str:
    """``TRAINSERVE_INT4_KERNEL``: ``auto`` (Machete on Hopper where the shape allows, else Marlin),
    ``marlin`` or ``machete`` (an error where it cannot run) — for benchmarks and as an escape hatch."""
    choice = os.environ.get("TRAINSERVE_INT4_KERNEL", "auto").strip().lower()
    if choice not in ("auto", "marlin", "machete"):
        raise ValueError(f"TRAINSERVE_INT4_KERNEL must be auto, marlin or machete, got {choice!r}")
    return choice


def _use_machete(fmt: IntFormat, w: torch.Tensor, partition_sizes: list[int], what: str) -> bool:
    """Machete for 4-bit asymmetric layers on Hopper (Marlin's mma.sync is compute-bound there at
    rollout batch sizes); every shard must be whole 128-column blocks so the trainer can view it."""
    from trainserve.engine import vllm_compat

    choice = int4_kernel_choice()
    if choice == "marlin" or fmt.bits != 4 or not fmt.zero_point:
        return False
    n, k = w.shape
    why = vllm_compat.machete_unsupported(k, n, fmt.group_size, w.dtype, w.device)
    if why is None and any(size % 128 for size in partition_sizes):
        why = f"shards {partition_sizes} are not multiples of 128"
    if why is not None and choice == "machete":
        raise ValueError(f"TRAINSERVE_INT4_KERNEL=machete, but {what} cannot use it: {why}")
    return why is None


def register(name: str) -> str:
    """Register the quantisation config ``name`` (a key of :data:`FORMATS`) with vLLM; idempotent."""
    if name in _REGISTERED:
        return name
    if name not in FORMATS:
        raise ValueError(f"unknown trainserve quantisation {name!r}; choose from {sorted(FORMATS)}")
    from vllm.model_executor.layers.linear import (
        LinearBase,
        LinearMethodBase,
        register_weight_loader_v2_supported_method,
    )
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
    from vllm.model_executor.parameter import ModelWeightParameter
    from vllm.model_executor.utils import set_weight_attrs

    fmt = FORMATS[name]

    class TrainserveIntLinearMethod(LinearMethodBase):
        """Load 16-bit weights, quantise them after loading, GEMM with Marlin (CUDA)."""

        def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                           output_partition_sizes: list[int], input_size: int, output_size: int,
                           params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
            weight_loader = extra_weight_attrs.pop("weight_loader")
            # The 16-bit weight is staged in host memory: vLLM moves it to the GPU for
            # process_weights_after_loading one layer at a time, so the whole 16-bit model is never on
            # the GPU and its freed blocks do not stay cached in the engine's weight memory pool
            # (measured: +16.7 GiB held for the whole run at the 7B shape when loaded on the GPU).
            weight = ModelWeightParameter(
                data=torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype,
                                 device="cpu"),
                input_dim=1, output_dim=0, weight_loader=weight_loader)
            layer.register_parameter("weight", weight)
            set_weight_attrs(weight, extra_weight_attrs)
            layer.trainserve_partition_sizes = list(output_partition_sizes)

        def process_weights_after_loading(self, layer: nn.Module) -> None:
            if getattr(layer, "trainserve_format", None) is not None:
                return  # already processed (vLLM may call this again on reload)
            from trainserve.engine import vllm_compat

            w = layer.weight.data
            n, k = w.shape
            check_shape(fmt, k, n, what=type(layer).__name__)
            for size in layer.trainserve_partition_sizes:
                if size % 64:
                    raise ValueError(f"{type(layer).__name__}: shard of {size} rows is not a multiple of 64")
            if _use_machete(fmt, w, layer.trainserve_partition_sizes, type(layer).__name__):
                self._process_machete(layer, w)
                return
            t = quantize_to_marlin(w, fmt, scale_dtype=w.dtype)
            del layer.weight
            layer.register_parameter("qweight", nn.Parameter(t.qweight, requires_grad=False))
            layer.register_parameter("scales", nn.Parameter(t.scales, requires_grad=False))
            zeros = t.zeros if t.zeros is not None else torch.empty(0, dtype=torch.int32, device=w.device)
            layer.register_parameter("qzeros", nn.Parameter(zeros, requires_grad=False))
            layer.trainserve_format = fmt
            layer.trainserve_shape = (n, k)
            if w.is_cuda:
                layer.trainserve_marlin = vllm_compat.MarlinRunner(layer, fmt)

        def _process_machete(self, layer: nn.Module, w: torch.Tensor) -> None:
            from trainserve.engine import vllm_compat

            n, k = w.shape
            runner = vllm_compat.MacheteRunner(w.dtype)
            layout = vllm_compat.machete_layout(runner, w.device)
            words, scales, zf = quantize_for_machete(w, fmt.group_size, w.dtype)
            del layer.weight
            qweight = runner.prepack(words)
            if (k, n) not in _CHECKED_SHAPES:
                check_prepacked(qweight, words, layout)
                _CHECKED_SHAPES.add((k, n))
            del words
            layer.register_parameter("qweight", nn.Parameter(qweight, requires_grad=False))
            layer.register_parameter("scales", nn.Parameter(scales, requires_grad=False))
            layer.register_parameter("qzeros", nn.Parameter(zf, requires_grad=False))
            layer.trainserve_format = fmt
            layer.trainserve_shape = (n, k)
            layer.trainserve_machete_layout = layout
            layer.trainserve_machete = runner

        def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            machete = getattr(layer, "trainserve_machete", None)
            if machete is not None:
                return machete(x, layer.qweight, layer.scales, layer.qzeros, fmt.group_size, bias)
            runner = getattr(layer, "trainserve_marlin", None)
            if runner is not None:
                return runner(x, layer.qweight, layer.scales, layer.qzeros, bias)
            return reference_linear(x, layer.qweight, layer.scales, layer.qzeros, bias, fmt.bits,
                                    fmt.group_size, fmt.zero_point)

    TrainserveIntLinearMethod.__name__ = TrainserveIntLinearMethod.__qualname__ = (
        f"TrainserveInt{fmt.bits}LinearMethod")
    register_weight_loader_v2_supported_method(TrainserveIntLinearMethod)

    class TrainserveIntConfig(QuantizationConfig):
        """Weight-only integer quantisation of every linear layer (no checkpoint config needed)."""

        @classmethod
        def get_name(cls) -> str:
            return name

        @classmethod
        def get_supported_act_dtypes(cls) -> list[torch.dtype]:
            return [torch.bfloat16, torch.float16, torch.float32]

        @classmethod
        def get_min_capability(cls) -> int:
            return 80  # Marlin: Ampere and newer

        @staticmethod
        def get_config_filenames() -> list[str]:
            return []  # quantised while loading a 16-bit checkpoint

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> TrainserveIntConfig:
            return cls()

        def get_quant_method(self, layer: nn.Module, prefix: str) -> Any:
            if isinstance(layer, LinearBase):
                return TrainserveIntLinearMethod()
            return None

    TrainserveIntConfig.__name__ = TrainserveIntConfig.__qualname__ = f"TrainserveInt{fmt.bits}Config"
    register_quantization_config(name)(TrainserveIntConfig)
    _REGISTERED.add(name)
    return name
