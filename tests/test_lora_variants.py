"""Issue 12, LoRA variants the seed names: ``bias="lora_only"/"all"`` (trainable like peft, saved by
``save_lora``, merged by ``save_pretrained_merged``, reloaded from the saved directory; refused with the
engine, which cannot serve adapter biases), ``loftq_config`` (refused with the engine, which shares the base
LoftQ would rewrite; without the engine peft's LoftQ, which needs bitsandbytes on a GPU), ``use_rslora``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers
from conftest import load_tiny_fast
from helpers import sft
from peft import LoftQConfig, LoraConfig, get_peft_model
from safetensors.torch import load_file

from trainserve import FastLanguageModel, tiny_model

NO_ENGINE = dict(max_seq_length=256, load_in_4bit=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT, TARGET = "The secret phrase is", " open the blue door slowly."
# bias -> (target_modules, the base biases that must become trainable): the tiny Qwen2 has q/k/v biases only.
CASES = {
    "lora_only": (["q_proj", "v_proj", "o_proj", "gate_proj"], ("q_proj", "v_proj")),
    "all": (["o_proj", "gate_proj"], ("q_proj", "k_proj", "v_proj")),
}


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(seed))


def _grads(model, ids) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _biases(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".bias")}


@pytest.mark.parametrize("bias", sorted(CASES))
def test_bias_variants_train_like_peft_and_are_exported(tmp_path, bias: str) -> None:
    targets, trained = CASES[bias]
    model, tok = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, bias=bias, target_modules=targets)
    trainable_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    projections = {next(part for part in n.split(".") if part.endswith("_proj")) for n in trainable_biases}
    assert projections == set(trained) and len(trainable_biases) == 2 * len(trained)
    # The same adapter on plain transformers + peft: loss and every gradient (biases included) agree.
    ref = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_model()),
                         LoraConfig(r=8, lora_alpha=16, bias=bias, target_modules=targets))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    ref.load_state_dict(model.state_dict())
    model.train(), ref.train()
    (loss, grads), (ref_loss, ref_grads) = _grads(model, _ids()), _grads(ref, _ids())
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
    assert set(grads) == set(ref_grads) and trainable_biases <= set(grads)
    for n in ref_grads:
        assert (grads[n] - ref_grads[n]).norm() <= 1e-3 * ref_grads[n].norm(), n
    before = _biases(model)
    sft(model, tok, PROMPT, TARGET, steps=5)
    after = _biases(model)
    assert all(not torch.equal(before[n], after[n]) for n in trainable_biases)
    assert all(torch.equal(before[n], after[n]) for n in set(before) - trainable_biases)
    ids = _ids(9)
    trained_logits = _logits(model, ids)

    model.save_lora(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["bias"] == bias
    saved = {k: v for k, v in load_file(str(tmp_path / "lora" / "adapter_model.safetensors")).items()
             if k.endswith(".bias")}
    assert len(saved) == len(trainable_biases)
    for n in trainable_biases:
        key = next(k for k in saved if k.split(".layers.")[1].replace(".base_layer", "") ==
                   n.split(".layers.")[1].replace(".base_layer", ""))
        assert torch.equal(saved[key], after[n])

    model.save_pretrained_merged(tmp_path / "merged", tok)  # plain transformers loads the trained biases
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (_logits(merged, ids) - trained_logits).abs().max() < 1e-4

    reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "lora"), **NO_ENGINE)
    assert reloaded.peft_config["default"].bias == bias
    assert (_logits(reloaded, ids) - trained_logits).abs().max() < 1e-4


def test_bias_value_is_checked() -> None:
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    with pytest.raises(ValueError, match="bias must be one of"):
        FastLanguageModel.get_peft_model(model, r=4, bias="some")


@pytest.mark.engine
@pytest.mark.parametrize("bias", sorted(CASES))
def test_bias_with_the_engine_is_refused_before_training(bias: str) -> None:
    model, _ = load_tiny_fast()
    engine_biases = _biases(model)
    with pytest.raises(NotImplementedError, match=f"bias='{bias}' with fast_inference=True.*vLLM"):
        FastLanguageModel.get_peft_model(model, r=8, bias=bias)
    assert not hasattr(model, "peft_config")  # nothing was wrapped
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, _biases(model)[n]) for n, v in engine_biases.items())


# ------------------------------------------------------------------ LoftQ
def _loftq_runs_here() -> bool:
    from peft.import_utils import is_bnb_4bit_available

    return torch.cuda.is_available() and is_bnb_4bit_available()


@pytest.mark.engine
@pytest.mark.parametrize("kwargs", [dict(loftq_config=LoftQConfig(loftq_bits=4)),
                                    dict(loftq_config={"loftq_bits": 8, "loftq_iter": 2}),
                                    dict(init_lora_weights="loftq")])
def test_loftq_with_the_engine_is_refused_before_the_base_changes(kwargs) -> None:
    model, _ = load_tiny_fast()
    weight = model.model.layers[0].self_attn.q_proj.weight
    before = weight.detach().clone()
    with pytest.raises(NotImplementedError, match="loftq_config with fast_inference=True.*engine's tensors"):
        FastLanguageModel.get_peft_model(model, r=8, **kwargs)
    assert not hasattr(model, "peft_config") and torch.equal(weight, before)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(loftq_config={"loftq_bits": 3}), ValueError, "loftq_bits must be 4 or 8"),
    (dict(loftq_config={"loftq_iter": 0}), ValueError, "loftq_iter"),
    (dict(loftq_config={"bits": 4}), ValueError, "loftq_config .* is invalid"),
    (dict(loftq_config=LoftQConfig(), init_lora_weights="gaussian"), ValueError, "init_lora_weights='gaussian'"),
    (dict(init_lora_weights="pissa"), NotImplementedError, "init_lora_weights='pissa'"),
])
def test_loftq_arguments_are_checked(kwargs, error, match) -> None:
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    with pytest.raises(error, match=match):
        FastLanguageModel.get_peft_model(model, r=4, **kwargs)


def test_loftq_refuses_a_quantized_base(monkeypatch) -> None:
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    monkeypatch.setattr(model.model.layers[1].mlp.up_proj.weight, "quant_state", object(), raising=False)
    with pytest.raises(ValueError, match="unquantised base.*layers.1.mlp.up_proj.*load_in_16bit=True"):
        FastLanguageModel.get_peft_model(model, r=4, loftq_config=LoftQConfig())


def test_loftq_without_the_engine() -> None:
    """With bitsandbytes on a GPU peft's LoftQ runs: the base becomes its 4-bit copy and A/B start from the
    quantisation error's SVD, so base + LoRA is closer to the original weight than the quantised base alone.
    Elsewhere it is refused, saying what it needs."""
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    if not _loftq_runs_here():
        with pytest.raises(NotImplementedError, match="loftq_config needs bitsandbytes and a CUDA"):
            FastLanguageModel.get_peft_model(model, r=8, lora_alpha=8, loftq_config=LoftQConfig(loftq_bits=4))
        assert not hasattr(model, "peft_config")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=8, target_modules=["q_proj"],
                                                 loftq_config=LoftQConfig(loftq_bits=4))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    quantized = layer.get_base_layer().weight.detach()
    assert not torch.equal(quantized.cpu(), original.cpu())
    with_lora = quantized + layer.get_delta_weight("default")
    assert (with_lora - original.to(with_lora)).norm() < (quantized - original.to(quantized)).norm()


def test_a_saved_loftq_adapter_is_not_reloaded_onto_the_unquantised_base(tmp_path) -> None:
    model, tok = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"])
    model.save_lora(tmp_path / "lora")
    cfg_path = tmp_path / "lora" / "adapter_config.json"  # as peft writes it for a LoftQ-initialised adapter
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "init_lora_weights": "loftq",
                                    "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}))
    with pytest.raises(NotImplementedError, match="LoftQ.*save_pretrained_merged"):
        FastLanguageModel.from_pretrained(str(tmp_path / "lora"), **NO_ENGINE)


def test_use_rslora_is_served_with_its_scale() -> None:
    model, _ = FastLanguageModel.from_pretrained(tiny_model(), **NO_ENGINE)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
    assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 2)
