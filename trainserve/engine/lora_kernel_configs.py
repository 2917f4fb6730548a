"""Tuned launch configurations for vLLM's LoRA (punica) kernels, used only where they were measured.

Why: in a GRPO rollout the LoRA shrink/expand kernels are a quarter of the GPU time of a decode
step (7B, batch 64, FP8 base), and vLLM's default configurations are not tuned for one adapter
at that batch. ``scripts/tune_lora_kernels.py`` found configurations that cut those kernels from
1.40 to 1.14 ms per step on an H200; in one call series (2026-12-01, 7B FP8 GRPO, two runs each)
rollouts took 1.47-1.50 s with them against 1.54 s without.

How: vLLM reads tuned configurations from ``VLLM_TUNED_CONFIG_FOLDER`` (files named after the
GPU, ``<GPU>_SHRINK.json`` / ``<GPU>_EXPAND_TRUE.json``), and picks the *nearest* entry when a
batch size or layer width was not tuned. So the shipped files hold the tuned entries at batch 64
and vLLM 0.26's own defaults at the batch sizes around it (``scripts/tune_lora_kernels.py``'s
``PAD_BATCHES``: batches 57-80 get the tuned entry), and the folder is set only for the GPU and model
width the tuning ran on: anything else keeps vLLM's defaults. A folder the user set stays;
``TRAINSERVE_LORA_KERNEL_CONFIGS=0`` turns this off. The folder is taken out of the environment
when the engine stops, so it never outlives the engine it was chosen for.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

logger = logging.getLogger("trainserve")

FOLDER = Path(__file__).with_name("lora_configs")
#: GPU name as vLLM spells it in file names → (hidden size, LoRA rank) the files were tuned for
TUNED: dict[str, tuple[int, int]] = {"NVIDIA_H200": (3584, 16)}
ENV = "VLLM_TUNED_CONFIG_FOLDER"
_SET_BY_US: str | None = None  # the value trainserve put in the environment (None: it put none there)


def vllm_gpu_name(device_name: str) -> str:
    """The device name as vLLM puts it in config file names."""
    return device_name.replace(" ", "_").replace("-", "_")


def enabled() -> bool:
    """``TRAINSERVE_LORA_KERNEL_CONFIGS``: on unless ``0``/``false``/``off``/``no``; any other value
    than those and ``1``/``true``/``on``/``yes`` is refused by name (not read as "on")."""
    value = os.environ.get("TRAINSERVE_LORA_KERNEL_CONFIGS", "1").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("", "1", "true", "on", "yes"):
        return True
    raise ValueError(f"TRAINSERVE_LORA_KERNEL_CONFIGS must be 1/true/on/yes or 0/false/off/no, got {value!r}")


def user_folder() -> str | None:
    """A ``VLLM_TUNED_CONFIG_FOLDER`` someone other than trainserve set."""
    value = os.environ.get(ENV) or None
    return value if value != _SET_BY_US else None


def tuned_folder(device_name: str | None, hidden_size: int, max_lora_rank: int) -> str | None:
    """The shipped folder when its configurations were tuned for this GPU, width and rank and the user
    chose no folder of their own; else None."""
    if device_name is None or not enabled():
        return None
    if user_folder() is not None or TUNED.get(vllm_gpu_name(device_name)) != (hidden_size, max_lora_rank):
        return None
    return str(FOLDER)


def folder_for(hidden_size: int, max_lora_rank: int) -> str | None:
    """:func:`tuned_folder` for the GPU this process's engine will use (``LOCAL_RANK``'s under a
    launcher: the device is selected only later, when the process group starts)."""
    import torch

    if not torch.cuda.is_available():
        return None
    from trainserve.distributed import launcher_world

    world = launcher_world()
    index = world.local_rank if world is not None else torch.cuda.current_device()
    return tuned_folder(torch.cuda.get_device_name(index), hidden_size, max_lora_rank)


def apply(folder: str | None) -> str | None:
    """Before an engine starts: put ``folder`` in vLLM's environment (or take trainserve's earlier
    one out) unless the user chose a folder, and make vLLM read it afresh — its lookups are memoised
    and an engine freezes its environment variables, so a second engine of the process would
    otherwise keep the first one's choice. Returns the folder vLLM will read (None: its defaults)."""
    global _SET_BY_US
    if user_folder() is None:
        if folder is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = folder
            logger.info("vLLM LoRA kernels: tuned configurations from %s", folder)
        _SET_BY_US = folder
    from trainserve.engine import vllm_compat

    vllm_compat.forget_lora_kernel_configs()
    return os.environ.get(ENV) or None


def restore() -> None:
    """After the engine stops: take out the folder trainserve put in the environment."""
    global _SET_BY_US
    if _SET_BY_US is not None and os.environ.get(ENV) == _SET_BY_US:
        os.environ.pop(ENV)
    _SET_BY_US = None


def describe() -> dict[str, str] | None:
    """What vLLM's LoRA kernels read now: the folder and a hash of its config files (for benchmark
    records: which configurations a measured run used); None for vLLM's defaults."""
    folder = os.environ.get(ENV) or None
    if folder is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.json")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {"folder": folder, "sha256": digest.hexdigest()[:16]}
