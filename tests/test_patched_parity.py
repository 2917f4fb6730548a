"""Patched vs unpatched transformers Qwen2 (the tiny random model, fp32, CPU) with peft LoRA r=8
on all seven projections: same loss, same LoRA gradients, in every checkpointing mode, with
padding, packing and sliding windows; plus the fallbacks and the interface rules."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import peft_with_nonzero_b
from peft import LoraConfig, get_peft_model

import trainserve
from trainserve.models import get_fast_model_class
from trainserve.models.base import FastBaseModel
from trainserve.models.llama import FastLlamaModel
from trainserve.models.qwen2 import FastQwen2Model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return str(trainserve.tiny_model())


def _model(path: str, patch: bool, gc=False, config=None, lora: bool = True, dropout: float = 0.0):
    kwargs = {"config": config} if config is not None else {}
    m = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if patch:
        FastQwen2Model.patch_model(m, use_gradient_checkpointing=gc)
    if not lora:
        return m
    pm = peft_with_nonzero_b(m, TARGETS, dropout)
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
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _compare(ref, got, loss_tol: float = 1e-4) -> None:
    (ref_out, ref_g), (out, g) = ref, got
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref_out.loss.item()) <= loss_tol * abs(ref_out.loss.item())
    assert set(g) == set(ref_g) and len(g) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    for n in ref_g:
        cos = torch.nn.functional.cosine_similarity(g[n].flatten(), ref_g[n].flatten(), dim=0)
        assert cos >= 0.99, n
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
def test_loss_and_lora_grads_match_unpatched(tiny_path: str, gc) -> None:
    ids, labels = _batch()
    ref = _step(_model(tiny_path, False), input_ids=ids, labels=labels)
    got = _step(_model(tiny_path, True, gc), input_ids=ids, labels=labels)
    assert got[0].logits is None  # the fused CE ran
    _compare(ref, got)


def test_fast_path_uses_fused_kernels(tiny_path: str) -> None:
    ids, labels = _batch()
    out = _model(tiny_path, True, False)(input_ids=ids, labels=labels)
    names = _graph_names(out.loss)
    for fn in ("FusedLinearCrossEntropyFunctionBackward", "LoraProjectionsFunctionBackward",
               "LoraMLPFunctionBackward"):
        assert fn in names


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_matches_unpatched(tiny_path: str, side: str) -> None:
    ids, labels = _batch(seed=7)
    mask = torch.ones_like(ids)
    pad = slice(-6, None) if side == "right" else slice(0, 6)
    mask[1, pad] = 0
    labels[1, pad] = -100
    if side == "left":  # the first real token would be predicted from a padding position
        labels[1, 6] = -100
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if side == "left":  # transformers derives positions from the mask only in generate()
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    _compare(_step(_model(tiny_path, False), **inputs), _step(_model(tiny_path, True, "unsloth"), **inputs))


def test_packed_sequences_match_separate_ones(tiny_path: str) -> None:
    """Padding-free packing (position ids restart): the patched model on the packed row gives the
    loss and LoRA gradients of the unpatched model run on each sequence alone."""
    ids, _ = _batch(seed=9, bsz=1, seq=20)
    pos = torch.cat([torch.arange(8), torch.arange(12)])[None]
    labels = ids.clone()
    labels[0, 8] = -100  # sequence 2's first token is not predicted (as DataCollatorWithFlattening)
    ref_model = _model(tiny_path, False)
    total = sum(
        ref_model(input_ids=ids[:, a:b], labels=labels[:, a:b], num_items_in_batch=1).loss
        for a, b in ((0, 8), (8, 20))
    )
    total.backward()
    ref_g = {n: p.grad.clone() for n, p in ref_model.named_parameters() if p.grad is not None}
    for gc in (False, "unsloth"):
        got = _step(_model(tiny_path, True, gc), input_ids=ids, position_ids=pos, labels=labels,
                    num_items_in_batch=1)
        _compare((type("R", (), {"loss": total})(), ref_g), got)


def test_sliding_window_layers_match_unpatched(tiny_path: str) -> None:
    cfg = transformers.AutoConfig.from_pretrained(
        tiny_path, use_sliding_window=True, sliding_window=5, max_window_layers=1,
        layer_types=["full_attention", "sliding_attention"],
    )
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    ids, labels = _batch(seed=11)
    ref = _step(_model(tiny_path, False, config=cfg), input_ids=ids, labels=labels)
    no_window = _step(_model(tiny_path, False), input_ids=ids, labels=labels)
    assert abs(ref[0].loss.item() - no_window[0].loss.item()) > 1e-4  # the window matters here
    _compare(ref, _step(_model(tiny_path, True, "unsloth", config=cfg), input_ids=ids, labels=labels))


def test_logits_without_labels_and_forced_logits(tiny_path: str, monkeypatch) -> None:
    ids, labels = _batch()
    ref = _model(tiny_path, False)
    fast = _model(tiny_path, True, "unsloth")
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, fast(input_ids=ids).logits
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
        keep = fast(input_ids=ids, logits_to_keep=3).logits
        assert keep.shape == (2, 3, 512) and torch.allclose(keep, a[:, -3:], atol=1e-4, rtol=1e-4)
        nb = torch.tensor(50)
        ra = ref(input_ids=ids, labels=labels, num_items_in_batch=nb).loss
        assert abs(fast(input_ids=ids, labels=labels, num_items_in_batch=nb).loss - ra) < 1e-4 * ra
        monkeypatch.setenv("TRAINSERVE_RETURN_LOGITS", "1")
        forced = fast(input_ids=ids, labels=labels)
        assert forced.logits is not None and torch.allclose(forced.logits, a, atol=1e-4, rtol=1e-4)
        monkeypatch.delenv("TRAINSERVE_RETURN_LOGITS")
        fast.get_base_model().trainserve_return_logits = True
        assert fast(input_ids=ids, labels=labels).logits is not None


def test_disabled_adapter_dropout_and_generation_fall_back(tiny_path: str) -> None:
    ids, labels = _batch()
    base = _model(tiny_path, False, lora=False).eval()
    fast = _model(tiny_path, True, "unsloth").eval()
    with torch.no_grad(), fast.disable_adapter():
        assert torch.allclose(fast(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    gen_ref = _model(tiny_path, False).eval().generate(ids[:1, :6], max_new_tokens=4, do_sample=False)
    gen_fast = fast.generate(ids[:1, :6], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen_ref, gen_fast)
    # LoRA dropout > 0 in training: the projections run as peft modules (unfused), RoPE and
    # attention still patched; same seed, same masks (checkpointing replays the RNG state).
    ref_drop = _model(tiny_path, False, dropout=0.1)
    torch.manual_seed(123)
    ref = _step(ref_drop, input_ids=ids, labels=labels)
    drop = _model(tiny_path, True, "unsloth", dropout=0.1)
    torch.manual_seed(123)
    got = _step(drop, input_ids=ids, labels=labels)
    assert "LoraMLPFunctionBackward" not in _graph_names(got[0].loss)
    _compare(ref, got)


def test_base_weights_views_of_a_fused_tensor_are_used_in_place(tiny_path: str) -> None:
    ids, labels = _batch()
    ref = _step(_model(tiny_path, False), input_ids=ids, labels=labels)
    m = transformers.AutoModelForCausalLM.from_pretrained(tiny_path)
    ptrs = []
    for layer in m.model.layers:  # q/k/v become row slices of one fused qkv tensor, like vLLM's
        at = layer.self_attn
        fused = torch.cat([at.q_proj.weight.data, at.k_proj.weight.data, at.v_proj.weight.data])
        rows = [0, at.q_proj.out_features, at.q_proj.out_features + at.k_proj.out_features, fused.shape[0]]
        for i, proj in enumerate((at.q_proj, at.k_proj, at.v_proj)):
            proj.weight = torch.nn.Parameter(fused[rows[i] : rows[i + 1]], requires_grad=False)
            ptrs.append((proj.weight, proj.weight.data_ptr()))
    FastQwen2Model.patch_model(m, use_gradient_checkpointing="unsloth")
    torch.manual_seed(1)
    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    g = torch.Generator().manual_seed(5)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.copy_(0.05 * torch.randn(p.shape, generator=g))
    pm.train()
    _compare(ref, _step(pm, input_ids=ids, labels=labels))
    layer0 = pm.get_base_model().model.layers[0].self_attn
    assert layer0.q_proj.base_layer.weight is ptrs[0][0]
    assert all(w.data_ptr() == p and w.grad is None for w, p in ptrs)


def test_unpatch_restores_transformers_forwards(tiny_path: str) -> None:
    m = _model(tiny_path, True, "unsloth", lora=False)
    assert "forward" in m.__dict__ and "forward" in m.model.layers[0].self_attn.__dict__
    FastQwen2Model.patch_model(m)  # idempotent
    FastQwen2Model.unpatch_model(m)
    assert not any("forward" in mod.__dict__ for mod in m.modules())
    ids, labels = _batch()
    assert m(input_ids=ids, labels=labels).logits is not None


def test_interface_and_rope_scaling_rejection(tiny_path: str) -> None:
    assert get_fast_model_class("qwen2") is FastQwen2Model
    assert get_fast_model_class("llama") is FastLlamaModel
    # the architectures share a base and do not depend on each other
    assert issubclass(FastQwen2Model, FastBaseModel) and not issubclass(FastQwen2Model, FastLlamaModel)
    with pytest.raises(NotImplementedError, match="gemma"):
        get_fast_model_class("gemma")
    FastQwen2Model.pre_patch()
    FastQwen2Model.pre_patch()  # idempotent
    cfg = transformers.AutoConfig.from_pretrained(tiny_path)
    FastQwen2Model.validate_config(cfg)
    with pytest.raises(ValueError, match="Qwen2 does not support the rope_scaling argument.*config.json"):
        FastQwen2Model.validate_config(cfg, rope_scaling={"type": "linear", "factor": 2.0})
    # RoPE scaling the config itself declares (YaRN for long context, seed 001) is allowed:
    # tests/test_rope_yarn.py checks trainer and engine against transformers.
    scaled = transformers.AutoConfig.from_pretrained(tiny_path, rope_parameters={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0})
    FastQwen2Model.validate_config(scaled)
    FastQwen2Model.patch_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_path, config=scaled))
    with pytest.raises(ValueError, match="unsloth"):
        FastQwen2Model.patch_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_path), "sometimes")
