"""New tokens: ``add_new_tokens`` / ``resize_model_vocab`` train, save, reload, and are served by the
engine from the merged checkpoint (whose vocabulary vLLM pads); with the engine running they are
refused before anything changes (trainserve/vocab.py says why and the route)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import sft

from trainserve import FastLanguageModel, add_new_tokens, tiny_model

NEW = ["<|alpha|>", "<|beta|>", "<|gamma|>"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
PROMPT = "The secret phrase is"


def _load(path: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FastLanguageModel.from_pretrained(path, load_in_4bit=False, max_seq_length=256, **kw)


def _train(model, tok, steps: int = 40) -> None:
    sft(model, tok, PROMPT, " <|beta|> <|alpha|>", steps=steps, lr=1e-2)


def _greedy(model, tok, n: int = 4) -> list[int]:
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_add_new_tokens_initialises_rows_from_the_old_vocabulary():
    model, tok = _load(tiny_model())
    old = model.get_input_embeddings().weight.detach().clone()
    pieces = tok("<|alpha|>", add_special_tokens=False).input_ids
    add_new_tokens(model, tok, NEW + ["<|alpha|>"])  # a repeat is added once
    assert len(tok) == old.shape[0] + 3 == model.config.vocab_size
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[: old.shape[0]], old)
    want = 0.5 * old.mean(0) + 0.5 * old[pieces].mean(0)
    assert torch.allclose(emb[tok.convert_tokens_to_ids("<|alpha|>")], want, atol=1e-6)


def test_refusals_name_the_argument_and_the_route():
    from trainserve.engine.launch import current_engine

    model, tok = _load(tiny_model())
    peft_model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="add_new_tokens must run before get_peft_model"):
        add_new_tokens(peft_model, tok, NEW)
    with pytest.raises(ValueError, match="smaller"):
        _load(tiny_model(), resize_model_vocab=10)
    before = current_engine()
    with pytest.raises(NotImplementedError, match="resize_model_vocab=600 with fast_inference=True.*merged"):
        _load(tiny_model(), resize_model_vocab=600, fast_inference=True)
    assert current_engine() is before  # refused before an engine started


def test_resize_model_vocab_grows_the_model():
    model, _ = _load(tiny_model(), resize_model_vocab=600)
    assert model.get_input_embeddings().weight.shape[0] == 600 == model.config.vocab_size
    assert not model.get_input_embeddings().weight.requires_grad


@pytest.mark.engine
def test_new_tokens_train_save_reload_and_are_served_from_the_merged_checkpoint(tmp_path):
    from conftest import ENGINE_KWARGS
    from vllm import SamplingParams

    from trainserve import shutdown_engine
    from trainserve.model_api import state_of

    model, tok = _load(tiny_model())
    add_new_tokens(model, tok, NEW)
    model = FastLanguageModel.get_peft_model(model, r=8, target_modules=TARGETS, random_state=0)
    _train(model, tok)
    beta, alpha = tok.convert_tokens_to_ids(["<|beta|>", "<|alpha|>"])
    trained = _greedy(model, tok)
    assert {beta, alpha} <= set(trained) and min(beta, alpha) >= 512  # the new tokens are generated

    model.save_lora(tmp_path / "adapter")  # reload: the base grows to the saved rows
    tok.save_pretrained(tmp_path / "adapter")
    reloaded, tok2 = _load(str(tmp_path / "adapter"))
    assert len(tok2) == len(tok) and _greedy(reloaded, tok2) == trained

    model.save_pretrained_merged(tmp_path / "merged", tok)
    shutdown_engine()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            served, stok = FastLanguageModel.from_pretrained(str(tmp_path / "merged"), **ENGINE_KWARGS)
        engine_rows = state_of(served).engine.model.model.embed_tokens.weight.shape[0]
        assert engine_rows > served.config.vocab_size == len(tok)  # vLLM padded the vocabulary
        out = served.fast_generate([PROMPT], sampling_params=SamplingParams(max_tokens=4, temperature=0,
                                                                            logprobs=0))[0].outputs[0]
        assert list(out.token_ids) == trained
        ids = torch.tensor([stok(PROMPT).input_ids + trained[:-1]])
        with torch.no_grad():
            lp = torch.log_softmax(served(input_ids=ids).logits[0, -len(trained):].float(), -1)
        want = [float(lp[i, t]) for i, t in enumerate(trained)]
        assert [d[t].logprob for t, d in zip(out.token_ids, out.logprobs, strict=True)] == pytest.approx(want, abs=1e-4)
    finally:
        shutdown_engine()


def test_new_tokens_in_existing_padding_rows_are_initialised():
    """A checkpoint's embedding has more rows than its tokenizer (Qwen2: 151,936 for 151,665 tokens):
    the new ids land in padding rows, which must get the mean/interpolation start, not keep zeros."""
    model, tok = _load(tiny_model())
    n = len(tok)
    model.resize_token_embeddings(n + 64, mean_resizing=False)
    matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    with torch.no_grad():
        for weight in matrices.values():
            weight[n:] = 0
    old = {k: w.detach()[:n].clone() for k, w in matrices.items()}
    pieces = {t: tok(t, add_special_tokens=False).input_ids for t in NEW}
    add_new_tokens(model, tok, NEW)
    assert len(tok) == n + 3 and model.get_input_embeddings().weight.shape[0] == n + 64  # no resize needed
    for token in NEW:
        row = tok.convert_tokens_to_ids(token)
        assert n <= row < n + 3
        for key, weight in matrices.items():
            want = 0.5 * old[key].mean(0) + 0.5 * old[key][pieces[token]].mean(0)
            assert weight[row].abs().sum() > 0
            assert torch.allclose(weight[row], want, atol=1e-6)
    for weight in matrices.values():
        assert not weight[n + 3:].any()  # padding beyond the tokenizer is left alone


@pytest.mark.parametrize("bad", [dict(interpolation=2.0), dict(interpolation="half"), dict(method="random")])
def test_a_bad_add_new_tokens_call_leaves_the_tokenizer_unchanged(bad):
    model, tok = _load(tiny_model())
    n, rows = len(tok), model.get_input_embeddings().weight.shape[0]
    with pytest.raises((ValueError, NotImplementedError), match=next(iter(bad))):
        add_new_tokens(model, tok, NEW, **bad)
    assert len(tok) == n and "<|alpha|>" not in tok.get_vocab()
    assert model.get_input_embeddings().weight.shape[0] == rows


@pytest.mark.parametrize(("size", "message"), [(10, "smaller"), ("600", "must be an integer"), (True, "integer")])
def test_resize_model_vocab_is_checked_before_the_model_loads(monkeypatch, size, message):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before resize_model_vocab was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match=f"resize_model_vocab.*{message}|{message}.*resize_model_vocab"):
        _load(tiny_model(), resize_model_vocab=size)
