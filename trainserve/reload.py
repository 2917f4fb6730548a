"""``from_pretrained("<saved LoRA dir>")``: load the adapter's base model, then the adapter on top.

As in Unsloth, a directory written by ``save_lora`` / ``save_pretrained_merged(save_method="lora")``
holds no model weights, only ``adapter_config.json`` (whose ``base_model_name_or_path`` names the
base) and the LoRA tensors. The adapter is re-created through ``get_peft_model`` with the saved
configuration (so every check and the live engine adapter apply as for a new one) and its weights
are copied in; it is trainable again. A saved setting that ``get_peft_model`` cannot reproduce is
refused by name rather than silently dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainserve.adapters import validate_adapter_dir
from trainserve.lora_variants import check_bias
from trainserve.model_api import state_of
from trainserve.trainable_modules import adapter_save_arguments
from trainserve.vocab import resize_for_saved_adapter

# LoraConfig fields that are metadata or only decide the *initial* weights (overwritten here).
_NOT_COMPARED = {
    "base_model_name_or_path", "revision", "inference_mode", "init_lora_weights", "loftq_config",
    "peft_version", "auto_mapping", "task_type", "runtime_config", "peft_type",
    "ensure_weight_tying",  # get_peft_model sets it from the model's tie_word_embeddings
}


def saved_adapter_base(model_name: str) -> str | None:
    """The base model named by the saved adapter at ``model_name``, or None if it is not an adapter
    directory (a local directory with ``adapter_config.json`` and no ``config.json``).

    Raises ``ValueError`` when the adapter names no base and ``FileNotFoundError`` when it names a
    local path that does not exist (a Hub id is left to the normal loading, and its errors)."""
    root = Path(str(model_name))
    if not root.is_dir() or not (root / "adapter_config.json").is_file() or (root / "config.json").is_file():
        return None
    cfg = json.loads((root / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{str(root)!r} is a saved LoRA adapter without base_model_name_or_path in its "
                         "adapter_config.json: load its base model, then the adapter with "
                         "peft.PeftModel.from_pretrained")
    if Path(base).expanduser().is_dir():
        return str(Path(base).expanduser())
    if os.path.isabs(base) or base.startswith((".", "~")) or base.count("/") > 1:  # a path, not a Hub id
        raise FileNotFoundError(f"the saved LoRA adapter {str(root)!r} was trained on {base!r} "
                                "(adapter_config.json's base_model_name_or_path), which does not exist here; "
                                "edit base_model_name_or_path to where the base model is")
    return base


def _peft_arguments(cfg: dict[str, Any]) -> dict[str, Any]:
    targets = cfg.get("target_modules")
    return dict(
        r=cfg.get("r", 8), lora_alpha=cfg.get("lora_alpha", 8), lora_dropout=cfg.get("lora_dropout", 0.0),
        bias=cfg.get("bias", "none"), use_rslora=cfg.get("use_rslora", False),
        target_modules=sorted(targets) if isinstance(targets, (list, set, tuple)) else targets,
        layers_to_transform=cfg.get("layers_to_transform"), layers_pattern=cfg.get("layers_pattern"),
        modules_to_save=cfg.get("modules_to_save"),
    )


def _refuse_unreproducible(adapter_dir: str, args: dict[str, Any]) -> None:
    """Refuse saved LoraConfig fields that the adapter ``get_peft_model(**args)`` builds would differ in."""
    from peft import LoraConfig

    saved = LoraConfig.from_pretrained(adapter_dir).to_dict()
    ours = LoraConfig(task_type="CAUSAL_LM", **args).to_dict()
    differ = []
    for key, value in saved.items():
        if key in _NOT_COMPARED:
            continue
        mine = ours.get(key)
        if isinstance(value, (list, set, tuple)) and isinstance(mine, (list, set, tuple)):
            value, mine = set(value), set(mine)
        if value != mine:
            differ.append(f"{key}={value!r}")
    if differ:
        raise NotImplementedError(f"the saved adapter at {adapter_dir!r} uses LoRA settings trainserve cannot "
                                  f"re-create for training: {', '.join(sorted(differ))}")


def load_saved_adapter(model: Any, tokenizer: Any, adapter_dir: str, get_peft_model: Callable[..., Any],
                       use_gradient_checkpointing: Any, random_state: int,
                       fix_tokenizer: Callable[[Any], Any] | None) -> tuple[Any, Any]:
    """Wrap ``model`` (the adapter's base, just loaded) with the adapter saved in ``adapter_dir``,
    trainable; the tokenizer saved beside the adapter, if any, replaces the base's."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    args = _peft_arguments(cfg)
    if cfg.get("init_lora_weights") == "loftq":  # A/B fit LoftQ's quantised base, which is not saved
        raise NotImplementedError(f"the saved adapter at {adapter_dir!r} was initialised with LoftQ: its LoRA "
                                  "weights belong to LoftQ's quantised copy of the base, which save_lora does not "
                                  "save; export that model with save_pretrained_merged instead")
    _refuse_unreproducible(adapter_dir, args)
    state = state_of(model)
    check_bias(args["bias"], fast=state is not None)  # with the engine: refused by name, before anything loads
    # the engine's adapter checks; saved biases and modules_to_save are checked by get_peft_model and the load below
    if args["bias"] == "none" and not args["modules_to_save"]:
        validate_adapter_dir(adapter_dir, model.config, state.max_lora_rank if state is not None else args["r"])
    base_tokens = len(tokenizer) if tokenizer is not None else None
    if (Path(adapter_dir) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        if fix_tokenizer is not None:
            tokenizer = fix_tokenizer(tokenizer)
        if state is not None:
            state.tokenizer = tokenizer
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    resize_for_saved_adapter(model, tokenizer, weights, base_tokens)  # new tokens (trainserve.vocab)
    peft_model = get_peft_model(model, use_gradient_checkpointing=use_gradient_checkpointing,
                                random_state=random_state, **args)
    missing = _missing_adapter_keys(peft_model, weights)  # before loading: peft fails on some with a KeyError
    if missing:
        raise ValueError(f"the adapter at {adapter_dir!r} does not fit its base model: its adapter_config.json "
                         f"needs tensors (LoRA weights, modules_to_save copies, biases) that its "
                         f"adapter_model.safetensors lacks: missing {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    result = set_peft_model_state_dict(peft_model, weights, adapter_name="default")
    if result.unexpected_keys:
        raise ValueError(f"the adapter at {adapter_dir!r} does not fit its base model: unexpected "
                         f"{result.unexpected_keys[:5]}")
    return peft_model, tokenizer


def _missing_adapter_keys(peft_model: Any, weights: dict[str, Any]) -> list[str]:
    """The tensors the adapter must hold but ``weights`` (the saved file) lacks.

    ``load_state_dict``'s ``missing_keys`` also lists every base weight, so they cannot be used as
    such; what the adapter must hold is what saving the rebuilt adapter would write (LoRA A/B, the
    ``modules_to_save`` copies, the biases of ``bias="all"/"lora_only"``). A missing one would
    silently keep its initial value (an untrained embedding copy, the base's bias)."""
    from peft.utils import get_peft_model_state_dict

    expected = get_peft_model_state_dict(peft_model, adapter_name="default", **adapter_save_arguments(peft_model))
    return sorted(set(expected) - set(weights))
