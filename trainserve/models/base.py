"""``FastBaseModel``: installs the shared patched forwards on one model instance of an architecture.

``patch_model(model)`` replaces, on that instance only, the ``forward`` of the causal-LM head, the
decoder stack, each decoder layer, attention, MLP, RMSNorm and the rotary embedding with the
functions of :mod:`trainserve.models.forwards` (``types.MethodType``; the classes are never
touched, and ``unpatch_model`` removes them again). Each architecture is a subclass naming its
transformers module and class prefix, and its own config rules (:meth:`validate_config`); the
architectures depend on this base, never on each other.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from torch import nn

from trainserve.models.checkpointing import normalize_gc_mode
from trainserve.models.forwards import ROLE_FORWARDS
from trainserve.models.mlp_memory import keep_budget_from_env, mlp_recompute_default
from trainserve.models.shared_prefix import shared_prefix_switch

_ROLE_SUFFIXES = {
    "causal_lm": "ForCausalLM", "model": "Model", "decoder_layer": "DecoderLayer",
    "attention": "Attention", "mlp": "MLP", "rms_norm": "RMSNorm", "rotary": "RotaryEmbedding",
}
_OUR_FUNCS = set(ROLE_FORWARDS.values())


def _is_ours(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    return isinstance(fwd, types.MethodType) and fwd.__func__ in _OUR_FUNCS


def _base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal-LM module inside a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


class FastBaseModel:
    """Patch class of one architecture; subclasses set ``model_type``, ``_module`` and ``_prefix``."""

    model_type: str = ""
    _module: str = ""
    _prefix: str = ""
    _pre_patched = False

    @classmethod
    def module_classes(cls) -> dict[str, type]:
        """role -> transformers class for this architecture."""
        mod = importlib.import_module(cls._module)
        return {role: getattr(mod, cls._prefix + suffix) for role, suffix in _ROLE_SUFFIXES.items()}

    @classmethod
    def pre_patch(cls) -> None:
        """Resolve the transformers classes (idempotent; nothing global is modified: the forwards are
        installed per instance by :meth:`patch_model`)."""
        if cls.__dict__.get("_pre_patched"):
            return
        for klass in cls.module_classes().values():
            if not hasattr(klass, "forward"):
                raise RuntimeError(f"{klass.__name__} has no forward; unsupported transformers version")
        cls._pre_patched = True

    @classmethod
    def validate_config(cls, config: Any, rope_scaling: Any = None) -> None:
        """Raise ValueError for a config of another architecture; subclasses add their own rules."""
        mt = getattr(config, "model_type", cls.model_type)
        if mt != cls.model_type:
            raise ValueError(f"{cls.__name__} patches model_type {cls.model_type!r}, got {mt!r}")

    @classmethod
    def patch_model(cls, model: nn.Module, use_gradient_checkpointing: Any = "unsloth") -> nn.Module:
        """Install the fast forwards on this instance (idempotent); returns ``model``."""
        cls.pre_patch()
        causal = _base_causal_lm(model)
        cls.validate_config(causal.config)
        mode = normalize_gc_mode(use_gradient_checkpointing)
        shared_prefix_switch()  # a bad TRAINSERVE_SHARED_PREFIX is refused here, not at the first forward
        classes = cls.module_classes()
        for module in causal.modules():
            for role, klass in classes.items():
                if type(module) is klass:
                    if "forward" in module.__dict__ and not _is_ours(module):
                        break  # someone else's instance forward (e.g. accelerate hooks): leave it
                    module.forward = types.MethodType(ROLE_FORWARDS[role], module)
                    break
        causal.model._trainserve_gc = mode
        recompute = mlp_recompute_default(mode)
        budget = keep_budget_from_env() if recompute else None  # one per model, reset by each forward
        causal.model._trainserve_keep = budget
        for layer in causal.model.layers:
            layer.mlp._trainserve_recompute = recompute
            layer.mlp._trainserve_keep = budget
        causal._trainserve_patched = cls.__name__
        return model

    @classmethod
    def unpatch_model(cls, model: nn.Module) -> nn.Module:
        """Remove every forward :meth:`patch_model` installed; returns ``model``."""
        causal = _base_causal_lm(model)
        for module in causal.modules():
            if _is_ours(module):
                del module.__dict__["forward"]
            for attr in ("_trainserve_recompute", "_trainserve_keep"):
                if attr in module.__dict__:
                    del module.__dict__[attr]
        for obj, attr in ((causal.model, "_trainserve_gc"), (causal, "_trainserve_patched")):
            if attr in obj.__dict__:
                delattr(obj, attr)
        return model
