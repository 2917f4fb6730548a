"""The bitsandbytes path on the GPU (``quant_backend="bitsandbytes"``): NF4 weights shared by
bitsandbytes training and vLLM's bnb engine.

Skipped without CUDA, vLLM or bitsandbytes. Uses a random-weight model of the Qwen2-0.5B shape.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("vllm")
pytest.importorskip("bitsandbytes")

PROMPT = "The secret phrase is"
TARGET = " open the blue door slowly."
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KW = dict(max_seq_length=512, load_in_4bit=True, quant_backend="bitsandbytes", fast_inference=True,
          gpu_memory_utilization=0.3, max_lora_rank=16)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    from trainserve.random_model import random_qwen2

    return random_qwen2("0.5b", tmp_path_factory.mktemp("qwen2-0.5b"))


def _load(path):
    from trainserve import FastLanguageModel

    return FastLanguageModel.from_pretrained(path, **KW)


def _greedy(model, n=12, **kw):
    from vllm import SamplingParams

    out = model.fast_generate([PROMPT], sampling_params=SamplingParams(max_tokens=n, temperature=0.0), **kw)
    return list(out[0].outputs[0].token_ids)


def test_weights_are_engine_storage_and_4bit(path):
    import bitsandbytes as bnb

    from trainserve.model_api import state_of
    from trainserve.weights import shared_storage_report

    model, _ = _load(path)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.dtype == torch.uint8
    report = shared_storage_report(model, state_of(model).engine.model)
    assert report["separate"] == 0 and report["shared"] > 0


def test_building_the_trainer_adds_no_weight_copy(path):
    _load(path)  # the engine is running after this
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    model, _ = _load(path)  # same spec: engine reused, only the transformers model is built
    torch.cuda.synchronize()
    added = free_before - torch.cuda.mem_get_info()[0]
    packed = sum(p.numel() * p.element_size() for p in model.parameters())
    assert added < 0.05 * packed, f"building the trainer took {added / 2**20:.0f} MiB for {packed / 2**20:.0f} MiB"


def test_changing_a_shared_weight_changes_the_engine(path):
    model, _ = _load(path)
    before = _greedy(model)
    norm = model.model.layers[3].post_attention_layernorm.weight
    saved = norm.detach().clone()
    packed = model.model.layers[3].mlp.down_proj.weight
    saved_packed = packed.detach().clone()
    with torch.no_grad():
        norm.mul_(-4.0)
        packed.copy_(255 - packed)  # flip every NF4 code of one 4-bit layer
    try:
        assert _greedy(model) != before
    finally:
        with torch.no_grad():
            norm.copy_(saved)
            packed.copy_(saved_packed)
    assert _greedy(model) == before


def test_4bit_train_then_generate_parity_and_standby(path):
    from trainserve import FastLanguageModel
    from trainserve.model_api import state_of

    model, tok = _load(path)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, target_modules=ALL7,
                                             use_gradient_checkpointing="unsloth", random_state=0)
    p_ids = tok(PROMPT).input_ids
    t_ids = tok(TARGET).input_ids + [tok.eos_token_id]
    ids = torch.tensor([p_ids + t_ids], device="cuda")
    labels = torch.tensor([[-100] * len(p_ids) + t_ids], device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(80):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.02:
            break
    model.eval()
    live = _greedy(model)
    assert live[: len(t_ids) - 1] == t_ids[:-1]
    standby = state_of(model).engine.standby
    assert standby.enabled and not standby.released  # lazy: generating does not release
    with torch.no_grad():  # a trainer forward does
        hf = model.generate(torch.tensor([p_ids], device="cuda"), max_new_tokens=12, do_sample=False)
    assert live == hf[0, len(p_ids):].tolist()[: len(live)]
    assert standby.released and standby.freed_bytes > 0
    with model.disable_adapter():
        assert _greedy(model)[: len(t_ids) - 1] != t_ids[:-1]
