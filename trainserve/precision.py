"""Which weight format a ``from_pretrained`` call asks for, decided and checked before any work starts.

The seed's flags (``load_in_4bit``, ``load_in_8bit``, ``load_in_16bit``, ``load_in_fp8``,
``full_finetuning``) and trainserve's ``quant_backend`` map to one format for the engine (the
vLLM ``quantization`` it starts with) and one for a trainer without an engine. Conflicting flags,
a format the GPU cannot run and model dimensions the kernels cannot tile are refused here, before
the engine starts — never discovered halfway through a load.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

from trainserve.engine.quant_method import int4_kernel_choice
from trainserve.kernels.marlin_layout import IntFormat, check_shape

QUANT_BACKENDS = ("trainserve", "bitsandbytes")
#: ``TRAINSERVE_EMULATE_QUANT=1``: on a machine without CUDA, run trainserve's integer formats
#: through their torch reference instead of loading 16-bit (slow; to test a format end to end).
EMULATE_ENV = "TRAINSERVE_EMULATE_QUANT"
_WARNED: set[str] = set()


@dataclass(frozen=True)
class Precision:
    """The resolved weight format."""

    label: str  # "16-bit", "int4", "int8", "fp8", "fp8 (block)", "nf4 (bitsandbytes)"
    engine_quantization: str | None = None  # vLLM ``quantization`` for fast_inference=True
    hf_bnb_bits: int | None = None  # bitsandbytes 4/8-bit for fast_inference=False
    cpu_fallback_from: str | None = None  # the quantised format asked for, loaded 16-bit for lack of CUDA


_ENGINE = {
    # FP8, as vLLM's online methods: True is per-channel weight scales with per-token activations
    # (W8A8, the faster GEMM), "block" 128x128 weight blocks with 1x128 activation groups. Both
    # round their GEMM inputs to FP8 in the engine; the trainer rounds them the same way
    # (kernels/fp8_activations.py), so it trains the function the engine samples from.
    "int4": "trainserve_int4", "int8": "trainserve_int8", "fp8": "fp8_per_channel", "fp8 (block)": "fp8_per_block",
    "nf4 (bitsandbytes)": "bitsandbytes",
}
#: short names of the weight formats (CLI ``--weights``, benchmark arms) -> ``from_pretrained`` flags
WEIGHT_FORMAT_FLAGS: dict[str, dict[str, Any]] = {
    "int4": {"load_in_4bit": True},
    "nf4": {"load_in_4bit": True, "quant_backend": "bitsandbytes"},
    "int8": {"load_in_8bit": True},
    "fp8": {"load_in_fp8": True},
    "fp8-block": {"load_in_fp8": "block"},
    "bf16": {"load_in_16bit": True},
}
_INT_FORMATS = {"int4": IntFormat(4, 64, True), "int8": IntFormat(8, 128, False)}


def _asked(load_in_4bit: Any, load_in_8bit: bool, load_in_16bit: bool, load_in_fp8: Any,
           full_finetuning: bool, quant_backend: str) -> str:
    if quant_backend not in QUANT_BACKENDS:
        raise ValueError(f"quant_backend must be one of {QUANT_BACKENDS}, got {quant_backend!r}")
    if not (load_in_fp8 is False or load_in_fp8 is True or load_in_fp8 == "block"):  # 0 and 1 are not bools
        raise ValueError(f"load_in_fp8 must be False, True or 'block', got {load_in_fp8!r}")
    for name, value in (("load_in_4bit", load_in_4bit), ("load_in_8bit", load_in_8bit),
                        ("load_in_16bit", load_in_16bit), ("full_finetuning", full_finetuning)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    explicit = [name for name, on in (("load_in_4bit=True", load_in_4bit is True),
                                      ("load_in_8bit=True", load_in_8bit),
                                      ("load_in_16bit=True", load_in_16bit),
                                      (f"load_in_fp8={load_in_fp8!r}", load_in_fp8 is not False)) if on]
    if len(explicit) > 1:
        raise ValueError(f"{' and '.join(explicit)} ask for different weight formats; pick one")
    quantised = [name for name in explicit if name != "load_in_16bit=True"]
    if full_finetuning and quantised:
        raise ValueError(f"full_finetuning=True trains 16-bit weights; it cannot be combined with {quantised[0]}")
    sixteen = load_in_16bit or full_finetuning or load_in_4bit is False and not (load_in_8bit or load_in_fp8)
    if quant_backend == "bitsandbytes" and (load_in_8bit or load_in_fp8 is not False or sixteen):
        chosen = explicit[0] if explicit else ("full_finetuning=True" if full_finetuning else "load_in_4bit=False")
        raise ValueError(f"quant_backend='bitsandbytes' only applies to 4-bit loads (load_in_4bit=True or the "
                         f"default); it cannot be combined with {chosen}")
    if sixteen:
        return "16-bit"
    if load_in_8bit:
        return "int8"
    if load_in_fp8 is not False:
        return "fp8 (block)" if load_in_fp8 == "block" else "fp8"
    return "nf4 (bitsandbytes)" if quant_backend == "bitsandbytes" else "int4"


def resolve_precision(*, load_in_4bit: Any, load_in_8bit: bool, load_in_16bit: bool, load_in_fp8: Any,
                      full_finetuning: bool, quant_backend: str, fast_inference: bool, cuda: bool) -> Precision:
    """Decide the format (``load_in_4bit=None`` means the default: 4-bit unless another is asked).

    Without CUDA, quantised formats load the compute dtype's weights instead, recorded in
    ``cpu_fallback_from`` for :func:`warn_cpu_fallback` (trainserve's integer formats run on their
    torch reference when ``TRAINSERVE_EMULATE_QUANT=1``).
    """
    label = _asked(load_in_4bit, load_in_8bit, load_in_16bit, load_in_fp8, full_finetuning, quant_backend)
    if label == "16-bit":
        return Precision("16-bit")
    if not fast_inference and label.startswith("fp8"):
        raise NotImplementedError("load_in_fp8 needs fast_inference=True: the engine quantises the weights "
                                  "and the trainer views them")
    if not cuda:
        if label in _INT_FORMATS and fast_inference and os.environ.get(EMULATE_ENV, "0") == "1":
            return Precision(label, engine_quantization=_ENGINE[label])
        return Precision("16-bit", cpu_fallback_from=label)
    _check_gpu(label)
    if not fast_inference:
        if label in ("int4", "nf4 (bitsandbytes)"):
            return Precision(label, hf_bnb_bits=4)
        return Precision(label, hf_bnb_bits=8)
    return Precision(label, engine_quantization=_ENGINE[label])


def warn_cpu_fallback(precision: Precision, dtype_name: str) -> None:
    """Warn, once per format and process, that a quantised format loads ``dtype_name`` weights on a
    machine without CUDA. Called once the load has passed its checks (config read, arguments valid),
    so a load that fails early does not use up the one warning the next load should give."""
    label = precision.cpu_fallback_from
    if label is not None and label not in _WARNED:
        warnings.warn(f"{label} weights need CUDA; this machine has none, loading {dtype_name} weights instead",
                      stacklevel=3)
        _WARNED.add(label)


def _check_gpu(label: str) -> None:
    import torch

    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if label.startswith("fp8") and (major, minor) < (8, 9):
        raise NotImplementedError(f"load_in_fp8 needs an FP8-capable GPU (Ada or Hopper, compute capability "
                                  f"8.9+); {name} is {major}.{minor}. Use load_in_4bit or load_in_8bit.")
    if label in _INT_FORMATS and major < 8:
        raise NotImplementedError(f"trainserve's {label} engine format needs compute capability 8.0+ (Marlin); "
                                  f"{name} is {major}.{minor}. Use quant_backend='bitsandbytes' or 16-bit.")


def check_model_dims(precision: Precision, config: Any) -> None:
    """Refuse a model whose linear layers the chosen engine format cannot tile (before the engine starts)."""
    fmt = _INT_FORMATS.get(precision.label)
    if precision.engine_quantization is None or (fmt is None and not precision.label.startswith("fp8")):
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layers = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    forced_machete = fmt is not None and fmt.bits == 4 and int4_kernel_choice() == "machete"
    for name, (k, n) in layers.items():
        if fmt is None and precision.label == "fp8":
            if k % 16 or n % 16:
                raise ValueError(f"{name} of this model ({n} outputs x {k} inputs) cannot use FP8 per-channel "
                                 "GEMMs (both must be multiples of 16); use load_in_8bit or load_in_4bit")
            continue
        if fmt is None:
            if k % 128 or n % 128:
                raise ValueError(f"{name} of this model ({n} outputs x {k} inputs) cannot use FP8 128x128 block "
                                 "scales (both must be multiples of 128); use load_in_8bit or load_in_4bit")
            continue
        check_shape(fmt, k, n, what=f"{name} of this model ({precision.label})")
        if forced_machete and (k % 64 or n % 128):
            raise ValueError(f"TRAINSERVE_INT4_KERNEL=machete, but {name} of this model ({n} outputs x {k} inputs) "
                             "cannot use Machete (outputs must be multiples of 128, inputs of 64); unset it to "
                             "let trainserve use Marlin for this model")
