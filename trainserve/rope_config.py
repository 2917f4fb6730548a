"""RoPE scaling that the trainer and the engine apply identically, checked before the engine starts.

``from_pretrained(rope_scaling=...)`` takes the Unsloth / transformers-4.x spelling
(``{"type": "linear", "factor": 4.0}`` or ``{"rope_type": "linear", "factor": 4.0}``) and the
transformers-5 one (``rope_parameters``: the same plus ``rope_theta``). :func:`normalize_rope_scaling`
turns any of them into one complete transformers-5 ``rope_parameters`` dict; the loader sets it on
the trainer's config *and* hands it to vLLM (``hf_overrides``), so both sides build the same rotary
embedding. Only the RoPE types whose two implementations agree are accepted (``SUPPORTED_ROPE``);
``dynamic`` is refused because transformers rescales per sequence length while vLLM scales once,
statically, so rollouts and training would see different positions.
"""

from __future__ import annotations

import copy
import math
from typing import Any

# rope_type → (required keys, optional keys) besides rope_type / rope_theta; transformers' own lists.
SUPPORTED_ROPE: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "llama3": (frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
               frozenset()),
    "yarn": (frozenset({"factor", "original_max_position_embeddings"}),
             frozenset({"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"})),
}
_FLOAT_KEYS = frozenset({"factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast",
                         "beta_slow", "mscale", "mscale_all_dim"})
# Filled in from the model's config when the caller leaves them out.
_WITH_ORIGINAL_MAX = ("llama3", "yarn")


def config_rope_parameters(config: Any) -> dict[str, Any] | None:
    """The config's RoPE dict (``rope_parameters`` in transformers 5, ``rope_scaling`` before)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = getattr(config, "rope_scaling", None)
    return params if isinstance(params, dict) else None


def rope_type_of(params: dict[str, Any] | None) -> str:
    """``rope_type`` (or the legacy ``type``) of a RoPE dict; ``"default"`` for none."""
    if not params:
        return "default"
    return str(params.get("rope_type") or params.get("type") or "default")


def check_supported(config: Any, where: str = "the model's config") -> None:
    """Raise ``ValueError`` if the config's own RoPE is one the engine and trainer would apply differently."""
    params = config_rope_parameters(config)
    if params is not None and any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{where} has per-layer RoPE parameters, which trainserve does not support")
    kind = rope_type_of(params)
    if kind not in SUPPORTED_ROPE:
        raise ValueError(f"{where} uses RoPE type {kind!r}, which trainserve does not support "
                         f"(supported: {sorted(SUPPORTED_ROPE)})")
    if params is not None:
        _check_engine_agrees(params, kind, config, where)


def _check_engine_agrees(params: dict[str, Any], kind: str, config: Any, where: str) -> None:
    """Refuse RoPE dicts that transformers and vLLM would read differently (checked before the engine starts).

    transformers fills a missing ``factor`` in from the context lengths and reads ``beta_fast``/``beta_slow``
    of 0 as their defaults, while vLLM needs ``factor`` and uses the betas as given; and vLLM's YaRN table
    has ``original_max_position_embeddings * factor`` positions, which transformers does not limit.
    """
    required, _ = SUPPORTED_ROPE[kind]
    missing = sorted(k for k in required if params.get(k) is None)
    if missing:
        raise ValueError(f"{where}: RoPE type {kind!r} needs {missing} (transformers would infer or default "
                         "them, vLLM would not); add them to the RoPE dict in config.json")
    for key in ("beta_fast", "beta_slow"):
        if key in params and not params[key]:
            raise ValueError(f"{where}: {key}={params[key]!r} - transformers replaces it with its default, vLLM "
                             "uses it as given; remove it or give a positive value")
    if kind == "yarn":
        limit = params["original_max_position_embeddings"] * params["factor"]
        max_pos = getattr(config, "max_position_embeddings", None)
        if max_pos is not None and max_pos > limit:
            raise ValueError(f"{where}: max_position_embeddings={max_pos} exceeds YaRN's "
                             f"original_max_position_embeddings * factor = {limit:g}, the positions vLLM's YaRN "
                             "RoPE covers; lower max_position_embeddings or raise factor")


