"""Tuned launch configurations for vLLM's LoRA (punica) kernels, used only where they were measured.

Why: in a GRPO rollout the LoRA shrink/expand kernels are a quarter of the GPU time of a decode
step (7B, batch 64, FP8 base), and vLLM's default configurations are not tuned for one adapter
at that batch. ``scripts/tune_lora_kernels.py`` found configurations that cut those kernels from
1.40 to 1.14 ms per step on an H200; in one call series (2026-12-01, 7B FP8 GRPO, two runs each)
rollouts took 1.47-1.50 s with them against 1.54 s without.

How: vLLM reads tuned configurations from ``VLLM_TUNED_CONFIG_FOLDER`` (files named after the
GPU, ``<GPU>_SHRINK.json`` / ``<GPU>_EXPAND_TRUE.json``), and picks the *nearest* entry when a
batch size or layer width was not tuned. So the shipped files hold the tuned entries at batch 64
and vLLM 0.26's own defaults at every other batch size, and the folder is set only for the GPU
and model width the tuning ran on: anything else keeps vLLM's defaults. A folder the user set
stays; ``TRAINSERVE_LORA_KERNEL_CONFIGS=0`` turns this off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger("trainserve")

FOLDER = Path(__file__).with_name("lora_configs")
#: GPU name as vLLM spells it in file names → (hidden size, LoRA rank) the files were tuned for
TUNED: dict[str, tuple[int, int]] = {"NVIDIA_H200": (3584, 16)}
ENV = "VLLM_TUNED_CONFIG_FOLDER"


def vllm_gpu_name(device_name: str) -> str:
    """The device name as vLLM puts it in config file names."""
    return device_name.replace(" ", "_").replace("-", "_")


def tuned_folder(device_name: str | None, hidden_size: int, max_lora_rank: int) -> str | None:
    """The shipped folder when its configurations were tuned for this GPU, width and rank, else None."""
    if device_name is None or os.environ.get("TRAINSERVE_LORA_KERNEL_CONFIGS", "1") in ("0", "false", "False"):
        return None
    shape = TUNED.get(vllm_gpu_name(device_name))
    if shape != (hidden_size, max_lora_rank):
        return None
    return str(FOLDER)


def apply(folder: str | None) -> str | None:
    """Point vLLM at ``folder`` (before the engine starts) unless the user chose a folder; returns
    the folder vLLM will read (None: its defaults)."""
    if folder is None or os.environ.get(ENV):
        return os.environ.get(ENV) or None
    os.environ[ENV] = folder
    logger.info("vLLM LoRA kernels: tuned configurations from %s", folder)
    return folder
