"""Issue 12, Qwen2 long context: YaRN declared in a Qwen2 ``config.json`` loads with the same RoPE in the
trainer and the engine; a Llama config with ``llama3`` RoPE too; ``rope_scaling=`` for Qwen2 stays refused
(seed 000) with a message pointing to the config route; RoPE the two sides would read differently is
refused before the engine starts.

The tiny Qwen2 gets ``original_max_position_embeddings=32`` and ``factor=4`` so that the test prompts
(> 32 tokens) run past the original context, where YaRN's interpolated frequencies matter.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from helpers import peft_with_nonzero_b, prompt_logprob_gap, train_and_check_live
from model_variants import tiny_llama, tiny_qwen2_with

from trainserve import FastLanguageModel, FastQwen2Model, tiny_model
from trainserve.engine.launch import current_engine, shutdown_engine
from trainserve.model_api import state_of
from trainserve.models.qwen2 import FastQwen2Model as Qwen2Patch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ORIGINAL, FACTOR = 32, 4.0
YARN = {"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL, "rope_theta": 10000.0}
# Qwen2.5's own spelling (config.json "rope_scaling" with the legacy "type"), as its model card says to add it.
YARN_LEGACY = {"type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL}
MAX_LEN = int(ORIGINAL * FACTOR)
ENGINE = dict(max_seq_length=MAX_LEN, load_in_4bit=False, fast_inference=True, gpu_memory_utilization=0.3,
              max_lora_rank=16)
PROMPT = "The secret phrase is"
TARGET = " open the blue door slowly."
LONG = ("The old bridge over the river reads the map of stars and the small robot writes a secret phrase. " * 4)


def _yarn_qwen2(out, legacy: bool = False) -> str:
    if legacy:
        return tiny_qwen2_with(out, rope_parameters=None, rope_theta=10000.0, rope_scaling=YARN_LEGACY,
                               max_position_embeddings=MAX_LEN)
    return tiny_qwen2_with(out, rope_parameters=YARN, max_position_embeddings=MAX_LEN)


@pytest.fixture(scope="module")
def yarn_path(tmp_path_factory) -> str:
    return _yarn_qwen2(tmp_path_factory.mktemp("yarn"))


@pytest.fixture
def no_engine():
    shutdown_engine()
    yield
    shutdown_engine()


# ------------------------------------------------------------------ trainer: patched vs transformers
def _lora(path: str, patch: bool, **config):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, **config)
    if patch:
        Qwen2Patch.patch_model(m, use_gradient_checkpointing=False)
    pm = peft_with_nonzero_b(m, TARGETS)
    return pm


def _loss_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("legacy", [False, True], ids=["rope_parameters", "rope_scaling"])
def test_qwen2_yarn_config_trainer_matches_transformers(tmp_path, legacy: bool) -> None:
    path = _yarn_qwen2(tmp_path / "q", legacy=legacy)
    ids = torch.randint(3, 500, (2, 3 * ORIGINAL), generator=torch.Generator().manual_seed(0))
    ref, got = _lora(path, patch=False), _lora(path, patch=True)
    rotary = got.get_base_model().model.rotary_emb
    assert rotary.rope_type == "yarn" and "forward" in rotary.__dict__  # the patched rotary forward runs it
    assert rotary.attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(FACTOR)).item() + 1.0)
    with torch.no_grad():
        ref_logits, got_logits = ref(input_ids=ids).logits, got(input_ids=ids).logits
        plain = _lora(tiny_model(), patch=False)(input_ids=ids).logits  # same weights, default RoPE
    assert (plain - ref_logits).abs().max() > 1e-2  # YaRN changes the output: the comparison can fail
    assert (got_logits - ref_logits).abs().max() < 1e-4
    ref_loss, ref_g = _loss_and_grads(ref, ids)
    loss, g = _loss_and_grads(got, ids)
    assert got(input_ids=ids, labels=ids).logits is None  # the fused cross-entropy path ran
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
    assert set(g) == set(ref_g) and g
    for n in ref_g:
        assert (g[n] - ref_g[n]).norm() <= 1e-3 * ref_g[n].norm(), n
    model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=MAX_LEN, load_in_4bit=False)
    assert model.model.rotary_emb.rope_type == "yarn"


def test_rope_scaling_argument_for_qwen2_points_to_the_config_route() -> None:
    for load in (FastLanguageModel.from_pretrained, FastQwen2Model.from_pretrained):
        with pytest.raises(ValueError, match="config.json") as info:
            load(tiny_model(), rope_scaling={"type": "yarn", "factor": 4.0}, load_in_4bit=False)
        assert "rope_scaling" in str(info.value) and "yarn" in str(info.value)


@pytest.mark.parametrize("rope, match", [
    ({**YARN, "beta_fast": 0}, "beta_fast"),                       # transformers: 32, vLLM: 0
    ({**YARN, "factor": 2.0}, "max_position_embeddings"),         # 128 positions, vLLM's table has 64
])
def test_rope_configs_read_differently_are_refused_before_the_engine_starts(no_engine, tmp_path, rope, match):
    path = tiny_qwen2_with(tmp_path / "bad", rope_parameters=rope, max_position_embeddings=MAX_LEN)
    with pytest.raises(ValueError, match=match):
        FastLanguageModel.from_pretrained(path, **ENGINE)
    assert current_engine() is None


# ------------------------------------------------------------------ engine = trainer
def _logprob_gap(model, tokenizer, text: str = LONG) -> float:
    assert ORIGINAL < len(tokenizer(text).input_ids) <= MAX_LEN - 2
    return prompt_logprob_gap(model, tokenizer, text)


def _load(path: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return FastLanguageModel.from_pretrained(path, **ENGINE)


def _engine_rotary(model):
    return state_of(model).engine.model.model.layers[0].self_attn.rotary_emb


@pytest.mark.engine
def test_qwen2_yarn_engine_matches_the_trainer(no_engine, yarn_path) -> None:
    model, tok = _load(yarn_path)
    rotary = _engine_rotary(model)
    assert type(rotary).__name__ == "YaRNScalingRotaryEmbedding"
    assert rotary.mscale == pytest.approx(model.model.rotary_emb.attention_scaling)
    positions = torch.arange(MAX_LEN)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    table = rotary.cos_sin_cache[:MAX_LEN].float()  # vLLM's (positions, cos | sin) table
    assert torch.allclose(table[:, :half], cos[0, :, :half], atol=1e-5)
    assert torch.allclose(table[:, half:], sin[0, :, :half], atol=1e-5)
    assert _logprob_gap(model, tok) < 1e-3
    train_and_check_live(model, tok, PROMPT, TARGET, TARGETS, LONG)


@pytest.mark.engine
def test_llama3_rope_in_a_llama_config_matches_the_engine(no_engine, tmp_path) -> None:
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL}
    path = tiny_llama(tmp_path / "llama3", rope=rope)
    model, tok = _load(path)
    assert model.model.rotary_emb.rope_type == "llama3"
    assert type(_engine_rotary(model)).__name__ == "Llama3RotaryEmbedding"
    default, _ = FastLanguageModel.from_pretrained(tiny_llama(tmp_path / "plain"), max_seq_length=MAX_LEN,
                                                   load_in_4bit=False)
    ids = torch.tensor([tok(LONG).input_ids])
    with torch.no_grad():  # llama3 RoPE changes the output: the parity below can fail
        assert (default(ids).logits - model(ids).logits).abs().max() > 1e-2
    assert _logprob_gap(model, tok) < 1e-3
