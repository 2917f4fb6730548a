"""Refuse a local checkpoint that lacks weights the model needs, before the engine starts.

Why: vLLM's loader fills the parameters it finds in the checkpoint and, for unquantised linear
layers, does not check that every parameter was found. A checkpoint missing, say,
``model.layers.1.mlp.down_proj.weight`` loaded with ``fast_inference=True`` silently: the engine
served, and the trainer viewed, whatever the uninitialised memory held. transformers (without the
engine) reports missing weights but still initialises them at random. trainserve compares the
checkpoint's tensor names with the model's before anything loads and names what is missing.

Only safetensors checkpoints are checked: their tensor names can be read from the file headers
without loading any weight. Other formats (``pytorch_model.bin``) load as before.
"""

from __future__ import annotations

import glob
import os
from typing import Any


def checkpoint_tensor_names(model_dir: str) -> set[str] | None:
    """The tensor names of the safetensors files in ``model_dir``, or None when it has none."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        return None
    from safetensors import safe_open

    names: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt") as handle:
            names.update(handle.keys())
    return names


def expected_tensor_names(config: Any) -> set[str]:
    """The persistent tensors of ``config``'s causal-LM model (built on the meta device: no memory).
    A tied ``lm_head`` is left out: checkpoints store the embedding only. Built from a copy with eager
    attention: the names do not depend on it, an ``attn_implementation`` whose package is missing here
    would refuse to build, and transformers writes the choice into the config it is given."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    names = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        names.discard("lm_head.weight")
    return names


def check_checkpoint_complete(model_dir: str, config: Any) -> None:
    """Raise ``ValueError`` naming the weights ``model_dir``'s safetensors files lack (no-op for a Hub id,
    or a directory without safetensors files)."""
    if not os.path.isdir(model_dir):
        return
    found = checkpoint_tensor_names(model_dir)
    if found is None:
        return
    missing = sorted(expected_tensor_names(config) - found)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"the checkpoint in {model_dir!r} lacks {len(missing)} weight(s) the model needs: {shown}. "
                         "The engine would serve (and the trainer train on) uninitialised memory in their place")


__all__ = ["check_checkpoint_complete", "checkpoint_tensor_names", "expected_tensor_names"]
