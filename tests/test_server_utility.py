"""vLLM's utility routes (``/tokenize``, ``/detokenize``, ``/version``, ``/ping``), OpenAI's model
retrieve (``/v1/models/{id}``) and FastAPI's ``/docs`` + ``/openapi.json`` on a real server."""

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


def test_tokenize_prompt_and_detokenize(http, server, tokenizer):
    r = http.post("/tokenize", json={"model": server.model, "prompt": PROMPTS[1], "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tokenizer.encode(PROMPTS[1])
    assert body == {
        "count": len(ids),
        "max_model_len": 256,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids),
    }
    plain = http.post("/tokenize", json={"prompt": PROMPTS[1]}).json()  # model is optional, as in vLLM
    assert plain["tokens"] == ids and plain["token_strs"] is None
    back = http.post("/detokenize", json={"model": "a1", "tokens": ids})
    assert back.status_code == 200 and back.json() == {"prompt": PROMPTS[1]}


def test_tokenize_messages_matches_the_chat_prompt(http, server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[0]}]
    tokens = http.post("/tokenize", json={"model": server.model, "messages": messages}).json()["tokens"]
    chat = http.post(
        "/v1/chat/completions",
        json={"model": server.model, "messages": messages, "max_tokens": 1, "return_token_ids": True},
    ).json()
    assert tokens == chat["prompt_token_ids"]
    bare = http.post(
        "/tokenize", json={"messages": messages, "add_generation_prompt": False}
    ).json()["tokens"]
    assert bare != tokens and tokens[: len(bare)] == bare


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "messages"),
        ("/tokenize", {"prompt": "x", "chat_template": "{{ 1 }}"}, 400, "chat_template"),
        ("/tokenize", {"prompt": "x", "whatever": 1}, 400, "whatever"),
        ("/tokenize", {"prompt": "x " * 5000}, 400, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}, 400,
         "chat_template"),
        ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": [1] * 257}, 400, "tokens"),  # > max_model_len: a decode holds the GIL
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
    ],
)
def test_bad_tokenize_requests(http, path, body, status, param):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_tokenizer_info(http, tokenizer):
    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert info["chat_template"] == tokenizer.chat_template
    assert info.get("eos_token") == tokenizer.eos_token
    assert not any(k.endswith(("_file", "name_or_path")) for k in info)  # no server paths
    assert "/" + "root" not in json.dumps(info) and "/tmp/" not in json.dumps(info)


def test_version_and_ping(http):
    import vllm

    from trainserve import __version__

    assert http.get("/version").json() == {"version": __version__, "vllm_version": vllm.__version__}
    for method in ("GET", "POST"):
        r = http.request(method, "/ping")
        assert r.status_code == 200 and r.content == b""


def test_retrieve_model(server):
    client = server.openai()
    listed = {m.id: m for m in client.models.list().data}
    for model_id in ("a1", server.model):  # the base id may hold slashes
        card = client.models.retrieve(model_id)
        assert card.id == model_id and card.model_dump() == listed[model_id].model_dump()
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no-such-model")
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"


def test_openapi_and_docs(http):
    spec = http.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/models/{model_id}"):
        assert path in paths, path
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
