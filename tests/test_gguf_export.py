"""Issue 12, GGUF export: ``model.save_pretrained_gguf(dir, tokenizer, quantization_method=...)``.

Round trip: the GGUF file is read back with ``gguf.GGUFReader``; its tensors are renamed back to
transformers' names with a map written here by hand (llama.cpp's names), Llama's q/k rows are put back
from llama.cpp's interleaved RoPE layout with an index written here too, and a plain transformers model
built from them must give the trained model's logits. The metadata (hyper-parameters, YaRN, the BPE
vocabulary and merges) is compared with the config and the tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from helpers import sft
from model_variants import tiny_llama, tiny_mistral, tiny_qwen2_with, tiny_qwen3

from trainserve import FastLanguageModel, gguf_export, tiny_model

gguf = pytest.importorskip("gguf")

NO_ENGINE = dict(max_seq_length=256, load_in_4bit=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    return {"qwen2": tiny_model(), "llama": tiny_llama(tmp_path_factory.mktemp("llama")),
            "qwen3": tiny_qwen3(tmp_path_factory.mktemp("qwen3"))}


def _trained(path: str):
    model, tok = FastLanguageModel.from_pretrained(path, **NO_ENGINE)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS)
    sft(model, tok, "The secret phrase is", " open the blue door slowly.", steps=5)
    return model, tok


def _hf_name(name: str) -> str:
    base, suffix = name.rsplit(".", 1)
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
        return f"model.layers.{m[1]}.{HF_NAMES[m[2]]}.{suffix}"
    return f"{TOP_NAMES[base]}.{suffix}"


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved rows (per head: x0, y0, x1, y1...) back to rotate-half (x0, x1..., y0, y1...)."""
    d = w.shape[0] // n_head
    order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    idx = torch.cat([h * d + order for h in range(n_head)])
    return w[idx]


def _read(path: str, config) -> tuple[dict[str, torch.Tensor], gguf.GGUFReader]:
    reader = gguf.GGUFReader(path)
    permuted = reader.fields["general.architecture"].contents() == "llama"
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else t.data
        tensor, name = torch.from_numpy(data.astype("float32")).reshape(*reversed(t.shape.tolist())), _hf_name(t.name)
        if permuted and ".q_proj." in name:
            tensor = _unpermute(tensor, config.num_attention_heads)
        elif permuted and ".k_proj." in name:
            tensor = _unpermute(tensor, config.num_key_value_heads)
        out[name] = tensor
    return out, reader


def _logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch, kind, tol", [("qwen2", "f32", 1e-4), ("llama", "f32", 1e-4), ("qwen3", "f32", 1e-4),
                                             ("qwen2", "q8_0", 0.2), ("llama", "bf16", 0.2)])
