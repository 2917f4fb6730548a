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
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainserve.adapter_copies import AdapterCopies
from trainserve.adapter_paths import AdapterError

SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Modules the base model has but the engine serves no LoRA on (named so, not "unknown").
UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head")


def unsupported_targets_message(names: list[str]) -> str:
    """Why LoRA on ``names`` is refused: unsupported (embed_tokens, lm_head) or unknown modules."""
    known = [n for n in names if n.rsplit(".", 1)[-1] in UNSUPPORTED_TARGETS]
    unknown = [n for n in names if n not in known]
    parts = []
    if known:
        parts.append(f"LoRA on {known} is not supported (the engine serves LoRA on the linear projections only)")
    if unknown:
        parts.append(f"target modules {unknown} do not exist in the base model")
    return f"{'; '.join(parts)}; supported target modules: {list(SUPPORTED_TARGETS)}"


@dataclass(frozen=True)
class AdapterInfo:
    path: str
    rank: int
    target_modules: tuple[str, ...]
    digest: str


def _module_dims(config: Any) -> dict[str, tuple[int, int]]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }


def validate_adapter_dir(
    path: str | os.PathLike, config: Any, max_lora_rank: int, dtype: Any = None
) -> AdapterInfo:
    """Check a PEFT LoRA directory against the base model; raise :class:`AdapterError` if unusable.

    ``dtype`` is the engine's compute dtype (``"bfloat16"``, a ``torch.dtype``, ...; default: the
    model config's): the adapter's effective update must stay finite in it (see :func:`_check_delta`).
    """
    try:
        return _validate_adapter_dir(path, config, max_lora_rank, dtype)
    except AdapterError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:  # malformed config values
        raise AdapterError(f"invalid adapter at {str(path)!r}: {type(exc).__name__}: {exc}") from exc


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scales(cfg: dict[str, Any], rank: int, max_lora_rank: int) -> tuple[float, dict, dict, bool]:
    """Check ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` and ``use_rslora`` (vLLM and PEFT would
    fail on them with a bare ``TypeError`` or silently compute another scale)."""
    alpha = cfg.get("lora_alpha", rank)
    if not _number(alpha) or not math.isfinite(alpha):
        raise AdapterError(f"lora_alpha must be a finite number, got {alpha!r}")
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterError("rank_pattern and alpha_pattern must be objects (module pattern → value)")
    for key, r in rank_pattern.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise AdapterError(f"rank_pattern[{key!r}] = {r!r} is not a positive integer")
        if r > max_lora_rank:
            raise AdapterError(f"adapter rank {r} (rank_pattern[{key!r}]) exceeds max_lora_rank {max_lora_rank}")
    for key, a in alpha_pattern.items():
        if not _number(a) or not math.isfinite(a):
            raise AdapterError(f"alpha_pattern[{key!r}] = {a!r} is not a finite number")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterError(f"use_rslora must be true or false, got {rslora!r}")
    return float(alpha), rank_pattern, alpha_pattern, rslora


def _module_rank_and_scale(
    module: str, rank: int, alpha: float, rank_pattern: dict, alpha_pattern: dict, rslora: bool
) -> tuple[int, float]:
    """PEFT's (and vLLM's) per-module rank and scale: the first pattern matching a suffix of the name."""
    from peft.utils.other import get_pattern_key

    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), rank) if rank_pattern else rank
    a = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), alpha) if alpha_pattern else alpha
    return r, (a / math.sqrt(r) if rslora else a / r)


def _check_delta(module: str, a: Any, b: Any, scale: float, dtype: Any) -> None:
    """Refuse an update ``scale·B·A`` that overflows the compute dtype when applied.

    Finite weights are not enough: ``lora_B × 1e30`` or ``lora_alpha = 1e38`` pass a NaN check, yet
    every answer is NaN logits (empty text at logprob −9999). ``M = scale·max_i Σ_r |B_ir|·‖A_r‖₁``
    bounds ``|ΔW·x|`` for activations of magnitude ≤ 1; it must be finite in the compute dtype and
    below ``sqrt(float32 max)`` (≈1.8e19), past which the float32 square in the next RMSNorm is inf.
    """
    import torch

    finfo = torch.finfo(dtype)
    limit = min(finfo.max, math.sqrt(torch.finfo(torch.float32).max))
    for name, t in (("lora_A", a), ("lora_B", b * scale)):
        if not bool(t.to(dtype).isfinite().all()):
            raise AdapterError(f"{module}: {name} (scaled by {scale:g}) overflows {dtype}")
    bound = scale * float((b.double().abs() @ a.double().abs().sum(dim=1)).max())
    if not bound <= limit:
        raise AdapterError(
            f"{module}: the adapter's update scale·B·A reaches {bound:.3g} per unit input, "
            f"which overflows {dtype} activations (limit {limit:.3g})"
        )


