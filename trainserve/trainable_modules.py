"""Training the embedding and ``lm_head`` in full: ``modules_to_save`` (and, as in Unsloth,
``embed_tokens``/``lm_head`` named in ``target_modules``).

As Unsloth does, ``embed_tokens`` or ``lm_head`` in ``target_modules`` means *train that module in
full*: it is moved to peft's ``modules_to_save`` (a trainable copy per adapter, saved with the
adapter), not given a low-rank update. On a model with tied embeddings the two copies are tied
too (peft's ``ensure_weight_tying``), so the trained model stays a tied model.

With the colocated engine (``fast_inference=True``) this is refused before training starts:

* vLLM 0.32 serves ``modules_to_save`` only for classifier/score heads, and its LoRA model for
  Qwen2 declares no embedding modules, so the engine cannot hold a per-adapter embedding;
* the engine's embedding/``lm_head`` tensor is the one the base model and every adapter use.
  Writing the trained copy there would change the base for everything served (and what
  ``disable_adapter()`` generates), which a LoRA adapter must never do.

The routes that work: ``fast_inference=False`` (train, ``save_lora``, ``save_pretrained_merged``, then
serve the merged checkpoint), or ``full_finetuning=True, fast_inference=True``, where the trainer
trains the engine's own embedding in place and the engine serves it live (see
:mod:`trainserve.full_finetune`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FULL_MODULES = ("embed_tokens", "lm_head")


def split_targets(target_modules: Sequence[str], modules_to_save: Any) -> tuple[list[str], list[str]]:
    """``(LoRA targets, modules trained in full)``: ``embed_tokens``/``lm_head`` move from
    ``target_modules`` to ``modules_to_save``; anything else in ``modules_to_save`` is refused."""
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    full: list[str] = []
    bad = []
    for name in modules_to_save or []:  # a saved config may hold peft's full names ("model.embed_tokens")
        leaf = name.rsplit(".", 1)[-1] if isinstance(name, str) else name
        if leaf not in FULL_MODULES:
            bad.append(name)
        elif leaf not in full:
            full.append(leaf)
    if bad:
        raise NotImplementedError(f"modules_to_save={bad!r} is not supported; trainserve trains "
                                  f"{list(FULL_MODULES)} in full")
    lora = []
    for name in target_modules:
        if name in FULL_MODULES:
            if name not in full:
                full.append(name)
        else:
            lora.append(name)
    return lora, full


def check_lora_targets(state: Any, lora: list[str], full: list[str], model: Any = None) -> None:
    """``get_peft_model``'s refusals of what it was asked to train (``lora``/``full`` from
    :func:`split_targets`; ``state`` the engine state of ``model``, or None), before anything changes.

    * A ``full_finetuning=True, fast_inference=True`` model (``state.live_base``) already trains every
      base parameter in place, served live; a LoRA adapter on it would be a second trainer of the
      same engine weights (its live slot would be served on top of a base the adapter does not
      track), so it is refused. Without the engine too: peft would freeze every base parameter, so
      ``full_finetuning=True`` would silently become LoRA.
    * ``embed_tokens``/``lm_head`` are trained in full, not by LoRA: with no projection left, peft
      would have no LoRA module to build; a projection trainserve does not serve is refused by name."""
    from trainserve.adapters import SUPPORTED_TARGETS, unsupported_targets_message

    if state is not None and getattr(state, "live_base", None) is not None:
        raise ValueError("get_peft_model on a model loaded with full_finetuning=True and fast_inference=True: "
                         "every parameter of that model is already trained in place (the engine serves it "
                         "live), so a LoRA adapter cannot be added. Train the model itself, or load it with "
                         "full_finetuning=False for LoRA")
    if state is None and model is not None and model.__dict__.get("_trainserve_full_finetuning"):
        raise ValueError("get_peft_model on a model loaded with full_finetuning=True: peft would freeze every base "
                         "parameter, so the model would train only a LoRA adapter instead of every weight. Train "
                         "the model itself, or load it with full_finetuning=False for LoRA")
    if not lora:
        moved = f" ({full} are trained in full, as modules_to_save, not by LoRA)" if full else ""
        raise ValueError(f"target modules is empty{moved}: LoRA needs at least one projection in target_modules; "
                         f"choose from {list(SUPPORTED_TARGETS)}")
    unknown = [t for t in lora if t not in SUPPORTED_TARGETS]
    if unknown:
        raise ValueError(unsupported_targets_message(unknown))


def refuse_with_engine(modules: list[str]) -> None:
    """The clear error for ``fast_inference=True`` (the module docstring says why and what works)."""
    raise NotImplementedError(
        f"training {modules} in full (modules_to_save, or embed_tokens/lm_head in target_modules) cannot be "
        "served by the colocated engine: vLLM serves modules_to_save only for classifier heads, and the engine's "
        "embedding is shared by the base model and every adapter, so serving the trained copy would change the "
        "base for everything. Use fast_inference=False (then save_pretrained_merged and serve the merged "
        "checkpoint), or full_finetuning=True with fast_inference=True to train the engine's embedding in place, "
        "served live")


def lora_config_arguments(config: Any, modules: list[str]) -> dict[str, Any]:
    """The ``LoraConfig`` arguments for training ``modules`` in full (none when ``modules`` is empty).

    ``ensure_weight_tying`` is new in peft 0.18.0 (peft PR #2803), hence ``peft>=0.18`` in pyproject.toml."""
    if not modules:
        return {}
    return {"modules_to_save": list(modules),  # a copy: peft rewrites the list it is given
            "ensure_weight_tying": bool(getattr(config, "tie_word_embeddings", False))}


def merged_parameter_name(name: str, adapters: Sequence[str]) -> str | None:
    """The plain-checkpoint name of a parameter of a model with ``modules_to_save``, or None to skip it.

    peft keeps ``<module>.original_module.*`` (the base) and ``<module>.modules_to_save.<adapter>.*``
    (the trained copy); an export writes the active adapter's copy under ``<module>.*`` (the base's
    when ``adapters`` is empty: inside ``disable_adapter()``)."""
    if ".original_module." in name:
        return None if adapters else name.replace(".original_module.", ".", 1)
    if ".modules_to_save." in name:
        owner, _, rest = name.partition(".modules_to_save.")
        adapter, _, leaf = rest.partition(".")
        return f"{owner}.{leaf}" if adapter in adapters else None
    return name


def adapter_save_arguments(peft_model: Any) -> dict[str, Any]:
    """Arguments for ``peft_model.save_pretrained``: with ``modules_to_save`` the trained embedding/head
    copies are saved as such, so peft must not also save the (resized) base embedding layers, which it
    would write under wrapper names (``…original_module…``) that no load accepts."""
    config = getattr(peft_model, "peft_config", {}).get(getattr(peft_model, "active_adapter", "default"))
    return {"save_embedding_layers": False} if getattr(config, "modules_to_save", None) else {}