def test_gguf_round_trip_gives_the_trained_model(tmp_path, paths, arch, kind, tol) -> None:
    model, tok = _trained(paths[arch])
    path = model.save_pretrained_gguf(tmp_path / "gguf", tok, quantization_method=kind)
    assert Path(path).name == f"model.{kind.upper()}.gguf"
    config = model.config
    tensors, reader = _read(path, config)
    types = {t.name: t.tensor_type for t in reader.tensors}
    want = {"f32": "F32", "q8_0": "Q8_0", "bf16": "BF16"}[kind]
    assert types["blk.0.attn_q.weight"].name == want and types["blk.0.attn_norm.weight"].name == "F32"
    plain = transformers.AutoModelForCausalLM.from_config(config.__class__.from_dict(config.to_dict()))
    missing, unexpected = plain.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to token_embd, as llama.cpp reads it
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(4))
    trained, exported = _logits(model, ids), _logits(plain, ids)
    assert (exported - trained).abs().max() < tol
    base, _ = FastLanguageModel.from_pretrained(paths[arch], **NO_ENGINE)
    assert (_logits(base, ids) - trained).abs().max() > 0.3  # the trained LoRA matters: the checks can fail
    weight = model.get_base_model().model.layers[1].self_attn.q_proj
    merged_q = (weight.get_base_layer().weight + weight.get_delta_weight("default")).detach()
    rel = (tensors["model.layers.1.self_attn.q_proj.weight"] - merged_q).norm() / merged_q.norm()
    assert rel < {"f32": 1e-6, "q8_0": 1e-2, "bf16": 1e-2}[kind]  # the merged q_proj, in its rotate-half layout

    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == arch
    assert field(f"{arch}.block_count") == config.num_hidden_layers
    assert field(f"{arch}.attention.head_count") == config.num_attention_heads
    assert field(f"{arch}.attention.head_count_kv") == config.num_key_value_heads
    assert field(f"{arch}.context_length") == config.max_position_embeddings
    assert field(f"{arch}.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert field("tokenizer.ggml.model") == "gpt2"
    # transformers loads the tiny Qwen2's tokenizer as Qwen2Tokenizer (Qwen2's pre-tokenizer); the Llama and
    # Qwen3 copies keep the tiny tokenizer.json's plain GPT-2 byte-level splitting, whatever the architecture
    assert field("tokenizer.ggml.pre") == {"qwen2": "qwen2", "llama": "gpt-2", "qwen3": "gpt-2"}[arch]
    tokens = field("tokenizer.ggml.tokens")
    vocab = tok.get_vocab()
    assert len(tokens) == config.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    merges = json.loads(Path(tok.name_or_path, "tokenizer.json").read_text())["model"]["merges"]
    assert len(field("tokenizer.ggml.merges")) == len(merges)
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id


def test_gguf_writes_yarn(tmp_path) -> None:
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    model, tok = FastLanguageModel.from_pretrained(
        tiny_qwen2_with(tmp_path / "yarn", rope_parameters=yarn, max_position_embeddings=256), **NO_ENGINE)
    reader = gguf.GGUFReader(model.save_pretrained_gguf(tmp_path / "gguf", tok, quantization_method="f16"))
    assert reader.fields["qwen2.rope.scaling.type"].contents() == "yarn"
    assert reader.fields["qwen2.rope.scaling.factor"].contents() == pytest.approx(4.0)
    assert reader.fields["qwen2.rope.scaling.original_context_length"].contents() == 64


def test_gguf_refusals_say_what_to_do(tmp_path) -> None:
    model, tok = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    for method in ("q4_k_m", "quantized"):
        with pytest.raises(NotImplementedError, match="llama-quantize"):
            model.save_pretrained_gguf(tmp_path, tok, quantization_method=method)
    with pytest.raises(ValueError, match="tokenizer"):
        model.save_pretrained_gguf(tmp_path, None, quantization_method="f16")
    with pytest.raises(TypeError, match="bogus"):
        model.save_pretrained_gguf(tmp_path, tok, bogus=1)
    mistral, mtok = FastLanguageModel.from_pretrained(tiny_mistral(tmp_path / "mistral", sliding_window=8),
                                                      **NO_ENGINE)
    with pytest.raises(NotImplementedError, match="convert_hf_to_gguf.py"):
        mistral.save_pretrained_gguf(tmp_path / "m", mtok, quantization_method="f16")
    assert not list(tmp_path.glob("**/*.gguf"))  # nothing half-written


def _with_pre_tokenizer(out: Path, normalizer, pre_tokenizer):
    """The tiny tokenizer with its tokenizer.json normalizer and pre-tokenizer replaced."""
    tok_json = json.loads(Path(tiny_model(), "tokenizer.json").read_text())
    tok_json["normalizer"], tok_json["pre_tokenizer"] = normalizer, pre_tokenizer
    out.mkdir(parents=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if Path(tiny_model(), name).exists():
            (out / name).write_text(Path(tiny_model(), name).read_text())
    (out / "tokenizer.json").write_text(json.dumps(tok_json))
    return transformers.AutoTokenizer.from_pretrained(out)


def _split_bytes(regex: str, trim_offsets: bool) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": trim_offsets, "use_regex": False}]}


def test_gguf_pre_tokenizer_is_read_from_the_tokenizer(tmp_path, monkeypatch) -> None:
    """Qwen2's and Llama-3's pre-tokenizers (the regexes as transformers ships them, not this module's copies)
    are named as llama.cpp names them; one changed character of the regex, or a missing normalizer, is refused
    before anything is merged or written."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    qwen2 = json.loads(transformers.models.qwen2.tokenization_qwen2.Qwen2Tokenizer(
        vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]).backend_tokenizer.to_str())
    assert gguf_export.pre_tokenizer_name(qwen2) == "qwen2"
    llama3 = _split_bytes(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"], trim_offsets=True)
    assert gguf_export.pre_tokenizer_name({"normalizer": None, "pre_tokenizer": llama3}) == "llama-bpe"

    model, _ = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    ok = _with_pre_tokenizer(tmp_path / "qwen2-tok", {"type": "NFC"}, _split_bytes(PRETOKENIZE_REGEX, False))
    reader = gguf.GGUFReader(model.save_pretrained_gguf(tmp_path / "ok", ok, quantization_method="f16"))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"

    monkeypatch.setattr(gguf_export, "merged_state_dict", lambda *a, **k: pytest.fail("merged before refusing"))
    digits = PRETOKENIZE_REGEX.replace(r"\p{N}|", r"\p{N}{1,2}|")
    assert digits != PRETOKENIZE_REGEX
    for name, normalizer, pre in [("regex", {"type": "NFC"}, _split_bytes(digits, False)),
                                  ("normalizer", None, _split_bytes(PRETOKENIZE_REGEX, False)),
                                  ("digits", None, {"type": "Sequence", "pretokenizers": [
                                      {"type": "Digits", "individual_digits": True},
                                      {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                       "use_regex": True}]})]:
        tok = _with_pre_tokenizer(tmp_path / f"{name}-tok", normalizer, pre)
        with pytest.raises(NotImplementedError, match="pre-tokenizer.*convert_hf_to_gguf.py"):
            model.save_pretrained_gguf(tmp_path / name, tok, quantization_method="f16")
        assert not (tmp_path / name).exists()


def test_gguf_refuses_before_merging_or_creating_the_directory(tmp_path, monkeypatch) -> None:
    """A config or tokenizer the writer refuses costs no fp32 merge of the model and leaves no directory."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    model, tok = FastLanguageModel.from_pretrained(tiny_llama(tmp_path / "llama3", rope=rope), **NO_ENGINE)
    monkeypatch.setattr(gguf_export, "merged_state_dict", lambda *a, **k: pytest.fail("merged before refusing"))
    with pytest.raises(NotImplementedError, match="RoPE type 'llama3'"):
        model.save_pretrained_gguf(tmp_path / "out" / "rope", tok, quantization_method="f16")
    small, small_tok = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    small.config.vocab_size = 8  # fewer rows than the tokenizer's tokens
    with pytest.raises(ValueError, match="more than the model's vocab_size 8"):
        small.save_pretrained_gguf(tmp_path / "out" / "vocab", small_tok, quantization_method="f16")
    assert not (tmp_path / "out").exists()
