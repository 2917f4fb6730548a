"""Process-wide environment defaults that must be set before vLLM is imported.

Colocation needs the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the
trainer's modules view the engine's tensors, which a child process could not share. On CPU,
vLLM shrinks torch to one thread "for serving"; setting ``OMP_NUM_THREADS`` keeps the trainer's
threads. Every default yields to a value the user already exported.
"""

from __future__ import annotations

import os

_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # The tiny model and most CPU experiments need far less than vLLM's default 4 GiB KV cache.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_env_defaults() -> None:
    """Set trainserve's defaults for variables the user has not set."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    from trainserve.logs import apply_env_log_level

    apply_env_log_level()  # only when TRAINSERVE_LOG_LEVEL is set (see trainserve.logs)


def require_inprocess_engine() -> None:
    """Raise unless vLLM will run its engine core in this process (colocation needs it)."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise RuntimeError(
            "trainserve needs the vLLM engine in-process: unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0"
        )


def cuda_available() -> bool:
    """True when torch sees a CUDA device (imports torch lazily)."""
    import torch

    return torch.cuda.is_available()
