"""``model.save_pretrained_gguf(dir, tokenizer, quantization_method=...)``: a llama.cpp GGUF of the merged model.

Written with the ``gguf`` package from PyPI (llama.cpp's own Python writer; ``pip install 'trainserve[gguf]'``),
no toolchain: the weights are :func:`trainserve.export.merged_state_dict` (every active LoRA merged into a
CPU copy; the engine and the trainer are untouched), renamed with ``gguf``'s tensor-name map and laid out as
llama.cpp's ``convert_hf_to_gguf.py`` does - in particular Llama's q/k rows are permuted from transformers'
rotate-half RoPE layout to llama.cpp's interleaved one (Qwen2/Qwen3 use llama.cpp's NeoX RoPE: no
permutation). The hyper-parameters, RoPE scaling (``linear``, ``yarn``) and the byte-level BPE tokenizer
(tokens, merges, special ids, chat template) are written as the same metadata keys.

llama.cpp splits text before BPE with the pre-tokenizer named in ``tokenizer.ggml.pre``; a wrong name makes
it tokenize differently from training with no error anywhere. ``convert_hf_to_gguf.py`` identifies it by
hashing the tokenizer's output and refuses unknown ones; here it is identified from ``tokenizer.json``
itself (normalizer and pre-tokenizer, on the fields that change how text is split) against the exact ones of
Qwen2/Qwen3 (``qwen2``), Llama-3 (``llama-bpe``) and GPT-2 (``gpt-2``, also the embedded tiny model's), and
anything else is refused: a model with its own pre-tokenizer (SmolLM, ...) goes through the converter.
Every refusal happens before the (whole-model, fp32) merge and before the output directory is created.

Types: ``f32``, ``f16``, ``bf16`` and ``q8_0`` (``gguf.quants``; norms and biases stay f32 and a matrix
whose rows are not a multiple of the 32-value block falls back to f16, as llama.cpp's converter does);
Unsloth's ``"not_quantized"`` is ``f16`` and ``"fast_quantized"`` is ``q8_0``. The k-quants (``q4_k_m``,
Unsloth's ``"quantized"``...) need llama.cpp's compiled ``llama-quantize``, so they are refused with the
command to run on the exported f16 file; so are architectures, RoPE types and tokenizers this writer does
not cover, with the ``convert_hf_to_gguf.py`` route on a ``save_pretrained_merged`` checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainserve.export import merged_state_dict
from trainserve.rope_config import config_rope_parameters, rope_type_of

__all__ = ["GGUF_TYPES", "save_pretrained_gguf"]

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
_ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "f32": "f32", "f16": "f16", "bf16": "bf16",
            "q8_0": "q8_0"}
# model_type -> (gguf architecture name, q/k rows permuted for its RoPE)
_ARCHS = {"qwen2": ("QWEN2", False), "qwen3": ("QWEN3", False), "llama": ("LLAMA", True)}
# The Split regexes of Qwen2's and Llama-3's tokenizer.json (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 and _LLAMA3).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(regex: str) -> tuple:
    return ("Sequence", (("Split", json.dumps({"Regex": regex}), "Isolated", False), ("ByteLevel", False, False)))


# llama.cpp pre-tokenizer name -> (tokenizer.json normalizer, pre-tokenizer as _canonical_pre gives it)
_PRE_TOKENIZERS = {"qwen2": ({"type": "NFC"}, _split_then_bytes(_QWEN2_SPLIT)),
                   "llama-bpe": (None, _split_then_bytes(_LLAMA3_SPLIT)),
                   "gpt-2": (None, ("ByteLevel", False, True))}
_CONVERT = ("save the merged checkpoint with model.save_pretrained_merged(dir, tokenizer) and convert it with "
            "llama.cpp: python convert_hf_to_gguf.py dir --outtype f16 (then llama-quantize for k-quants)")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise ImportError("save_pretrained_gguf needs the gguf package: pip install 'trainserve[gguf]' "
                          f"(or pip install gguf); otherwise {_CONVERT}") from exc
    return gguf


def gguf_type(quantization_method: str) -> str:
    """The GGUF tensor type for Unsloth's ``quantization_method``; refuses the ones this writer cannot make."""
    if not isinstance(quantization_method, str):
        raise ValueError(f"quantization_method must be a string such as 'q8_0' or 'f16', got {quantization_method!r}")
    kind = _ALIASES.get(quantization_method.lower())
    if kind is None:
        raise NotImplementedError(
            f"quantization_method={quantization_method!r} is not supported: trainserve writes {GGUF_TYPES} "
            "('not_quantized' = f16, 'fast_quantized' = q8_0) without a toolchain; for k-quants such as q4_k_m "
            "export f16 and run llama.cpp's compiled quantizer: llama-quantize model.F16.gguf model.Q4_K_M.gguf "
            "Q4_K_M")
    return kind


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection (or bias) from transformers' rotate-half layout to llama.cpp's interleaved
    one: within each head, row ``i`` of the first half goes to ``2i`` and of the second to ``2i+1`` (the
    permutation of ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``)."""
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _canonical_pre(pre: Any) -> Any:
    """A tokenizer.json pre-tokenizer reduced to what changes how text is split (offset trimming does not),
    with the ``tokenizers`` defaults filled in, so that equal splitting compares equal."""
    if not isinstance(pre, dict):
        return pre
    kind = pre.get("type")
    if kind == "Sequence":
        return (kind, tuple(_canonical_pre(p) for p in pre.get("pretokenizers", ())))
    if kind == "Split":
        return (kind, json.dumps(pre.get("pattern"), sort_keys=True), pre.get("behavior"), pre.get("invert", False))
    if kind == "ByteLevel":
        return (kind, pre.get("add_prefix_space", True), pre.get("use_regex", True))
    return (kind, json.dumps(pre, sort_keys=True))


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a parsed ``tokenizer.json``: the known pre-tokenizer its
    normalizer and pre-tokenizer equal exactly; anything else is refused (see the module docstring)."""
    normalizer, pre = tokenizer_json.get("normalizer"), _canonical_pre(tokenizer_json.get("pre_tokenizer"))
    for name, (known_normalizer, known_pre) in _PRE_TOKENIZERS.items():
        if normalizer == known_normalizer and pre == known_pre:
            return name
    raise NotImplementedError(
        "save_pretrained_gguf cannot name this tokenizer's llama.cpp pre-tokenizer: its tokenizer.json "
        f"normalizer {json.dumps(normalizer)} and pre_tokenizer {json.dumps(tokenizer_json.get('pre_tokenizer'))} "
        f"are not exactly those of {sorted(_PRE_TOKENIZERS)} (Qwen2, Llama-3, GPT-2), and a guessed name would "
        "make llama.cpp split text differently from training; llama.cpp's converter identifies it (or refuses "
        f"it) from the tokenizer's output: {_CONVERT}")


