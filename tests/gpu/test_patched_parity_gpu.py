"""Patched vs unpatched Qwen2 on CUDA in bf16, in NF4 (trainserve's own packing, bitsandbytes'
layout) and with bitsandbytes 4-bit when it is installed: loss within 1e-2 relative, LoRA
gradients with cosine similarity >= 0.99."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from trainserve.kernels.nf4 import dequantize_nf4, quantize_linear_nf4_  # noqa: E402

import trainserve  # noqa: E402
from trainserve.models.qwen2 import FastQwen2Model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEV = "cuda"


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return str(trainserve.tiny_model())


def _load(path: str, **kw):
    kw.setdefault("dtype", torch.bfloat16)
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).to(DEV)


def _nf4_(model, dense_copy: bool) -> None:
    """Quantise the seven projections to NF4; with ``dense_copy`` keep them dense (dequantised)."""
    for name, mod in model.named_modules():
        if name.split(".")[-1] in TARGETS:
            quantize_linear_nf4_(mod, 64, True)
            if dense_copy:
                w = dequantize_nf4(mod.weight, mod.weight.quant_state, torch.bfloat16)
                del mod.weight
                mod.weight = torch.nn.Parameter(w, requires_grad=False)


def _lora(m):
    torch.manual_seed(1)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    g = torch.Generator().manual_seed(5)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.copy_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return pm.train()


def _step(model, **inputs):
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(ref, got) -> None:
    (ro, rg), (go, gg) = ref, got
    assert torch.isfinite(go.loss)
    assert abs(go.loss.item() - ro.loss.item()) <= 1e-2 * abs(ro.loss.item())
    assert set(gg) == set(rg) and len(gg) == 28
    for n in rg:
        assert torch.isfinite(gg[n]).all(), n
        cos = torch.nn.functional.cosine_similarity(gg[n].flatten(), rg[n].flatten(), dim=0)
        assert cos >= 0.99, (n, cos.item())


def _batch(bsz: int = 4, seq: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (bsz, seq), generator=g).to(DEV)
    labels = ids.clone()
    labels[:, :7] = -100
    return ids, labels


@pytest.mark.parametrize("gc", [False, True, "unsloth"])
def test_bf16_parity(tiny_path: str, gc) -> None:
    ids, labels = _batch()
    ref = _step(_lora(_load(tiny_path)), input_ids=ids, labels=labels)
    m = _load(tiny_path)
    FastQwen2Model.patch_model(m, use_gradient_checkpointing=gc)
    got = _step(_lora(m), input_ids=ids, labels=labels)
    assert got[0].logits is None
    _compare(ref, got)


@pytest.mark.parametrize("gc", [False, "unsloth"])
def test_nf4_parity_without_bitsandbytes(tiny_path: str, gc) -> None:
    """Packed NF4 base weights (fused dequant+LoRA kernels) vs the same weights dequantised."""
    ids, labels = _batch(seed=1)
    ref_model = _load(tiny_path)
    _nf4_(ref_model, dense_copy=True)
    ref = _step(_lora(ref_model), input_ids=ids, labels=labels)
    m = _load(tiny_path)
    _nf4_(m, dense_copy=False)
    FastQwen2Model.patch_model(m, use_gradient_checkpointing=gc)
    _compare(ref, _step(_lora(m), input_ids=ids, labels=labels))


@pytest.mark.parametrize("gc", [False, "unsloth"])
def test_lora_dropout_unfused_path_parity(tiny_path: str, gc) -> None:
    """Dropout > 0: peft modules run unfused, RoPE through the in-place autograd Function; the
    same seed gives the same dropout masks (checkpointing replays the CUDA RNG state)."""
    ids, labels = _batch(seed=5)

    def lora_drop(m):
        torch.manual_seed(1)
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.1)
        pm = peft.get_peft_model(m, cfg)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.05)
        return pm.train()

    torch.manual_seed(7)
    ref_model = lora_drop(_load(tiny_path))
    torch.manual_seed(123)
    ref = _step(ref_model, input_ids=ids, labels=labels)
    m = _load(tiny_path)
    FastQwen2Model.patch_model(m, use_gradient_checkpointing=gc)
    torch.manual_seed(7)
    fast = lora_drop(m)
    torch.manual_seed(123)
    _compare(ref, _step(fast, input_ids=ids, labels=labels))


def test_bitsandbytes_4bit_parity(tiny_path: str) -> None:
    pytest.importorskip("bitsandbytes")
    q = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    ids, labels = _batch(seed=2)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(
            tiny_path, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0}
        )

    ref = _step(_lora(load()), input_ids=ids, labels=labels)
    m = load()
    FastQwen2Model.patch_model(m, use_gradient_checkpointing="unsloth")
    _compare(ref, _step(_lora(m), input_ids=ids, labels=labels))


def test_packed_varlen_matches_separate(tiny_path: str) -> None:
    ids, _ = _batch(bsz=1, seq=300, seed=3)
    cuts = [0, 100, 170, 300]
    pos = torch.cat([torch.arange(b - a) for a, b in zip(cuts, cuts[1:], strict=False)])[None].to(DEV)
    labels = ids.clone()
    labels[0, cuts[1:-1]] = -100
    ref_model = _lora(_load(tiny_path))
    total = sum(
        ref_model(input_ids=ids[:, a:b], labels=labels[:, a:b], num_items_in_batch=1).loss
        for a, b in zip(cuts, cuts[1:], strict=False)
    )
    total.backward()
    ref_g = {n: p.grad.float().clone() for n, p in ref_model.named_parameters() if p.grad is not None}
    m = _load(tiny_path)
    FastQwen2Model.patch_model(m, use_gradient_checkpointing="unsloth")
    got = _step(_lora(m), input_ids=ids, position_ids=pos, labels=labels, num_items_in_batch=1)
    _compare((type("R", (), {"loss": total})(), ref_g), got)


def test_sliding_window_parity(tiny_path: str) -> None:
    cfg = transformers.AutoConfig.from_pretrained(
        tiny_path, use_sliding_window=True, sliding_window=64, max_window_layers=1,
        layer_types=["full_attention", "sliding_attention"],
    )
    ids, labels = _batch(seed=4)
    ref = _step(_lora(_load(tiny_path, config=cfg)), input_ids=ids, labels=labels)
    m = _load(tiny_path, config=cfg)
    FastQwen2Model.patch_model(m, use_gradient_checkpointing="unsloth")
    _compare(ref, _step(_lora(m), input_ids=ids, labels=labels))


def test_padded_batch_parity_through_varlen(tiny_path: str) -> None:
    """A GRPO-shaped batch (left-padded prompts, right-padded completions) runs varlen attention,
    not SDPA's fp32 math fallback, and matches the unpatched model's loss and LoRA gradients."""
    from trainserve.models.attention import attention_kind_counts

    ids, labels = _batch(seed=6)
    mask = torch.ones_like(ids)
    for row, (left, right) in enumerate([(0, 0), (9, 0), (0, 40), (5, 77)]):
        mask[row, :left] = 0
        if right:
            mask[row, -right:] = 0
    labels[mask == 0] = -100
    labels[1, 9] = labels[3, 5] = -100  # a row's first real token is predicted from padding
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels,
              "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}
    ref = _step(_lora(_load(tiny_path)), **inputs)
    m = _load(tiny_path)
    FastQwen2Model.patch_model(m, use_gradient_checkpointing=False)
    before = attention_kind_counts()
    got = _step(_lora(m), **inputs)
    after = attention_kind_counts()
    assert after.get("varlen", 0) > before.get("varlen", 0)
    assert after.get("masked", 0) == before.get("masked", 0)
    _compare(ref, got)


def _shared_prompt_batch(seed: int):
    """Two prompts (30 and 41 tokens, left-padded) x 8 samples of 1-60 tokens (right-padded), and
    one unrelated row: what a GRPO micro-batch looks like."""
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for plen in (30, 41):
        prompt = torch.randint(3, 500, (plen,), generator=g)
        for _ in range(8):
            n = int(torch.randint(1, 61, (1,), generator=g))
            comp = torch.randint(3, 500, (n,), generator=g)
            rows.append(torch.cat([torch.zeros(41 - plen, dtype=torch.long), prompt, comp,
                                   torch.zeros(60 - n, dtype=torch.long)]))
            masks.append(torch.cat([torch.zeros(41 - plen), torch.ones(plen + n), torch.zeros(60 - n)]))
    rows.append(torch.randint(3, 500, (101,), generator=g))
    masks.append(torch.ones(101))
    ids, mask = torch.stack(rows).to(DEV), torch.stack(masks).long().to(DEV)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :41] = -100  # only completions are scored, as in GRPO
    return ids, mask, labels


@pytest.mark.parametrize("gc", [False, "unsloth"])
def test_shared_prefix_parity_through_varlen(tiny_path: str, gc, monkeypatch) -> None:
    """Each prompt of a GRPO-shaped batch computed once (varlen with gathered keys, aligned at the
    bottom right) matches the unpatched model and the patched model without sharing."""
    from trainserve.models.attention import attention_kind_counts, varlen_bottom_right
    from trainserve.models.shared_prefix import shared_prefix_stats

    assert varlen_bottom_right(torch.device(DEV))
    ids, mask, labels = _shared_prompt_batch(seed=7)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ref = _step(_lora(_load(tiny_path)), **inputs)
    m = _load(tiny_path)
    FastQwen2Model.patch_model(m, use_gradient_checkpointing=gc)
    model = _lora(m)
    before, stats = attention_kind_counts(), shared_prefix_stats()
    got = _step(model, **inputs)
    after = attention_kind_counts()
    assert after.get("shared_prefix", 0) == before.get("shared_prefix", 0) + 1
    computed = shared_prefix_stats()["computed"] - stats.get("computed", 0)
    assert computed == int(mask.sum()) - 7 * 30 - 7 * 41
    _compare(ref, got)
    model.zero_grad(set_to_none=True)
    monkeypatch.setenv("TRAINSERVE_SHARED_PREFIX", "0")
    unshared = _step(model, **inputs)
    assert attention_kind_counts().get("varlen", 0) > after.get("varlen", 0)
    _compare(unshared, got)
