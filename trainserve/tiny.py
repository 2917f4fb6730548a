"""The embedded tiny model: a random-weight Qwen2 with a BPE tokenizer trained on shipped text.

Built offline and deterministically, once per cache directory, so tests, the demo and CI never
need a model hub. The architecture is a real ``qwen2`` (GQA, tied embeddings, q/k/v biases),
only small: every code path that a 0.5B checkpoint takes is taken here too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Bump when anything below changes the built files: the cache key includes it.
TINY_SPEC = {
    "format": 1,
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "seed": 3407,
    "dtype": "float32",
}


def _default_cache_root() -> Path:
    root = os.environ.get("TRAINSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "trainserve"
    )
    return Path(root)


def _spec_key() -> str:
    blob = json.dumps(TINY_SPEC, sort_keys=True).encode() + _corpus_text().encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _corpus_text() -> str:
    return resources.files("trainserve.data").joinpath("tiny_corpus.txt").read_text("utf-8")


def _train_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_SPEC["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = TINY_SPEC["max_position_embeddings"]
    fast.save_pretrained(out_dir)


def _build_model(out_dir: Path, n_tokens: int) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    s = TINY_SPEC
    # vLLM pads the vocabulary to a multiple of 64; matching it keeps HF and vLLM shapes identical.
    vocab = max(s["vocab_size"], n_tokens)
    vocab = (vocab + 63) // 64 * 64
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        head_dim=s["head_dim"],
        max_position_embeddings=s["max_position_embeddings"],
        rope_theta=s["rope_theta"],
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype=s["dtype"],
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(s["seed"])
    try:
        model = Qwen2ForCausalLM(config).to(getattr(torch, s["dtype"]))
        # A larger init than HF's default 0.02 makes the random model's outputs less flat,
        # so that changing weights visibly changes greedy decoding.
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, 0.08)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=2, pad_token_id=0).save_pretrained(out_dir)


def tiny_model(path: str | os.PathLike | None = None) -> str:
    """Return a directory holding the tiny random-weight Qwen2 and its tokenizer, building it once.

    ``path`` chooses the directory; by default it lives under ``$TRAINSERVE_CACHE`` (or
    ``~/.cache/trainserve``), keyed by the spec, so every caller on a machine shares one build.
    Building is deterministic, offline and safe against concurrent callers.
    """
    target = Path(path) if path is not None else _default_cache_root() / f"tiny-qwen2-{_spec_key()}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists() and (target / "tokenizer.json").exists():
            return str(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _train_tokenizer(tmp)
            n_tokens = len(json.loads((tmp / "tokenizer.json").read_text())["model"]["vocab"])
            _build_model(tmp, n_tokens)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
