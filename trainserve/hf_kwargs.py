"""Hugging Face ``from_pretrained`` keywords that Unsloth scripts pass through to transformers.

Each is honoured on both sides (trainer and engine) or refused by name with the reason; none is
accepted and ignored:

* ``torch_dtype``: the older spelling of ``dtype`` (refused if both are given and differ);
* ``attn_implementation``: set on the model config, so transformers' own attention (generation
  with a KV cache, ``output_attentions``) uses it; the patched training forward always runs
  trainserve's SDPA attention (the same math) and the engine its own kernels;
* ``cache_dir`` / ``local_files_only``: a Hub id is resolved to a local snapshot *once*, with these
  settings, and that directory is what the tokenizer, the trainer and the vLLM engine all load;
* ``low_cpu_mem_usage``: ``True`` is what trainserve always does (the engine-shared model is built
  on the meta device; transformers 5 always loads this way); ``False`` is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# Files a model snapshot needs: config, tokenizer, generation config and safetensors weights.
_SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class HfOptions:
    """The pass-through keywords ``from_pretrained`` honours."""

    attn_implementation: str | None = None
    cache_dir: str | None = None
    local_files_only: bool = False

    def config_kwargs(self) -> dict[str, Any]:
        """Extra keywords for ``AutoConfig.from_pretrained``."""
        return {} if self.attn_implementation is None else {"attn_implementation": self.attn_implementation}


def _same_dtype(a: Any, b: Any) -> bool:
    def norm(d: Any) -> str:
        return str(d).removeprefix("torch.")

    return norm(a) == norm(b)


def pop_hf_kwargs(kwargs: dict[str, Any], dtype: Any) -> tuple[Any, HfOptions]:
    """Remove the pass-through keywords from ``kwargs``; returns ``(dtype, options)``."""
    torch_dtype = kwargs.pop("torch_dtype", None)
    if torch_dtype is not None:
        if dtype is not None and not _same_dtype(dtype, torch_dtype):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; torch_dtype is the older "
                             "name of dtype: give one")
        dtype = torch_dtype
    low_mem = kwargs.pop("low_cpu_mem_usage", None)
    if low_mem is False:
        raise NotImplementedError("low_cpu_mem_usage=False is not supported: trainserve always builds the model "
                                  "without a second full copy in CPU memory (low_cpu_mem_usage=True)")
    if low_mem not in (None, True):
        raise ValueError(f"low_cpu_mem_usage must be True or False, got {low_mem!r}")
    attn = kwargs.pop("attn_implementation", None)
    if attn is not None and attn not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={attn!r} is not supported (choose from {ATTN_IMPLEMENTATIONS})")
    cache_dir = kwargs.pop("cache_dir", None)
    local_only = kwargs.pop("local_files_only", False)
    if not isinstance(local_only, bool):
        raise ValueError(f"local_files_only must be True or False, got {local_only!r}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise ValueError(f"cache_dir must be a path, got {cache_dir!r}")
    return dtype, HfOptions(attn, None if cache_dir is None else str(cache_dir), local_only)


def resolve_model_path(model_name: str, options: HfOptions, revision: str | None, token: str | None) -> str:
    """With ``cache_dir`` or ``local_files_only``, the local snapshot directory of Hub id ``model_name``
    (downloaded into ``cache_dir`` unless ``local_files_only``); else ``model_name`` unchanged."""
    if (options.cache_dir is None and not options.local_files_only) or os.path.isdir(model_name):
        return model_name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=model_name, revision=revision, token=token, cache_dir=options.cache_dir,
                                 local_files_only=options.local_files_only, allow_patterns=_SNAPSHOT_FILES)
    except Exception as exc:  # noqa: BLE001 - say which settings could not find the model
        raise OSError(f"cannot find {model_name!r} (cache_dir={options.cache_dir!r}, local_files_only="
                      f"{options.local_files_only}): {type(exc).__name__}: {exc}") from exc


__all__ = ["ATTN_IMPLEMENTATIONS", "HfOptions", "pop_hf_kwargs", "resolve_model_path"]