def _arch_of(config: Any) -> tuple[str, bool]:
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHS:
        raise NotImplementedError(f"save_pretrained_gguf supports model_type {sorted(_ARCHS)}, not {model_type!r}; "
                                  f"{_CONVERT}")
    return _ARCHS[model_type]


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hparams(writer: Any, gguf: Any, config: Any, file_type: Any) -> None:
    writer.add_name(str(getattr(config, "_name_or_path", "") or "trainserve-export").rstrip("/").split("/")[-1])
    writer.add_file_type(file_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    rope = config_rope_parameters(config) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    kind = _rope_kind(config)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))


def _rope_kind(config: Any) -> str:
    """The config's RoPE type, refused unless :func:`_add_hparams` writes it (checked before the merge)."""
    kind = rope_type_of(config_rope_parameters(config) or {})
    if kind not in ("default", "linear", "yarn"):
        raise NotImplementedError(f"save_pretrained_gguf does not write RoPE type {kind!r}; {_CONVERT}")
    return kind


@dataclass
class _Vocab:
    """The tokenizer as it goes into the GGUF file, read and checked before the model is merged."""

    pre: str
    tokens: list[str]
    types: list[Any]
    special: Any


def _read_tokenizer(gguf: Any, tokenizer: Any, n_vocab: int) -> _Vocab:
    """Byte-level BPE vocabulary as llama.cpp's ``gpt2`` tokenizer model (tokens padded to ``n_vocab``), with
    its pre-tokenizer name; refuses other tokenizers, unknown pre-tokenizers and more tokens than ``n_vocab``."""
    with tempfile.TemporaryDirectory(prefix="trainserve-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = gguf.vocab.BpeVocab(Path(tmp))
        except (FileNotFoundError, ValueError) as exc:
            raise NotImplementedError(f"save_pretrained_gguf writes byte-level BPE tokenizers only ({exc}); "
                                      f"{_CONVERT}") from exc
        tokenizer_json = Path(tmp) / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise NotImplementedError("save_pretrained_gguf needs a fast tokenizer (one that saves tokenizer.json) "
                                      f"to identify its llama.cpp pre-tokenizer; {_CONVERT}")
        pre = pre_tokenizer_name(json.loads(tokenizer_json.read_text(encoding="utf-8")))
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
    tokens, types = [], []
    for text, _score, kind in vocab.all_tokens():
        tokens.append(text if isinstance(text, str) else text.decode("utf-8"))
        types.append(kind)
    if len(tokens) > n_vocab:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens, more than the model's vocab_size {n_vocab}")
    for i in range(len(tokens), n_vocab):  # the model's padded rows, as convert_hf_to_gguf.py names them
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    return _Vocab(pre, tokens, types, special)


def _add_tokenizer(writer: Any, vocab: _Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    vocab.special.add_to_gguf(writer, quiet=True)


def _tensor_data(gguf: Any, name: str, tensor: torch.Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """(array, GGML type) of one tensor: 1-D ones in f32, matrices in ``kind`` (q8_0 falls back to f16)."""
    data = tensor.to(torch.float32).numpy()
    q = gguf.GGMLQuantizationType
    if data.ndim <= 1 or kind == "f32":
        return data, q.F32
    if kind == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0:
        return gguf.quants.quantize(data, q.Q8_0), q.Q8_0
    if kind == "bf16":
        return gguf.quants.quantize(data, q.BF16), q.BF16
    return data.astype(np.float16), q.F16


def gguf_tensors(model: Any, config: Any) -> dict[str, torch.Tensor]:
    """The merged weights under their GGUF names, in llama.cpp's layout (float32 CPU tensors)."""
    gguf = _gguf()
    arch_name, permute = _arch_of(config)
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in merged_state_dict(model, torch.float32).items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp reuses token_embd for a tied head
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise NotImplementedError(f"save_pretrained_gguf cannot name tensor {name!r} in GGUF; {_CONVERT}")
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_qk(tensor, config.num_attention_heads)
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_qk(tensor, config.num_key_value_heads)
        out[new] = tensor
    return out


def save_pretrained_gguf(self: Any, save_directory: str | os.PathLike, tokenizer: Any = None,
                         quantization_method: str = "fast_quantized", **kwargs: Any) -> str:
    """Write ``<save_directory>/model.<TYPE>.gguf`` (the merged model; see the module docstring) and return its
    path. ``tokenizer`` is required: llama.cpp reads the vocabulary from the GGUF file itself."""
    if kwargs:
        raise TypeError(f"save_pretrained_gguf got unexpected arguments {sorted(kwargs)}")
    kind = gguf_type(quantization_method)
    causal = self.get_base_model() if hasattr(self, "get_base_model") else self
    config = causal.config
    arch_name, _ = _arch_of(config)
    if tokenizer is None:
        raise ValueError("save_pretrained_gguf needs the tokenizer: llama.cpp reads the vocabulary from the GGUF file")
    gguf = _gguf()
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    _rope_kind(config)  # every refusal before the fp32 merge of the whole model and before any directory
    vocab = _read_tokenizer(gguf, tokenizer, config.vocab_size)
    tensors = gguf_tensors(self, config)
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"model.{kind.upper()}.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch_name)])
    try:
        _add_hparams(writer, gguf, config, file_type)
        _add_tokenizer(writer, vocab)
        for name, tensor in tensors.items():
            data, qtype = _tensor_data(gguf, name, tensor, kind)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return str(path)