def _compute_dtype(config: Any, dtype: Any) -> Any:
    import torch

    value = dtype if dtype is not None else getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None) if value != "auto" else None
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def _validate_adapter_dir(
    path: str | os.PathLike, config: Any, max_lora_rank: int, dtype: Any = None
) -> AdapterInfo:
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
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"adapter_config.json is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # "[[[[…": json.loads goes past Python's recursion limit
        raise AdapterError("adapter_config.json is nested too deeply to read") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter_config.json must hold a JSON object, got {type(cfg).__name__}")
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
        raise AdapterError(unsupported_targets_message(bad))
    alpha, rank_pattern, alpha_pattern, rslora = _scales(cfg, rank, max_lora_rank)
    compute_dtype = _compute_dtype(config, dtype)
    dims = _module_dims(config)
    digest = hashlib.sha256(cfg_path.read_bytes())
    pairs: dict[str, dict[str, Any]] = {}  # module path → {"lora_A": tensor, "lora_B": tensor}
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
                path_of_module = ".".join(parts[: parts.index(which)])
                mrank, _ = _module_rank_and_scale(
                    path_of_module.removeprefix("base_model.model."), rank, alpha, rank_pattern, alpha_pattern, rslora
                )
                in_f, out_f = dims[module]
                want = (mrank, in_f) if which == "lora_A" else (out_f, mrank)
                if tuple(tensor.shape) != want:
                    source = "rank_pattern" if mrank != rank else "r"
                    raise AdapterError(
                        f"tensor {key!r} has shape {tuple(tensor.shape)}, the base model and the config's "
                        f"{source} (rank {mrank}) need {want}"
                    )
                if not bool(tensor.float().isfinite().all()):
                    raise AdapterError(f"tensor {key!r} contains NaN or Inf")
                digest.update(key.encode())
                digest.update(tensor.float().numpy().tobytes())
                if which in pairs.setdefault(path_of_module, {}):
                    raise AdapterError(f"{path_of_module} has two {which} tensors")
                pairs[path_of_module][which] = tensor.float()
    except AdapterError:
        raise
    except Exception as exc:  # corrupt or truncated file
        raise AdapterError(f"adapter_model.safetensors cannot be read: {exc}") from exc
    layers = {int(p) for k in keys for p in [k.split("layers.")[1].split(".")[0]] if "layers." in k}
    if layers and max(layers) >= config.num_hidden_layers:
        raise AdapterError(f"adapter has layer {max(layers)}, the base model has {config.num_hidden_layers} layers")
    for module_path, pair in pairs.items():
        missing = {"lora_A", "lora_B"} - set(pair)
        if missing:
            raise AdapterError(f"{module_path} has no {missing.pop()} tensor (LoRA needs lora_A and lora_B)")
        name = module_path.removeprefix("base_model.model.")
        _, scale = _module_rank_and_scale(name, rank, alpha, rank_pattern, alpha_pattern, rslora)
        _check_delta(name, pair["lora_A"], pair["lora_B"], scale, compute_dtype)
    return AdapterInfo(str(root.resolve()), rank, tuple(targets), digest.hexdigest()[:16])


class AdapterRegistry:
    """Hands out one vLLM ``LoRARequest`` per distinct adapter content and registers it with the engine.

    The engine reads each adapter from a private copy made and validated at :meth:`load`, not from
    the caller's directory (see :mod:`trainserve.adapter_copies`): files saved there later never
    reach a request that was loaded before."""

    def __init__(self, engine: Any, config: Any, keep_copies: int = 16):
        self.engine = engine
        self.config = config
        self._ids = itertools.count(1)
        self._by_digest: dict[str, Any] = {}
        self._unloaded: set[int] = set()
        self._issued: dict[int, str] = {}  # lora_int_id → lora_path of each request load() handed out
        self._lock = threading.Lock()
        self.copies = AdapterCopies(keep_copies, self._digest, engine.loop.in_use_lora_ids)
        engine.loop.before_submit = self._before_submit

    def _digest(self, path: str) -> str:
        return validate_adapter_dir(path, self.config, self.engine.spec.max_lora_rank, self.engine.spec.dtype).digest

    def _before_submit(self, request: Any) -> None:
        """Between engine steps, in the job that submits ``request``: its copy is there for vLLM to read."""
        try:
            self.copies.ensure(request.lora_int_id)
        except AdapterError as exc:
            raise AdapterError(f"cannot serve lora_request {request.lora_name!r}: {exc}") from exc

    def load(self, path: str | os.PathLike, name: str | None = None, copy: bool = True) -> Any:
        """Validate and register the adapter at ``path``; same content → same request (and id).

        The files are copied first, and the copy is what is validated and served. ``copy=False``:
        the engine reads ``path`` itself, for a caller that hands over a private directory whose
        lifetime it manages (the server's snapshots)."""
        if not copy:
            info = validate_adapter_dir(path, self.config, self.engine.spec.max_lora_rank, self.engine.spec.dtype)
            return self._register(info.digest, name, Path(info.path).name, lambda _id: info.path)
        staged, digest = self.copies.stage(path)
        try:
            request = self._register(digest, name, Path(path).resolve().name, self.copies.path_for,
                                     lambda lora_id: self.copies.adopt(lora_id, staged, path, digest))
        finally:
            shutil.rmtree(staged, ignore_errors=True)  # gone already once adopted
        self.engine.loop.call(self.copies.trim)
        return request

    def _register(self, digest: str, name: str | None, dir_name: str, path_for: Callable[[int], str],
                  place: Callable[[int], None] | None = None) -> Any:
        """The request for ``digest`` (a known one unless ``name`` differs), registered with the engine;
        ``place(id)`` puts the files where ``path_for(id)`` says before the engine reads them."""
        from vllm.lora.request import LoRARequest

        with self._lock:
            known = self._by_digest.get(digest)
            if known is not None and (name is None or known.lora_name == name):
                request, new = known, False
            else:
                lora_id = next(self._ids)
                request, new = LoRARequest(name or f"{dir_name}@{digest[:8]}", lora_id, path_for(lora_id)), True
                self._issued[lora_id] = request.lora_path
        if place is not None:
            place(request.lora_int_id)
        if not new:
            return request
        # Not under the lock: a between-steps job that used the registry would otherwise deadlock.
        try:
            self.engine.loop.call(lambda: self.engine.llm.llm_engine.add_lora(request))
        except BaseException:
            with self._lock:
                self._issued.pop(request.lora_int_id, None)
            self.copies.forget(request.lora_int_id)
            self.engine.loop.call(self.copies.trim)  # no request can use it: its copy goes now
            raise
        with self._lock:
            self._by_digest.setdefault(digest, request)
        return request

    def unload(self, request: Any) -> None:
        """Remove an adapter from the engine (requests already running finish first)."""
        with self._lock:
            self._by_digest = {d: r for d, r in self._by_digest.items() if r.lora_int_id != request.lora_int_id}
            self._unloaded.add(request.lora_int_id)
        self.engine.loop.call(lambda: self.engine.llm.llm_engine.remove_lora(request.lora_int_id))
        self.copies.forget(request.lora_int_id)
        self.engine.loop.call(self.copies.trim)

    def check_usable(self, request: Any) -> None:
        """Refuse a ``lora_request`` that :meth:`load` did not hand out, or whose adapter was unloaded (vLLM
        would silently load it again from disk).

        vLLM caches adapters by ``lora_int_id``: a ``LoRARequest`` built by hand that reuses an id serves
        the adapter already cached under it (whatever its path), and a new id skips the validation."""
        from vllm.lora.request import LoRARequest

        if request is None:
            return
        if not isinstance(request, LoRARequest):
            raise TypeError(f"lora_request must be the LoRARequest returned by model.load_lora(path) (one for the "
                            f"whole batch) or None for the live adapter, got {request!r}")
        if request.lora_int_id in self._unloaded:
            raise ValueError(f"adapter {request.lora_name!r} was unloaded; load it again with load_lora()")
        if self._issued.get(request.lora_int_id) != request.lora_path:
            raise ValueError(f"lora_request {request.lora_name!r} (id {request.lora_int_id}) was not returned by "
                             "this model's load_lora(); pass model.load_lora(path) instead of a LoRARequest built by "
                             "hand (vLLM caches adapters by id, so a hand-built one may be served another adapter)")
