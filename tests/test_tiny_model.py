"""The embedded tiny model builds deterministically and offline, with a real qwen2 config."""

from __future__ import annotations

import hashlib
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from trainserve import tiny_model


def _digest(path: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(path).iterdir())}


def test_tiny_model_is_deterministic(tmp_path):
    a = tiny_model(tmp_path / "a")
    b = tiny_model(tmp_path / "b")
    assert _digest(a) == _digest(b)
    assert tiny_model(tmp_path / "a") == a  # cached


def test_tiny_model_shape_and_tokenizer():
    path = tiny_model()
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "qwen2"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.tie_word_embeddings
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) <= cfg.vocab_size
    text = "The secret phrase is open the blue door slowly."
    assert tok.decode(tok(text).input_ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>user") and chat.endswith("<|im_start|>assistant\n")
