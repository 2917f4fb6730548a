"""Unsafe and unusual request inputs on a real server (issue 10, items 7–12): every input error is
an OpenAI-shaped 4xx, vLLM's extra parameters are honoured or refused (never ignored), bodies and
prompts are bounded before they cost time, and request-supplied chat templates are refused."""

from __future__ import annotations

import json

import pytest
from server_support import PROMPTS, SHARED_MAX_REQUEST_BYTES, complete

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from trainserve import tiny_model

    return AutoTokenizer.from_pretrained(tiny_model())


def _error(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _chat(server, **extra) -> dict:
    return {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, **extra}


# ---------------------------------------------------------------- item 7: chat-template injection
def test_request_chat_template_is_refused_without_the_trust_flag(http, server):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    for extra, param in (
        ({"chat_template_kwargs": {"chat_template": template}}, "chat_template_kwargs.chat_template"),
        ({"chat_template": template}, "chat_template"),
    ):
        err = _error(http.post("/v1/chat/completions", json=_chat(server, **extra)))
        assert err["param"] == param and err["code"] == "chat_template_not_allowed"
        assert "--trust-request-chat-template" in err["message"]
    # other template variables are still passed to the model's own template; reserved ones are named
    ok = http.post("/v1/chat/completions", json=_chat(server, chat_template_kwargs={"enable_thinking": False}))
    assert ok.status_code == 200, ok.text
    reserved = _chat(server, chat_template_kwargs={"add_generation_prompt": False})
    err = _error(http.post("/v1/chat/completions", json=reserved))
    assert err["param"] == "chat_template_kwargs.add_generation_prompt"


# ---------------------------------------------------------------- item 8: size limits
def test_request_body_over_the_limit_is_413(http, server):
    body = json.dumps({"model": server.model, "prompt": "x" * (SHARED_MAX_REQUEST_BYTES + 10)}).encode()
    err = _error(http.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 413)
    assert err["code"] == "request_too_large" and str(SHARED_MAX_REQUEST_BYTES) in err["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(body), 16384):
            yield body[i : i + 16384]

    err = _error(http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert err["code"] == "request_too_large"
    assert complete(http, server.model, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_too_many_messages_are_refused_before_validating_each(http, server):
    from trainserve.server.messages import MAX_MESSAGES

    messages = [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)
    for path in ("/v1/chat/completions", "/tokenize"):
        err = _error(http.post(path, json={"model": server.model, "messages": messages, "max_tokens": 2}), 400)
        assert err["code"] == "too_many_messages" and err["param"] == "messages", err
    assert complete(http, server.model, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_prompt_longer_than_any_context_is_refused_before_tokenising(http, server, tokenizer):
    long_text = "abc " * 50_000  # 200 kB, under the body limit
    for path, body in (
        ("/v1/completions", {"model": server.model, "prompt": long_text, "max_tokens": 2}),
        ("/v1/chat/completions", _chat(server, messages=[{"role": "user", "content": long_text}])),
    ):
        err = _error(http.post(path, json=body))
        assert err["code"] == "context_length_exceeded" and "characters" in err["message"], err


def test_prompt_check_never_tokenises_more_than_the_bound():
    """Whatever the prompt's size, the tokenizer sees at most max_model_len × max_chars_per_token
    characters (the work no longer grows with the input)."""
    from trainserve.server.errors import APIError
    from trainserve.server.sampling import completion_prompts
    from trainserve.server.schemas import CompletionRequest

    class Recorder:
        max_chars_per_token = 4
        seen: list[tuple[int, bool]] = []

        def encode(self, text, add_special_tokens=True):
            self.seen.append((len(text), add_special_tokens))
            return [1] * max(1, len(text) // 4)

    tok = Recorder()
    bound = 100 * 4
    with pytest.raises(APIError) as exc:
        completion_prompts(CompletionRequest(model="m", prompt="a" * 1_000_000), tok, 512, 100, bound)
    assert exc.value.code == "context_length_exceeded" and tok.seen == []
    req = CompletionRequest(model="m", prompt="a" * 1_000_000, truncate_prompt_tokens=10, add_special_tokens=False)
    ids = completion_prompts(req, tok, 512, 100, bound)
    assert ids == [[1] * 10] and tok.seen == [(bound, False)]


# ---------------------------------------------------------------- item 9: vLLM's extra parameters
def test_allowed_token_ids_and_return_token_ids(http, server, tokenizer):
    r = complete(http, server.model, max_tokens=6, allowed_token_ids=[65], ignore_eos=True, return_token_ids=True)
    choice = r["choices"][0]
    assert choice["token_ids"] == [65] * 6 and choice["text"] == tokenizer.decode([65] * 6)
    assert choice["prompt_token_ids"] == tokenizer.encode(PROMPTS[0])
    body = {"model": server.model, "prompt": PROMPTS[0], "max_tokens": 4, "stream": True, "return_token_ids": True}
    with http.stream("POST", "/v1/completions", json=body) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == tokenizer.encode(PROMPTS[0])
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 4
    chat = http.post("/v1/chat/completions", json=_chat(server, return_token_ids=True)).json()
    assert chat["prompt_token_ids"] and len(chat["choices"][0]["token_ids"]) == chat["usage"]["completion_tokens"]


def test_bad_words_change_the_output(http, server, tokenizer):
    sample = dict(max_tokens=12, ignore_eos=True, return_token_ids=True)
    ids = complete(http, server.model, **sample)["choices"][0]["token_ids"]
    # a generated token that is a whole bad word by itself (vLLM bans a word's last token after its others)
    token = next(t for t in ids if tokenizer.encode(tokenizer.decode([t]).lstrip()) == [t])
    banned = complete(http, server.model, bad_words=[tokenizer.decode([token])], **sample)["choices"][0]
    assert token not in banned["token_ids"] and banned["token_ids"] != ids


def test_truncate_prompt_tokens_keeps_the_last_tokens(http, server, tokenizer):
    ids = tokenizer.encode(PROMPTS[1] + " " + PROMPTS[2])
    r = complete(http, server.model, prompt=PROMPTS[1] + " " + PROMPTS[2], max_tokens=5, truncate_prompt_tokens=3)
    assert r["usage"]["prompt_tokens"] == 3
    def text(**kw) -> str:
        return complete(http, server.model, max_tokens=5, **kw)["choices"][0]["text"]

    assert r["choices"][0]["text"] == text(prompt=ids[-3:])
    assert text(prompt=ids, truncate_prompt_tokens=2, truncation_side="right") == text(prompt=ids[:2])
    body = {"model": server.model, "prompt": "x", "truncate_prompt_tokens": 9999}
    assert _error(http.post("/v1/completions", json=body))["param"] == "truncate_prompt_tokens"


def test_return_tokens_as_token_ids(http, server):
    r = complete(http, server.model, max_tokens=3, logprobs=2, return_tokens_as_token_ids=True, return_token_ids=True)
    choice = r["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(k.startswith("token_id:") for top in choice["logprobs"]["top_logprobs"] for k in top)
    chat = http.post(
        "/v1/chat/completions", json=_chat(server, logprobs=True, top_logprobs=1, return_tokens_as_token_ids=True)
    ).json()
    assert all(e["token"].startswith("token_id:") for e in chat["choices"][0]["logprobs"]["content"])


def test_add_special_tokens_reaches_the_tokenizer():
    from trainserve.server.sampling import chat_prompt, completion_prompts
    from trainserve.server.schemas import ChatCompletionRequest, CompletionRequest

    class Tok:
        chat_template = "x"
        calls: list[bool] = []

        def encode(self, text, add_special_tokens=True):
            self.calls.append(add_special_tokens)
            return [1, 2]

        def apply_chat_template(self, messages, **kwargs):
            return "rendered"

    tok = Tok()
    completion_prompts(CompletionRequest(model="m", prompt="hi"), tok, 10, 100, 1000)
    completion_prompts(CompletionRequest(model="m", prompt="hi", add_special_tokens=False), tok, 10, 100, 1000)
    messages = [{"role": "user", "content": "hi"}]
    chat_prompt(ChatCompletionRequest(model="m", messages=messages), tok, 100, 1000, False)
    chat_prompt(ChatCompletionRequest(model="m", messages=messages, add_special_tokens=True), tok, 100, 1000, False)
    assert tok.calls == [True, False, False, True]  # vLLM's defaults: on for completions, off for chat


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"priority": 5}, "priority"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"logprob_token_ids": [1]}, "logprob_token_ids"),
        ({"allowed_token_ids": [10**6]}, None),
        ({"allowed_token_ids": []}, None),
        ({"stream_options": {"include_usage": True, "whatever": 1}}, "stream_options.whatever"),
    ],
)
def test_parameters_that_cannot_be_honoured_are_400(http, server, extra, param):
    err = _error(http.post("/v1/completions", json={"model": server.model, "prompt": "x", "max_tokens": 2, **extra}))
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("role, content", [("user", None), ("system", None), ("developer", None), ("user", "-")])
def test_a_null_content_is_400_except_for_an_assistant(http, server, role, content):
    message = {"role": role} if content == "-" else {"role": role, "content": content}  # null, or left out
    messages = [message] if role == "user" else [message, {"role": "user", "content": "hi"}]
    err = _error(http.post("/v1/chat/completions", json={"model": server.model, "messages": messages, "max_tokens": 2}))
    assert "needs content" in err["message"] and err["param"] == "messages.0.content", err
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
            {"role": "user", "content": "go"}]
    ok = http.post("/v1/chat/completions", json={"model": server.model, "messages": turn, "max_tokens": 2})
    assert ok.status_code == 200, ok.text[:300]


def test_unload_by_id_is_refused(http):
    err = _error(http.post("/v1/unload_lora_adapter", json={"lora_name": "a1", "lora_int_id": 1}))
    assert err["param"] == "lora_int_id"
    assert "a1" in [m["id"] for m in http.get("/v1/models").json()["data"]]


# ---------------------------------------------------------------- item 10: JSON errors, never plain text
def test_an_empty_body_and_an_unreadable_number_say_what_is_wrong(http, server):
    empty = _error(http.post("/v1/completions", content=b"", headers={"content-type": "application/json"}))
    assert "body is empty" in empty["message"] and empty["code"] == "invalid_json", empty
    huge = json.dumps({"model": server.model, "prompt": "x", "max_tokens": 1}).replace('1}', "9" * 5000 + "}")
    err = _error(http.post("/v1/completions", content=huge.encode(), headers={"content-type": "application/json"}))
    assert "digits" in err["message"] and err["code"] == "invalid_json", err


def test_invalid_unicode_and_nul_bytes_are_json_400(http, server):
    raw = {"content-type": "application/json"}
    cases = [  # json.dumps writes a lone surrogate as the escape "\\ud800", which JSON parsers accept
        ("/v1/completions", json.dumps({"model": server.model, "prompt": "a\ud800b", "max_tokens": 2}), "prompt"),
        ("/v1/completions", json.dumps({"model": "\ud800", "prompt": "x"}), "model"),
        (
            "/v1/chat/completions",
            json.dumps({"model": server.model, "messages": [{"role": "user", "content": "\udfff"}]}),
            "messages.0.content",
        ),
        ("/v1/load_lora_adapter", json.dumps({"lora_name": "n", "lora_path": "a\x00b"}), "lora_path"),
        ("/v1/completions", b'{"model": "x", "prompt": "\xff\xfe"}', None),  # not UTF-8 at all
    ]
    for path, body, param in cases:
        err = _error(http.post(path, content=body, headers=raw))
        if param is not None:
            assert err["param"] == param, (body, err)
    assert complete(http, server.model, max_tokens=2)["usage"]["completion_tokens"] == 2  # same connection


def test_a_body_that_is_not_json_is_a_400_naming_no_field(http, server):
    raw = {"content-type": "application/json"}
    bodies = [b'{"model": ', b"[" * 100_000 + b"]" * 100_000, b'{"model": "x", "prompt": "\xff"}']
    errors = [_error(http.post("/v1/completions", content=body, headers=raw)) for body in bodies]
    for err in errors:  # was param "10" and "10: JSON decode error" (FastAPI's loc is a character offset)
        assert err["param"] is None and err["code"] == "invalid_json", err
        assert err["message"].startswith("We could not parse the JSON body of your request"), err
    assert "at character 10" in errors[0]["message"]
    form = {"content-type": "application/x-www-form-urlencoded"}  # what curl -d sends
    for body, headers in ((b"[1, 2]", raw), (json.dumps({"model": server.model, "prompt": "x"}), form)):
        err = _error(http.post("/v1/completions", content=body, headers=headers))
        assert err["code"] == "invalid_json" and "must be a JSON object" in err["message"], err
        assert headers["content-type"] in err["message"]
    assert complete(http, server.model, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_values_nested_too_deeply_are_a_400(http, server):
    """A 900-level JSON schema was a 500 (RecursionError copying the sampling parameters)."""
    deep = json.loads('{"a":' * 900 + "1" + "}" * 900)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": deep}}
    for path, body, param in [
        ("/v1/chat/completions", _chat(server, response_format=fmt), "response_format"),
        ("/v1/completions", {"model": server.model, "prompt": "x", "structured_outputs": {"json": deep}},
         "structured_outputs"),
        ("/v1/chat/completions", _chat(server, chat_template_kwargs={"x": deep}), "chat_template_kwargs"),
    ]:
        err = _error(http.post(path, json=body))
        assert err["param"] == param and "nested too deeply" in err["message"], err
    assert complete(http, server.model, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_token_id_prompts_cost_no_python_call_per_id(monkeypatch):
    """Validation runs on the event loop: a body of millions of token ids stalled every client for
    seconds (a Unicode check called per id; the prompt union checked every form, one error per id)."""
    from pydantic import ValidationError
    from trainserve.server import schemas

    calls = [0]
    original = schemas._bad_unicode

    def counting(value, path, depth=0):
        calls[0] += 1
        return original(value, path, depth)

    monkeypatch.setattr(schemas, "_bad_unicode", counting)
    ids = [5] * 100_000
    assert schemas.CompletionRequest.model_validate({"model": "m", "prompt": [ids, ids]}).prompt == [ids, ids]
    assert calls[0] < 10
    with pytest.raises(ValidationError) as exc:
        schemas.CompletionRequest.model_validate({"model": "m", "prompt": ids + [-1]})
    assert [e["loc"][-1] for e in exc.value.errors()] == [100_000]  # only the token-id form, one error


def test_unexpected_exceptions_are_json_500_and_the_app_keeps_serving():
    import asyncio
    from types import SimpleNamespace

    import httpx
    from fastapi import FastAPI
    from trainserve.server.app import GateMiddleware
    from trainserve.server.metrics import Metrics
    from trainserve.server.state import ServerConfig

    app = FastAPI()

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    @app.get("/fine")
    async def fine():
        return {"ok": True}

    state = SimpleNamespace(config=ServerConfig("m"), metrics=Metrics(), draining=False, in_flight=0)
    app.add_middleware(GateMiddleware, state=state)

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/boom"), await c.get("/fine")

    boom_r, fine_r = asyncio.run(run())
    assert boom_r.status_code == 500 and boom_r.json()["error"]["code"] == "internal_error"
    assert fine_r.status_code == 200 and state.in_flight == 0


# ---------------------------------------------------------------- item 12: smaller ones
def test_explicit_nulls_mean_the_defaults(http, server):
    body = {"model": server.model, "prompt": PROMPTS[0], "max_tokens": 3, "stream": None, "n": None, "logprobs": None}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    r = http.post("/v1/chat/completions", json=_chat(server, stream=None, n=None, logprobs=None))
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None, r.text


def test_text_offset_follows_the_text_across_partial_utf8_tokens(http, server, tokenizer):
    parts = tokenizer.convert_tokens_to_ids(["Ã", "©"])  # the two bytes of "é", one token each
    r = complete(http, server.model, max_tokens=8, logprobs=1, allowed_token_ids=parts, ignore_eos=True,
                 return_token_ids=True)
    choice = r["choices"][0]
    # vLLM's detokeniser emits text once the pending bytes decode without a trailing "\ufffd"
    expected, emitted, pending = [], 0, b""
    for token in choice["token_ids"]:
        expected.append(emitted)
        pending += bytes([0xC3 if token == parts[0] else 0xA9])
        if not pending.decode("utf-8", "replace").endswith("\ufffd"):
            emitted, pending = emitted + len(pending.decode("utf-8", "replace")), b""
    assert choice["logprobs"]["text_offset"] == expected
    assert emitted == len(choice["text"])


def test_media_content_is_named(http, server):
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    err = _error(http.post("/v1/chat/completions", json=_chat(server, messages=[{"role": "user", "content": image}])))
    assert err["message"] == "image input is not supported by this server" and err["param"] == "messages.0.content"
