"""Likelihood scoring on ``/v1/completions``: ``echo`` and ``prompt_logprobs`` with vLLM's semantics,
checked with the exact requests lm-eval's ``local-completions`` loglikelihood sends and against the
model's own log-softmax."""

from __future__ import annotations

import json

import openai
import pytest
from server_support import PROMPTS

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from trainserve import tiny_model

    return AutoTokenizer.from_pretrained(tiny_model())


@pytest.fixture(scope="module")
def reference():
    """Log-probabilities of each token given the ones before it, from the transformers model."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainserve import tiny_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model(), dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> list[float]:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]

    return logprobs


def _lm_eval_payload(model: str, prompts: list[list[int]]) -> dict:
    """``LocalCompletionsAPI._create_payload(generate=False)`` of lm-eval 0.4."""
    return {
        "model": model,
        "prompt": prompts,
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }


def _parse_logprobs(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """``LocalCompletionsAPI.parse_logprobs`` of lm-eval 0.4: (sum of continuation logprobs, greedy)."""
    token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    top = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    greedy = all(tok == max(t.values()) for tok, t in zip(token_logprobs, top, strict=True))
    return sum(token_logprobs), greedy


def test_lm_eval_loglikelihood_request(http, server, tokenizer, reference):
    pairs = [("The quick brown", " fox jumps over"), ("Once upon a time", " there was a king")]
    requests = []
    for context, continuation in pairs:
        ctx = tokenizer.encode(context)
        requests.append((ctx, ctx + tokenizer.encode(continuation)))
    r = http.post("/v1/completions", json=_lm_eval_payload(server.model, [ids for _, ids in requests]))
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 2
    for choice, (ctx, ids) in zip(choices, requests, strict=True):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing to condition on
        assert choice["text"].startswith(tokenizer.decode(ids))
        total, greedy = _parse_logprobs(choice, len(ctx))
        expected = reference(ids)[len(ctx) - 1 :]
        assert total == pytest.approx(sum(expected), abs=2e-3)
        for got, want in zip(lp["token_logprobs"][1 : len(ids)], reference(ids), strict=True):
            assert got == pytest.approx(want, abs=1e-3)
        for chosen, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            assert len(top) in (1, 2) and chosen in top.values()  # the top-1 and the prompt's own token
        assert isinstance(greedy, bool)


def test_echo_without_generation_through_openai(server, tokenizer):
    client = server.openai(timeout=120)
    text = PROMPTS[1]
    r = client.completions.create(
        model=server.model, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = r.choices[0]
    assert choice.text == text  # the prompt alone
    ids = tokenizer.encode(text)
    assert len(choice.logprobs.tokens) == len(ids) and "".join(choice.logprobs.tokens) == text
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.text_offset[0] == 0
    as_ids = client.completions.create(
        model=server.model, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    assert as_ids.choices[0].text == text
    assert as_ids.choices[0].logprobs.token_logprobs == choice.logprobs.token_logprobs


def test_echoed_prompt_logprobs_agree_with_generation_logprobs(http, server):
    """Two engine paths: logprobs of generated tokens, and the same tokens scored as a prompt."""
    body = {"model": "a1", "prompt": PROMPTS[2], "temperature": 0, "logprobs": 2, "ignore_eos": True}
    plain = http.post("/v1/completions", json={**body, "max_tokens": 6, "return_token_ids": True}).json()
    c = plain["choices"][0]
    prompt_ids = c["prompt_token_ids"]
    echoed = http.post("/v1/completions", json={**body, "max_tokens": 6, "echo": True}).json()["choices"][0]
    assert echoed["text"] == PROMPTS[2] + c["text"]
    n = len(prompt_ids)
    assert echoed["logprobs"]["token_logprobs"][n:] == pytest.approx(c["logprobs"]["token_logprobs"], abs=1e-5)
    scored = http.post(
        "/v1/completions",
        json={**body, "prompt": prompt_ids + c["token_ids"], "max_tokens": 0, "echo": True},
    ).json()["choices"][0]
    got = scored["logprobs"]["token_logprobs"][n:]
    assert got == pytest.approx(c["logprobs"]["token_logprobs"], abs=1e-3)
    # streamed: the first chunk of the choice carries the prompt
    with http.stream("POST", "/v1/completions", json={**body, "max_tokens": 6, "echo": True, "stream": True}) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"].startswith(PROMPTS[2])
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == echoed["text"]
    streamed = [x for ch in chunks for x in ch["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed[0] is None and streamed[1:] == pytest.approx(echoed["logprobs"]["token_logprobs"][1:], abs=1e-5)


def test_prompt_logprobs_field(http, server, tokenizer):
    text = PROMPTS[0]
    ids = tokenizer.encode(text)
    body = {"model": server.model, "prompt": text, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert not choice["text"].startswith(text) and choice["logprobs"] is None
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    echoed = http.post(
        "/v1/completions", json={**body, "prompt_logprobs": None, "echo": True, "logprobs": 0, "max_tokens": 0}
    ).json()["choices"][0]["logprobs"]["token_logprobs"]
    for token_id, entry, want in zip(ids[1:], plp[1:], echoed[1:], strict=True):
        assert str(token_id) in entry and len(entry) <= 3  # the prompt token and the top 2
        assert entry[str(token_id)]["logprob"] == pytest.approx(want, abs=1e-5)
        assert {"logprob", "rank", "decoded_token"} == set(entry[str(token_id)])


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
        ("/v1/completions", {"echo": "yes"}, "echo"),
        ("/v1/chat/completions", {"echo": True}, "echo"),
        ("/v1/chat/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ],
)
def test_bad_scoring_parameters_are_400(http, server, path, extra, param):
    body = {"model": server.model, "max_tokens": 2, **extra}
    body.update({"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError):
        server.openai().completions.create(model=server.model, prompt="x", max_tokens=-1, echo=True)
