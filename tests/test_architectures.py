"""Issue 12, more architectures: Qwen3 (per-head q/k RMSNorm, no q/k/v bias) and Mistral (Llama layout,
sliding window on every layer) through the same patched training forward, shared engine weights and
live adapter as Qwen2/Llama.

Trainer side: the patched model against plain transformers + peft (loss and LoRA gradients, every
checkpointing mode). Engine side: every base parameter, ``q_norm``/``k_norm`` included, is a view of
the engine's tensors, and the engine generates (greedy, prompt logprobs) what the trainer computes,
before and after LoRA training. The tiny Qwen3 and Mistral are built offline from the tiny model
(:mod:`model_variants`); the Mistral's window (8 tokens) is shorter than the prompts, so it matters.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from helpers import engine_tokens, hf_tokens, peft_with_nonzero_b, prompt_logprob_gap, sft, train_and_check_live
from model_variants import tiny_mistral, tiny_qwen3

from trainserve import FastLanguageModel, FastMistralModel, FastQwen3Model, tiny_model
from trainserve.engine.launch import current_engine, shutdown_engine
from trainserve.model_api import state_of
from trainserve.models import get_fast_model_class
from trainserve.models.mistral import FastMistralModel as MistralPatch
from trainserve.models.qwen3 import FastQwen3Model as Qwen3Patch
from trainserve.weights import shared_storage_report

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENGINE = dict(max_seq_length=256, load_in_4bit=False, fast_inference=True, gpu_memory_utilization=0.3,
              max_lora_rank=16)
PROMPT = "The secret phrase is"
TARGET = " open the blue door slowly."
LONG = "The old bridge over the river reads the map of stars and the small robot writes a secret phrase"


WINDOW = 8


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory) -> str:
    return tiny_qwen3(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def mistral_path(tmp_path_factory) -> str:
    return tiny_mistral(tmp_path_factory.mktemp("mistral"), sliding_window=WINDOW)


# ------------------------------------------------------------------ trainer: patched vs transformers
def _lora_model(path: str, patch: bool, gc=False, lora: bool = True, **config):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, **config)
    patch_cls = {"Qwen3ForCausalLM": Qwen3Patch, "MistralForCausalLM": MistralPatch}[type(m).__name__]
    if patch:
        patch_cls.patch_model(m, use_gradient_checkpointing=gc)
    if not lora:
        return m
    pm = peft_with_nonzero_b(m, TARGETS)
    pm.train()
    return pm


def _batch(seed: int = 3, bsz: int = 2, seq: int = 24):
    ids = torch.randint(3, 512, (bsz, seq), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :5] = -100
    return ids, labels


def _step(model, **inputs):
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ref, got) -> None:
    (ref_out, ref_g), (out, g) = ref, got
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref_out.loss.item()) <= 1e-4 * abs(ref_out.loss.item())
    assert set(g) == set(ref_g) and len(g) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    for n in ref_g:
        assert (g[n] - ref_g[n]).norm() <= 1e-3 * ref_g[n].norm(), n


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack += [f for f, _ in fn.next_functions]
    return names


@pytest.mark.parametrize("gc", [False, True, "unsloth"])
def test_qwen3_loss_and_lora_grads_match_unpatched(qwen3_path: str, gc) -> None:
    ids, labels = _batch()
    ref = _step(_lora_model(qwen3_path, False), input_ids=ids, labels=labels)
    got = _step(_lora_model(qwen3_path, True, gc), input_ids=ids, labels=labels)
    assert got[0].logits is None  # the fused cross-entropy ran
    if gc is False:  # the offloaded checkpoint hides the layers' own nodes from the outer graph
        assert {"LoraProjectionsFunctionBackward", "LoraMLPFunctionBackward"} <= _graph_names(got[0].loss)
    _assert_same(ref, got)


def test_qwen3_qk_norms_are_applied_and_padding_matches(qwen3_path: str) -> None:
    ids, labels = _batch(seed=7)
    mask = torch.ones_like(ids)
    mask[1, -6:] = 0
    labels[1, -6:] = -100
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ref = _step(_lora_model(qwen3_path, False), **inputs)
    fast = _lora_model(qwen3_path, True, "unsloth")
    _assert_same(ref, _step(fast, **inputs))
    with torch.no_grad():  # the per-head norms are part of the patched forward: changing one matters
        fast.get_base_model().model.layers[0].self_attn.k_norm.weight.mul_(3.0)
        assert abs(fast(**inputs).loss.item() - ref[0].loss.item()) > 1e-3


def test_qwen3_logits_and_generation_fall_back_to_transformers(qwen3_path: str) -> None:
    ids, _ = _batch()
    ref = _lora_model(qwen3_path, False).eval()
    fast = _lora_model(qwen3_path, True, "unsloth").eval()
    with torch.no_grad():
        assert torch.allclose(fast(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(ref.generate(ids[:1, :6], max_new_tokens=4, do_sample=False),
                       fast.generate(ids[:1, :6], max_new_tokens=4, do_sample=False))
    Qwen3Patch.unpatch_model(fast)
    assert not any("forward" in mod.__dict__ for mod in fast.get_base_model().modules())


def test_qwen3_is_dispatched_and_has_its_entry_class(qwen3_path: str) -> None:
    assert get_fast_model_class("qwen3") is Qwen3Patch
    model, _ = FastLanguageModel.from_pretrained(qwen3_path, max_seq_length=256, load_in_4bit=False)
    assert model.config.model_type == "qwen3" and model._trainserve_patched == "FastQwen3Model"
    model, _ = FastQwen3Model.from_pretrained(qwen3_path, max_seq_length=256, load_in_4bit=False)
    model = FastQwen3Model.get_peft_model(model, r=4, target_modules=["q_proj"])
    assert hasattr(model, "peft_config")
    with pytest.raises(ValueError, match="FastQwen3Model.*'qwen3'.*'qwen2'"):
        FastQwen3Model.from_pretrained(tiny_model(), max_seq_length=256, load_in_4bit=False)


# ------------------------------------------------------------------ engine: shared weights, parity
def _own_engine(path: str, **kwargs):
    """``path`` loaded with its own engine (whatever engine runs is shut down first)."""
    shutdown_engine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return FastLanguageModel.from_pretrained(path, **ENGINE, **kwargs)


@pytest.fixture(scope="module")
def qwen3_engine(qwen3_path):
    yield _own_engine(qwen3_path)
    shutdown_engine()


@pytest.fixture(scope="module")
def mistral_engine(mistral_path):
    yield _own_engine(mistral_path)
    shutdown_engine()


def _logprob_gap(model, tokenizer) -> float:
    """Max |engine - trainer| prompt-token logprob over a long prompt."""
    return prompt_logprob_gap(model, tokenizer, LONG)


@pytest.mark.engine
def test_qwen3_engine_shares_every_weight_and_matches_the_trainer(qwen3_engine):
    model, tok = qwen3_engine
    engine = state_of(model).engine
    assert engine.llm.llm_engine.model_config.hf_config.model_type == "qwen3"
    report = shared_storage_report(model, engine.model)
    assert report == {"shared": len(list(model.parameters())), "separate": 0}
    norms = [n for n, _ in model.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(norms) == 4
    before = engine_tokens(model, PROMPT)
    assert hf_tokens(model, tok, PROMPT) == before
    assert _logprob_gap(model, tok) < 1e-3
    weight = model.model.layers[1].self_attn.q_norm.weight  # a view: the engine sees the change
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(-4.0)
    try:
        changed = engine_tokens(model, PROMPT)
        assert changed != before and hf_tokens(model, tok, PROMPT) == changed
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert engine_tokens(model, PROMPT) == before


@pytest.mark.engine
def test_qwen3_live_adapter_serves_what_the_trainer_learned(qwen3_engine):
    model, tok = qwen3_engine
    assert current_engine() is state_of(model).engine
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS, random_state=3407)
    base = engine_tokens(model, PROMPT)
    _, loss = sft(model, tok, PROMPT, TARGET, steps=30)
    assert loss < 0.2
    live = engine_tokens(model, PROMPT)  # the live adapter, no save
    target_ids = tok(TARGET).input_ids
    assert live[: len(target_ids)] == target_ids and live == hf_tokens(model, tok, PROMPT)
    assert _logprob_gap(model, tok) < 1e-3
    with model.disable_adapter():
        assert engine_tokens(model, PROMPT) == base == hf_tokens(model, tok, PROMPT)


# ------------------------------------------------------------------ Mistral: sliding window on every layer
@pytest.mark.parametrize("gc", [False, True, "unsloth"])
def test_mistral_sliding_window_matches_unpatched(mistral_path: str, gc) -> None:
    ids, labels = _batch(seed=11)  # 24 tokens: 3x the window
    ref = _step(_lora_model(mistral_path, False), input_ids=ids, labels=labels)
    no_window = _step(_lora_model(mistral_path, False, sliding_window=None), input_ids=ids, labels=labels)
    assert abs(ref[0].loss.item() - no_window[0].loss.item()) > 1e-4  # the window matters here
    _assert_same(ref, _step(_lora_model(mistral_path, True, gc), input_ids=ids, labels=labels))
    full = _step(_lora_model(mistral_path, True, gc, sliding_window=None), input_ids=ids, labels=labels)
    _assert_same(no_window, full)


def test_mistral_is_dispatched_and_has_its_entry_class(mistral_path: str, tmp_path) -> None:
    assert get_fast_model_class("mistral") is MistralPatch
    model, _ = FastMistralModel.from_pretrained(mistral_path, max_seq_length=256, load_in_4bit=False)
    assert model.config.model_type == "mistral" and model._trainserve_patched == "FastMistralModel"
    with pytest.raises(ValueError, match="FastMistralModel.*'mistral'.*'qwen2'"):
        FastMistralModel.from_pretrained(tiny_model(), max_seq_length=256, load_in_4bit=False)
    cfg = transformers.MistralConfig(num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match="layer_types"):
        MistralPatch.validate_config(cfg)


@pytest.mark.engine
def test_mistral_engine_applies_the_window_like_the_trainer(mistral_engine):
    model, tok = mistral_engine
    engine = state_of(model).engine
    assert engine.llm.llm_engine.model_config.get_sliding_window() == WINDOW
    report = shared_storage_report(model, engine.model)
    assert report == {"shared": len(list(model.parameters())), "separate": 0}
    assert len(tok(LONG).input_ids) > 3 * WINDOW
    assert _logprob_gap(model, tok) < 1e-3
    assert engine_tokens(model, PROMPT) == hf_tokens(model, tok, PROMPT)
    train_and_check_live(model, tok, PROMPT, TARGET, TARGETS, LONG)


# ------------------------------------------------------------------ RoPE scaling: as Llama, on both sides
@pytest.mark.engine
@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_rope_scaling_reaches_trainer_and_engine(arch, qwen3_path, mistral_path):
    path = {"qwen3": qwen3_path, "mistral": mistral_path}[arch]
    model, tok = _own_engine(path, rope_scaling={"type": "linear", "factor": 4.0})
    try:
        engine_rope = state_of(model).engine.llm.llm_engine.model_config.hf_config.rope_parameters
        assert engine_rope["rope_type"] == model.config.rope_parameters["rope_type"] == "linear"
        assert engine_rope["factor"] == model.config.rope_parameters["factor"] == 4.0
        assert _logprob_gap(model, tok) < 1e-3
    finally:
        shutdown_engine()
