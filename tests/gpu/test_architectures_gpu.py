"""Qwen3 and Mistral on CUDA: the patched forward (Triton RMSNorm on q/k heads, in-place Triton RoPE
on the normed q/k, windowed attention) against plain transformers + peft in bf16: loss within 1e-2
relative, LoRA gradients with cosine similarity >= 0.99."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from model_variants import tiny_mistral, tiny_qwen3  # noqa: E402

from trainserve.models.mistral import FastMistralModel  # noqa: E402
from trainserve.models.qwen3 import FastQwen3Model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEV = "cuda"


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    return {"qwen3": tiny_qwen3(tmp_path_factory.mktemp("qwen3")),
            "mistral": tiny_mistral(tmp_path_factory.mktemp("mistral"), sliding_window=64)}


def _lora(path: str, patch_cls=None, gc=False):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(DEV)
    if patch_cls is not None:
        patch_cls.patch_model(m, use_gradient_checkpointing=gc)
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


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
@pytest.mark.parametrize("gc", [False, "unsloth"])
def test_bf16_parity(paths, arch: str, gc) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (4, 256), generator=g).to(DEV)
    labels = ids.clone()
    labels[:, :7] = -100
    patch_cls = {"qwen3": FastQwen3Model, "mistral": FastMistralModel}[arch]
    ro, rg = _step(_lora(paths[arch]), input_ids=ids, labels=labels)
    go, gg = _step(_lora(paths[arch], patch_cls, gc), input_ids=ids, labels=labels)
    assert go.logits is None and torch.isfinite(go.loss)
    assert abs(go.loss.item() - ro.loss.item()) <= 1e-2 * abs(ro.loss.item())
    assert set(gg) == set(rg) and len(gg) == 28
    for n in rg:
        cos = torch.nn.functional.cosine_similarity(gg[n].flatten(), rg[n].flatten(), dim=0)
        assert cos >= 0.99, (n, cos.item())