def normalize_rope_scaling(config: Any, rope_scaling: Any) -> dict[str, Any]:
    """A complete transformers-5 ``rope_parameters`` dict for ``rope_scaling``; raises before anything loads.

    Accepts ``type`` or ``rope_type`` (not two different ones), fills ``rope_theta`` and, for
    ``llama3``/``yarn``, ``original_max_position_embeddings`` from ``config``, and refuses unknown
    types, unknown or missing keys and a non-finite or < 1 ``factor`` with a ``ValueError`` naming
    ``rope_scaling``.
    """
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict such as {{'rope_type': 'linear', 'factor': 2.0}}, "
                         f"got {rope_scaling!r}")
    params = dict(rope_scaling)
    legacy, modern = params.pop("type", None), params.get("rope_type")
    if legacy is not None and modern is not None and legacy != modern:
        raise ValueError(f"rope_scaling has type={legacy!r} and rope_type={modern!r}; give one of them")
    kind = modern if modern is not None else legacy
    if kind is None:
        raise ValueError(f"rope_scaling needs 'rope_type' (or the legacy 'type'), got {rope_scaling!r}")
    if kind not in SUPPORTED_ROPE:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {sorted(SUPPORTED_ROPE)}); "
                         "'dynamic' is refused because vLLM and transformers scale it differently")
    params["rope_type"] = kind
    current = config_rope_parameters(config) or {}
    theta = params.get("rope_theta", current.get("rope_theta", getattr(config, "rope_theta", None)))
    if theta is None:
        raise ValueError("rope_scaling: the model's config has no rope_theta; pass it in rope_scaling")
    params["rope_theta"] = float(theta)
    if kind in _WITH_ORIGINAL_MAX:
        params.setdefault("original_max_position_embeddings",
                          current.get("original_max_position_embeddings", config.max_position_embeddings))
    required, optional = SUPPORTED_ROPE[kind]
    keys = set(params) - {"rope_type", "rope_theta"}
    missing, unknown = sorted(required - keys), sorted(keys - required - optional)
    if missing or unknown:
        raise ValueError(f"rope_scaling for rope_type {kind!r}: missing keys {missing}, unknown keys {unknown} "
                         f"(required {sorted(required)}, optional {sorted(optional)})")
    factor = params.get("factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 1:
        raise ValueError(f"rope_scaling factor must be a finite number >= 1, got {factor!r}")
    for key in _FLOAT_KEYS & set(params):  # vLLM's linear RoPE takes a float factor only (int 4 crashes)
        if isinstance(params[key], int) and not isinstance(params[key], bool):
            params[key] = float(params[key])
    trial = copy.deepcopy(config)  # transformers' own validation, on a copy
    apply_rope_parameters(trial, params)
    validate = getattr(trial, "validate_rope", None)
    if validate is not None:
        try:
            validate()
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"rope_scaling {rope_scaling!r} is invalid: {exc}") from exc
    return params


def position_limit(config: Any) -> tuple[int, str]:
    """The longest sequence ``config`` supports, as vLLM derives it, and what it is: the model's
    ``max_position_embeddings``, times ``factor`` under linear RoPE scaling (yarn and llama3 configs
    already state the extended length)."""
    params = config_rope_parameters(config) or {}
    factor = params.get("factor") if params.get("rope_type", params.get("type")) == "linear" else None
    if factor:
        return int(config.max_position_embeddings * factor), (
            f"the model's max_position_embeddings={config.max_position_embeddings} x the linear rope_scaling "
            f"factor {factor:g}")
    return int(config.max_position_embeddings), "the model's max_position_embeddings"


def apply_rope_parameters(config: Any, params: dict[str, Any]) -> None:
    """Set normalised RoPE parameters on a transformers config (both major versions)."""
    if "rope_parameters" in type(config).__dict__ or hasattr(config, "rope_parameters"):
        config.rope_parameters = dict(params)
    else:  # transformers 4.x: theta is a config attribute, the dict holds the scaling only
        config.rope_theta = params["rope_theta"]
        config.rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
