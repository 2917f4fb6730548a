"""``logit_bias`` (OpenAI semantics through vLLM's ``SamplingParams.logit_bias``) and the clear 400s
for ``suffix`` and ``best_of`` on a real server."""

from __future__ import annotations

import openai
import pytest
from server_support import PROMPTS

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def client(server):
    return server.openai(timeout=120)


def _greedy_ids(client, model: str, **extra) -> list[int]:
    r = client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True}, **extra,
    )
    return r.choices[0].model_extra["token_ids"]


def test_logit_bias_steers_completions_and_chat(client, server):
    plain = _greedy_ids(client, server.model)
    forced = next(t for t in range(100, 200) if t not in plain)
    assert _greedy_ids(client, server.model, logit_bias={str(forced): 100}) == [forced] * 6
    banned = _greedy_ids(client, server.model, logit_bias={str(plain[0]): -100})
    assert banned[0] != plain[0]
    chat = client.chat.completions.create(
        model="a1", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        logit_bias={str(forced): 100}, extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert chat.choices[0].model_extra["token_ids"] == [forced] * 4


@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"-5": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "between -100 and 100"),
        ({"logit_bias": {"5": -100.5}}, "logit_bias", "between -100 and 100"),
        ({"logit_bias": {"5": "x"}}, "logit_bias", "valid number"),
        ({"logit_bias": {"100000": 1}}, None, "vocab"),
        ({"suffix": "and then"}, "suffix", "fill-in-the-middle"),
        ({"best_of": 2}, "best_of", "use n"),
    ],
)
def test_bad_logit_bias_suffix_best_of_are_400(client, server, extra, param, words):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=server.model, prompt="x", max_tokens=2, extra_body=extra)
    err = exc.value.body
    assert param is None or err["param"] == param, err
    assert words in err["message"], err


def test_neutral_values_are_accepted(client, server):
    base = client.completions.create(model=server.model, prompt="x", max_tokens=3, temperature=0)
    same = client.completions.create(
        model=server.model, prompt="x", max_tokens=3, temperature=0, best_of=1, suffix="", logit_bias={}
    )
    assert same.choices[0].text == base.choices[0].text
