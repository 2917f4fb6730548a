"""Saved PEFT adapters: validation, content-addressed ids, registration with the engine.

A bad adapter is rejected *before* the engine sees it (a failure inside an engine step would
take every request down), and registering never evicts what is already serving.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterError(ValueError):
    """An adapter directory that cannot be served; the message says why."""


@dataclass(frozen=True)
class AdapterInfo:
    path: str
    rank: int
    target_modules: tuple[str, ...]
    digest: str


def resolve_in_dir(base_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Resolve ``path`` (absolute or relative to ``base_dir``) and refuse anything outside it."""
    base = Path(base_dir).resolve()
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if resolved != base and base not in resolved.parents:
        raise AdapterError(f"adapter path {str(path)!r} is outside the adapters directory {str(base)!r}")
    return resolved


def _module_dims(config: Any) -> dict[str, tuple[int, int]]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }


def validate_adapter_dir(path: str | os.PathLike, config: Any, max_lora_rank: int) -> AdapterInfo:
    """Check a PEFT LoRA directory against the base model; raise :class:`AdapterError` if unusable."""
    try:
        return _validate_adapter_dir(path, config, max_lora_rank)
    except AdapterError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:  # malformed config values
        raise AdapterError(f"invalid adapter at {str(path)!r}: {type(exc).__name__}: {exc}") from exc


def _validate_adapter_dir(path: str | os.PathLike, config: Any, max_lora_rank: int) -> AdapterInfo:
    from safetensors import safe_open

    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"adapter directory {str(root)!r} does not exist")
    cfg_path = root / "adapter_config.json"
    weights = root / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise AdapterError(f"{str(root)!r} has no adapter_config.json")
    if not weights.is_file():
        raise AdapterError(f"{str(root)!r} has no adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"adapter_config.json is not valid JSON: {exc}") from exc
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {cfg.get('peft_type')!r} is not LORA")
    rank = cfg.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"adapter rank r={rank!r} is not a positive integer")
    if rank > max_lora_rank:
        raise AdapterError(f"adapter rank {rank} exceeds max_lora_rank {max_lora_rank}")
    if cfg.get("use_dora"):
        raise AdapterError("DoRA adapters are not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"modules_to_save {cfg['modules_to_save']} is not supported by the engine")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str) and targets not in SUPPORTED_TARGETS:
        # PEFT reads a string as a regular expression over module names: it must select some of ours
        # (the tensors below are checked module by module either way).
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise AdapterError(f"target_modules {targets!r} is not a valid regular expression: {exc}") from exc
        if not any(pattern.search(f"model.layers.0.x.{t}") for t in SUPPORTED_TARGETS):
            raise AdapterError(f"target_modules {targets!r} matches none of {SUPPORTED_TARGETS}")
        targets = []
    targets = [targets] if isinstance(targets, str) else list(targets)
    bad = [t for t in targets if t.rsplit(".", 1)[-1] not in SUPPORTED_TARGETS]
    if bad:
        raise AdapterError(f"target modules {bad} do not exist in the base model (supported: {SUPPORTED_TARGETS})")
    dims = _module_dims(config)
    digest = hashlib.sha256(cfg_path.read_bytes())
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            if not keys:
                raise AdapterError("adapter_model.safetensors holds no tensors")
            for key in keys:
                parts = key.split(".")
                if "lora_A" not in parts and "lora_B" not in parts:
                    raise AdapterError(f"unexpected tensor {key!r} (only lora_A/lora_B are supported)")
                which = "lora_A" if "lora_A" in parts else "lora_B"
                module = parts[parts.index(which) - 1]
                if module not in dims:
                    raise AdapterError(f"tensor {key!r} targets {module!r}, which the base model lacks")
                tensor = f.get_tensor(key)
                in_f, out_f = dims[module]
                want = (rank, in_f) if which == "lora_A" else (out_f, rank)
                if tuple(tensor.shape) != want:
                    raise AdapterError(f"tensor {key!r} has shape {tuple(tensor.shape)}, the base model needs {want}")
                if not bool(tensor.float().isfinite().all()):
                    raise AdapterError(f"tensor {key!r} contains NaN or Inf")
                digest.update(key.encode())
                digest.update(tensor.float().numpy().tobytes())
    except AdapterError:
        raise
    except Exception as exc:  # corrupt or truncated file
        raise AdapterError(f"adapter_model.safetensors cannot be read: {exc}") from exc
    layers = {int(p) for k in keys for p in [k.split("layers.")[1].split(".")[0]] if "layers." in k}
    if layers and max(layers) >= config.num_hidden_layers:
        raise AdapterError(f"adapter has layer {max(layers)}, the base model has {config.num_hidden_layers} layers")
    if not math.isfinite(float(cfg.get("lora_alpha", rank))):
        raise AdapterError("lora_alpha is not finite")
    return AdapterInfo(str(root.resolve()), rank, tuple(targets), digest.hexdigest()[:16])


class AdapterRegistry:
    """Hands out one vLLM ``LoRARequest`` per distinct adapter content and registers it with the engine."""

    def __init__(self, engine: Any, config: Any):
        self.engine = engine
        self.config = config
        self._ids = itertools.count(1)
        self._by_digest: dict[str, Any] = {}
        self._unloaded: set[int] = set()
        self._lock = threading.Lock()

    def load(self, path: str | os.PathLike, name: str | None = None) -> Any:
        """Validate and register the adapter at ``path``; same content → same request (and id)."""
        from vllm.lora.request import LoRARequest

        info = validate_adapter_dir(path, self.config, self.engine.spec.max_lora_rank)
        with self._lock:
            known = self._by_digest.get(info.digest)
            if known is not None and (name is None or known.lora_name == name):
                return known
            request = LoRARequest(name or f"{Path(info.path).name}@{info.digest[:8]}", next(self._ids), info.path)
        # Not under the lock: a between-steps job that used the registry would otherwise deadlock.
        self.engine.loop.call(lambda: self.engine.llm.llm_engine.add_lora(request))
        with self._lock:
            self._by_digest.setdefault(info.digest, request)
        return request

    def unload(self, request: Any) -> None:
        """Remove an adapter from the engine (requests already running finish first)."""
        with self._lock:
            self._by_digest = {d: r for d, r in self._by_digest.items() if r.lora_int_id != request.lora_int_id}
            self._unloaded.add(request.lora_int_id)
        self.engine.loop.call(lambda: self.engine.llm.llm_engine.remove_lora(request.lora_int_id))

    def check_usable(self, request: Any) -> None:
        """Refuse a request whose adapter was unloaded (vLLM would silently load it again from disk)."""
        if request is not None and request.lora_int_id in self._unloaded:
            raise ValueError(f"adapter {request.lora_name!r} was unloaded; load it again with load_lora()")
