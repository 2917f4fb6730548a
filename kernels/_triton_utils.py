"""Shared helpers for the kernels: Triton availability and the dispatch rule.

Every public kernel entry point uses Triton only when :func:`use_triton` says so for its input
(a CUDA tensor, Triton importable, not disabled with ``TRAINSERVE_DISABLE_TRITON=1``), and its
torch reference otherwise. ``TRITON_INTERPRET=1`` (set before import) additionally allows CPU
tensors, so the Triton code itself can be exercised without a GPU.
"""

from __future__ import annotations

import os

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no Triton"
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_disabled() -> bool:
    """True when ``TRAINSERVE_DISABLE_TRITON`` asks for the torch references everywhere."""
    return os.environ.get("TRAINSERVE_DISABLE_TRITON", "0") not in ("", "0", "false", "False")


_ENABLED = HAS_TRITON and not triton_disabled()  # read once: this runs on every kernel call


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton path should run for these inputs (CUDA tensors, Triton importable and
    not disabled by ``TRAINSERVE_DISABLE_TRITON`` at import time)."""
    if not _ENABLED:
        return False
    if INTERPRET:
        return True
    for t in tensors:
        if not t.is_cuda:
            return False
    return True


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def num_warps_for(block: int) -> int:
    """A reasonable warp count for a row-wise kernel over ``block`` elements."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def device_sm_count(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device (a small constant elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
