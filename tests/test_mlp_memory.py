"""The MLP's gate|up choice (trainserve/models/mlp_memory.py): save it or compute it again, per
layer, within ``TRAINSERVE_MLP_KEEP_GIB``. Whatever is chosen, loss and LoRA gradients must equal
the all-recompute and all-keep runs; the counts say which layers kept what."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import peft_with_nonzero_b

import trainserve
from trainserve.models.mlp_memory import (
    GateUpKeepBudget,
    gate_up_bytes,
    gate_up_counts,
    keep_budget_from_env,
    mlp_recompute_default,
)
from trainserve.models.qwen2 import FastQwen2Model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BSZ, SEQ = 2, 24


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return str(trainserve.tiny_model())


def _peft_model(path: str):
    m = transformers.AutoModelForCausalLM.from_pretrained(path)
    FastQwen2Model.patch_model(m, use_gradient_checkpointing=False)
    pm = peft_with_nonzero_b(m, TARGETS)
    pm.train()
    return pm


def _one_layer_gib(path: str) -> float:
    """One layer's gate|up for a ``BSZ x SEQ`` batch (the tiny model computes in fp32)."""
    cfg = transformers.AutoConfig.from_pretrained(path)
    return BSZ * SEQ * 2 * cfg.intermediate_size * torch.float32.itemsize / 2**30


def _run(pm, forwards: int = 1):
    """``forwards`` forward+backward passes (gradient accumulation); loss, LoRA grads and the
    gate|up counts of the last forward."""
    ids = torch.randint(3, 512, (BSZ, SEQ), generator=torch.Generator().manual_seed(3))
    for _ in range(forwards):
        before = gate_up_counts()
        out = pm(input_ids=ids, labels=ids)
        after = gate_up_counts()
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.grad is not None}
    counts = {k: after[k] - before[k] for k in after}
    return out.loss.detach(), grads, counts


def _model_with(monkeypatch, path: str, recompute: str | None, keep_gib: float | None):
    for var, val in (("TRAINSERVE_MLP_RECOMPUTE", recompute), ("TRAINSERVE_MLP_KEEP_GIB", keep_gib)):
        if val is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, str(val))
    return _peft_model(path)


def test_a_keep_budget_splits_the_layers_and_changes_no_number(tiny_path: str, monkeypatch) -> None:
    ref_model = _model_with(monkeypatch, tiny_path, None, None)
    layers = ref_model.config.num_hidden_layers
    assert layers >= 2
    one_layer_gib = _one_layer_gib(tiny_path)
    runs = {
        "recompute all": (ref_model, {"kept": 0, "recomputed": layers}),
        "keep all": (_model_with(monkeypatch, tiny_path, "0", None), {"kept": layers, "recomputed": 0}),
        # 1.5 layers' worth: the first layer keeps, the second does not fit
        "budget": (_model_with(monkeypatch, tiny_path, None, 1.5 * one_layer_gib),
                   {"kept": 1, "recomputed": layers - 1}),
        "budget, all fit": (_model_with(monkeypatch, tiny_path, "auto", layers * one_layer_gib),
                            {"kept": layers, "recomputed": 0}),
    }
    results = {name: _run(model) for name, (model, _) in runs.items()}
    ref_loss, ref_grads, _ = results["recompute all"]
    assert len(ref_grads) == 2 * 7 * layers
    for name, (loss, grads, counts) in results.items():
        assert counts == runs[name][1], name
        assert torch.equal(loss, ref_loss), name
        assert grads.keys() == ref_grads.keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-6, atol=1e-8, msg=f"{name}: {n}")


def test_the_budget_is_per_forward_and_untouched_without_grad(tiny_path: str, monkeypatch) -> None:
    pm = _model_with(monkeypatch, tiny_path, None, 1.5 * _one_layer_gib(tiny_path))
    assert isinstance(pm.base_model.model.model._trainserve_keep, GateUpKeepBudget)
    _, _, counts = _run(pm, forwards=3)  # each micro-batch starts with the whole budget again
    assert counts == {"kept": 1, "recomputed": pm.config.num_hidden_layers - 1}
    before = gate_up_counts()
    with torch.no_grad():
        pm(input_ids=torch.ones(1, 4, dtype=torch.long))
    assert gate_up_counts() == before  # nothing is saved without autograd: nothing to decide


def test_unpatch_removes_the_budget(tiny_path: str, monkeypatch) -> None:
    monkeypatch.setenv("TRAINSERVE_MLP_KEEP_GIB", "1")
    monkeypatch.delenv("TRAINSERVE_MLP_RECOMPUTE", raising=False)
    m = transformers.AutoModelForCausalLM.from_pretrained(tiny_path)
    FastQwen2Model.patch_model(m, use_gradient_checkpointing=False)
    assert all(isinstance(layer.mlp._trainserve_keep, GateUpKeepBudget) for layer in m.model.layers)
    FastQwen2Model.unpatch_model(m)
    assert not any("_trainserve_keep" in mod.__dict__ for mod in m.modules())
    # with layer checkpointing nothing is recomputed by the MLP: no budget either
    FastQwen2Model.patch_model(m, use_gradient_checkpointing=True)
    assert all(layer.mlp._trainserve_keep is None for layer in m.model.layers)


@pytest.mark.parametrize("var,value", [
    ("TRAINSERVE_MLP_RECOMPUTE", "sometimes"), ("TRAINSERVE_MLP_KEEP_GIB", "-1"),
    ("TRAINSERVE_MLP_KEEP_GIB", "lots"), ("TRAINSERVE_MLP_KEEP_GIB", "nan"), ("TRAINSERVE_MLP_KEEP_GIB", "inf"),
])
def test_bad_settings_are_refused_by_name_when_patching(tiny_path: str, monkeypatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    m = transformers.AutoModelForCausalLM.from_pretrained(tiny_path)
    with pytest.raises(ValueError, match=var):
        FastQwen2Model.patch_model(m, use_gradient_checkpointing=False)


def test_settings_and_sizes(monkeypatch) -> None:
    for value, mode, want in (("auto", False, True), ("auto", True, False), ("", "unsloth", False),
                              ("1", True, True), ("ON", "unsloth", True), ("0", False, False), ("no", False, False)):
        monkeypatch.setenv("TRAINSERVE_MLP_RECOMPUTE", value)
        assert mlp_recompute_default(mode) is want, (value, mode)
    for value, want in (("", None), ("0", None), ("0.0", None), ("2", 2 * 2**30), (" 0.5 ", 2**29)):
        monkeypatch.setenv("TRAINSERVE_MLP_KEEP_GIB", value)
        budget = keep_budget_from_env()
        assert (budget.limit_bytes if budget else None) == want, value
    assert gate_up_bytes(torch.empty(2, 3, 8, dtype=torch.bfloat16), 10, None) == 6 * 10 * 2
    assert gate_up_bytes(torch.empty(6, 8), 10, torch.bfloat16) == 6 * 10 * 2
    b = GateUpKeepBudget(100)
    assert b.take(60) and not b.take(60) and b.take(40) and not b.take(1)
    b.reset()
    assert b.take(100)
    with pytest.raises(ValueError):
        GateUpKeepBudget(-1)
