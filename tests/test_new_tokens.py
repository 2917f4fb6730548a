"""New tokens: ``add_new_tokens`` / ``resize_model_vocab`` train, save, reload, and are served by the
engine from the merged checkpoint (whose vocabulary vLLM pads); with the engine running they are
refused before anything changes (trainserve/vocab.py says why and the route)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import sft_batch

from trainserve import FastLanguageModel, add_new_tokens, tiny_model

NEW = ["<|alpha|>", "<|beta|>", "<|gamma|>"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
PROMPT = "The secret phrase is"


def _load(path: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FastLanguageModel.from_pretrained(path, load_in_4bit=False, max_seq_length=256, **kw)


def _train(model, tok, steps: int = 40) -> None:
    ids, labels = sft_batch(tok, PROMPT, " <|beta|> <|alpha|>")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


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
