"""Random-weight checkpoints with the real Qwen2 shapes, for benchmarks (speed does not depend on values).

Tensors are written straight to safetensors (no transformers init pass), so even the 7B shape
takes seconds plus disk time. The tokenizer is the tiny model's: vLLM and transformers accept a
model vocabulary larger than the tokenizer's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

QWEN2_SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def random_qwen2(shape: str, path: str | os.PathLike, dtype: str = "bfloat16", seed: int = 0) -> str:
    """Write a random-weight Qwen2 of ``shape`` (0.5b, 1.5b, 7b) to ``path`` and return it."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    from trainserve.tiny import tiny_model

    if shape not in QWEN2_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(QWEN2_SHAPES)}")
    out = Path(path)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    s = QWEN2_SHAPES[shape]
    config = Qwen2Config(**s, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         use_sliding_window=False, bos_token_id=0, eos_token_id=2, pad_token_id=0,
                         torch_dtype=dtype)
    config.architectures = ["Qwen2ForCausalLM"]
    h, inter, head = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * head, s["num_key_value_heads"] * head
    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)

    def rand(*shape_: int) -> torch.Tensor:
        return (torch.randn(*shape_, generator=gen) * 0.02).to(dt)

    tensors = {"model.embed_tokens.weight": rand(s["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=dt)}
    if not s["tie_word_embeddings"]:
        tensors["lm_head.weight"] = rand(s["vocab_size"], h)
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shp in (("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                          ("self_attn.o_proj", (h, q)), ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                          ("mlp.down_proj", (h, inter))):
            tensors[f"{p}{name}.weight"] = rand(*shp)
        for name, n in (("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)):
            tensors[f"{p}{name}.bias"] = rand(n)
        tensors[f"{p}input_layernorm.weight"] = torch.ones(h, dtype=dt)
        tensors[f"{p}post_attention_layernorm.weight"] = torch.ones(h, dtype=dt)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}))
    tiny = Path(tiny_model())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shape", choices=sorted(QWEN2_SHAPES))
    parser.add_argument("path")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    print(random_qwen2(args.shape, args.path, args.dtype))


if __name__ == "__main__":
    main()
