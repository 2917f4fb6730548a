"""Checkpoint variants of the tiny model for loader tests: a Llama, a Qwen3, and Qwen2 with edited configs.

The tiny Qwen2's weights minus the q/k/v biases are a valid Llama checkpoint (same layout), so the
Llama path runs on a real engine without a download; with per-head q/k RMSNorm weights added they
are a Qwen3 checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def _copy_tiny(out: Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    from trainserve import tiny_model

    src = Path(tiny_model())
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy(f, out / f.name)
    return json.loads((src / "config.json").read_text())


def tiny_llama(out: str | Path, rope: dict[str, Any] | None = None) -> str:
    """The tiny model as a ``LlamaForCausalLM`` checkpoint in ``out`` (``rope``: its config's RoPE dict)."""
    from safetensors.torch import load_file, save_file

    from trainserve import tiny_model

    out = Path(out)
    cfg = _copy_tiny(out, skip=("config.json", "model.safetensors"))
    tensors = {k: v for k, v in load_file(str(Path(tiny_model()) / "model.safetensors")).items()
               if not k.endswith(".bias")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False)
    for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
        cfg.pop(key, None)
    if rope is not None:
        cfg["rope_parameters"] = {"rope_theta": cfg["rope_parameters"]["rope_theta"], **rope}
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def tiny_qwen2_with(out: str | Path, **config: Any) -> str:
    """The tiny Qwen2 in ``out`` with ``config`` entries replaced in its config.json."""
    out = Path(out)
    cfg = _copy_tiny(out, skip=("config.json",))
    cfg.update(config)
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def tiny_qwen3(out: str | Path, **config: Any) -> str:
    """The tiny model as a ``Qwen3ForCausalLM`` checkpoint in ``out``: no q/k/v biases, and random
    ``q_norm``/``k_norm`` weights around 1 (seeded), so that the per-head norms change the output.
    ``config``: entries replaced in its config.json."""
    import torch
    from safetensors.torch import load_file, save_file

    from trainserve import tiny_model

    out = Path(out)
    cfg = _copy_tiny(out, skip=("config.json", "model.safetensors"))
    tensors = {k: v for k, v in load_file(str(Path(tiny_model()) / "model.safetensors")).items()
               if not k.endswith(".bias")}
    g = torch.Generator().manual_seed(11)
    for i in range(cfg["num_hidden_layers"]):
        for norm in ("q_norm", "k_norm"):
            tensors[f"model.layers.{i}.self_attn.{norm}.weight"] = 1.0 + 0.3 * torch.randn(cfg["head_dim"], generator=g)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=False)
    cfg.update(config)
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def tiny_mistral(out: str | Path, sliding_window: int | None = None) -> str:
    """The tiny Llama checkpoint as a ``MistralForCausalLM`` in ``out`` (same layout), with ``sliding_window``."""
    out = Path(out)
    tiny_llama(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=sliding_window)
    for key in ("attention_bias", "mlp_bias"):
        cfg.pop(key, None)
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)
