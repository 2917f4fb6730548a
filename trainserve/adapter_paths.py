"""Where adapter files may come from, and private copies of them.

Shared by the Python API's adapter registry and the server: both refuse paths outside a confining
directory (symbolic links included), and both hand the engine copies of the files, never the
directory a user may write to again (see :mod:`trainserve.adapter_copies` for why).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["ADAPTER_FILES", "AdapterError", "resolve_in_dir", "snapshot_adapter"]


class AdapterError(ValueError):
    """An adapter directory that cannot be served; the message says why."""


def resolve_in_dir(base_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Resolve ``path`` (absolute or relative to ``base_dir``) and refuse anything outside it."""
    base = Path(base_dir).resolve()
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if resolved != base and base not in resolved.parents:
        raise AdapterError(f"adapter path {str(path)!r} is outside the adapters directory {str(base)!r}")
    return resolved


#: The files of a PEFT LoRA directory that vLLM reads.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def snapshot_adapter(source: str | os.PathLike, parent: str | os.PathLike, confine_to: str | None = None) -> str:
    """Copy the adapter's files into a new private directory under ``parent`` and return it.

    ``confine_to``: refuse files that resolve outside that directory (the server's adapters
    directory; symbolic links included)."""
    source = Path(source)
    if not source.is_dir():
        raise AdapterError(f"adapter directory {str(source)!r} does not exist")
    target = tempfile.mkdtemp(prefix="v-", dir=parent)
    try:
        for fname in ADAPTER_FILES:
            src = source / fname
            if not src.exists():
                continue
            if confine_to is not None:
                src = resolve_in_dir(confine_to, src)
            if not src.is_file():
                raise AdapterError(f"{fname} in {str(source)!r} is not a regular file")
            shutil.copyfile(src, os.path.join(target, fname))
    except OSError as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise AdapterError(f"cannot read the adapter at {str(source)!r}: {exc}") from exc
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target
