"""Multi-turn tool conversations on /v1/chat/completions, as the openai SDK and LangChain send them:
an assistant message with ``tool_calls`` (``content: null``) followed by ``tool`` messages answering
them. The server is a copy of the tiny model with Qwen2.5's own chat template (TRL ships it): each
prompt is compared token for token with transformers' rendering of the messages as vLLM passes them
(arguments as a dict, ``tool_call_id`` on tool messages). Hostile histories are 400s naming the
field; the legacy ``functions`` / ``function_call`` fields are 400s naming their replacement."""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import openai
import pytest
from server_support import claim, launch_server
from test_server_tools import MESSAGES, TOOLS, _no_whitespace

pytestmark = pytest.mark.engine

MAX_BYTES = 256 * 1024
WEATHER_CALL = {"type": "function", "function": {"name": "get_weather"}}
RESULT = '{"temperature_c": 21, "sky": "clear"}'


def _qwen_template() -> str:
    return resources.files("trl").joinpath("chat_templates/qwen2_5.jinja").read_text()


def _launch_qwen():
    from trainserve import tiny_model

    model = Path(tempfile.mkdtemp(prefix="trainserve-qwen-template-")) / "tiny-qwen25"
    shutil.copytree(tiny_model(), model)
    (model / "chat_template.jinja").write_text(_qwen_template())
    args = ["--served-model-name", "qwen", "--max-model-len", "1024", "--max-request-bytes", str(MAX_BYTES),
            "--trust-request-chat-template"]
    return launch_server(args, model=str(model))


DEDICATED_SERVER = _launch_qwen  # started with the suite's shared server (server_support.prestart)


@pytest.fixture(scope="module")
def qwen():
    """``trainserve serve`` of a tiny-model copy whose chat template is Qwen2.5's (tools, tool calls,
    ``<tool_response>``), and its tokenizer for rendering the expected prompts locally. Request
    templates are allowed, to check the sandboxed renderer with tool turns too."""
    from transformers import AutoTokenizer

    server = claim(__name__, _launch_qwen)
    server.tokenizer = AutoTokenizer.from_pretrained(server.model)
    server.template = _qwen_template()
    yield server
    server.stop()
    shutil.rmtree(Path(server.model).parent, ignore_errors=True)


@pytest.fixture(scope="module")
def client(qwen):
    return qwen.openai(timeout=120)


def _expected_ids(tokenizer, messages: list[dict], tools=TOOLS) -> list[int]:
    """transformers' rendering of ``messages`` written the way vLLM hands them to the template."""
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def _first_turn(client, tiny_path, stream: bool) -> dict:
    """Turn one: the model calls get_weather (forced). Returns the assistant message to send back —
    the SDK's own message object, or (streamed) the dict a client assembles from the deltas."""
    args = dict(model="qwen", messages=MESSAGES, tools=TOOLS, tool_choice=WEATHER_CALL, max_tokens=120,
                temperature=0, logit_bias=_no_whitespace(tiny_path))
    if not stream:
        message = client.chat.completions.create(**args).choices[0].message
        assert message.tool_calls and message.content is None
        return message
    call = {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
    for chunk in client.chat.completions.create(stream=True, **args):
        for tc in chunk.choices[0].delta.tool_calls or []:
            call["id"] = call["id"] or tc.id
            call["function"]["name"] += tc.function.name or ""
            call["function"]["arguments"] += tc.function.arguments or ""
    return {"role": "assistant", "content": None, "tool_calls": [call]}


@pytest.mark.parametrize("stream", [False, True])
def test_a_second_tool_turn_renders_as_transformers_and_vllm_do(client, qwen, tiny_path, stream):
    assistant = _first_turn(client, tiny_path, stream)
    call = assistant.tool_calls[0] if not stream else None
    call_id = call.id if call is not None else assistant["tool_calls"][0]["id"]
    arguments = call.function.arguments if call is not None else assistant["tool_calls"][0]["function"]["arguments"]
    messages = [*MESSAGES, assistant, {"role": "tool", "tool_call_id": call_id, "content": RESULT}]
    expected = _expected_ids(qwen.tokenizer, [
        *MESSAGES,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.loads(arguments)}}
        ]},
        {"role": "tool", "tool_call_id": call_id, "content": RESULT},
    ])
    rendered = qwen.tokenizer.decode(expected)
    city = json.loads(arguments)["city"]
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>' in rendered
    assert f"<tool_response>\n{RESULT}\n</tool_response>" in rendered
    args = dict(model="qwen", messages=messages, tools=TOOLS, max_tokens=6, temperature=0,
                extra_body={"return_token_ids": True})
    if not stream:
        answer = client.chat.completions.create(**args)
        assert answer.model_extra["prompt_token_ids"] == expected
        assert answer.usage.prompt_tokens == len(expected)
        assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
        return
    prompt_ids, finishes, usage = None, [], None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args):
        prompt_ids = prompt_ids or (chunk.model_extra or {}).get("prompt_token_ids")
        finishes += [c.finish_reason for c in chunk.choices if c.finish_reason]
        usage = chunk.usage or usage
    assert prompt_ids == expected and usage.prompt_tokens == len(expected)
    assert len(finishes) == 1


def test_parallel_calls_object_arguments_and_text_parts_render_like_vllm(qwen):
    """Two calls in one assistant message, answered by two tool messages (Qwen2.5 puts both in one
    user turn); ``arguments`` as an object (vLLM accepts it), ``""`` (no arguments: ``{}``, as in
    vLLM), tool content as text parts (joined), the assistant's own text kept."""
    sent = [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": ""}},
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": [{"type": "text", "text": "sunny"}]},
        {"role": "tool", "tool_call_id": "call_b", "content": "12:00", "name": "get_time"},
    ]
    expected = _expected_ids(qwen.tokenizer, [
        sent[0],
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": {}}},
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "12:00", "name": "get_time"},
    ], tools=None)
    assert "</tool_response>\n<tool_response>" in qwen.tokenizer.decode(expected)
    with qwen.client() as http:
        r = http.post("/tokenize", json={"model": "qwen", "messages": sent})
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == expected
        r = http.post("/v1/chat/completions", json={"model": "qwen", "messages": sent, "max_tokens": 2,
                                                    "return_token_ids": True})
        assert r.status_code == 200, r.text
        assert r.json()["prompt_token_ids"] == expected
        # the same template sent by the request renders in the sandbox process, alike
        r = http.post("/tokenize", json={"model": "qwen", "messages": sent, "chat_template": qwen.template})
        assert r.status_code == 200 and r.json()["tokens"] == expected, r.text


def _history(assistant: dict | None = None, *tool_messages: dict) -> list[dict]:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    assistant = assistant or {"role": "assistant", "content": None, "tool_calls": [call]}
    return [*MESSAGES, assistant, *(tool_messages or ({"role": "tool", "tool_call_id": "call_1", "content": "ok"},))]


def _assistant(*calls: dict) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


def _call(call_id: str = "call_1", arguments=None, **function) -> dict:
    args = '{"city": "Rome"}' if arguments is None else arguments
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": args, **function}}


HUGE = 100_000  # characters: more than 1024 tokens can hold, less than the 256 KiB body limit


@pytest.mark.parametrize(
    "messages, param, words",
    [
        (_history(None, {"role": "tool", "tool_call_id": "call_9", "content": "x"}), "messages.2.tool_call_id",
         ["does not answer a tool call", "'call_1'"]),
        (_history(None, {"role": "tool", "content": "x"}), "messages.2.tool_call_id", ["needs the id"]),
        (_history(None, {"role": "tool", "tool_call_id": "call_1", "content": "x"},
                  {"role": "tool", "tool_call_id": "call_1", "content": "y"}), "messages.3.tool_call_id",
         ["answered by an earlier tool message"]),
        ([{"role": "tool", "tool_call_id": "call_1", "content": "x"}, *_history()], "messages.0.tool_call_id",
         ["does not answer"]),
        (_history(None, {"role": "tool", "tool_call_id": "call_1"}), "messages.2.content", ["needs content"]),
        (_history(_assistant(_call(arguments='{"city": '))), "messages.1.tool_calls.0.function.arguments",
         ["not valid JSON"]),
        (_history(_assistant(_call(arguments="[1, 2]"))), "messages.1.tool_calls.0.function.arguments",
         ["must be a JSON object, got list"]),
        (_history(_assistant(_call(arguments=7))), "messages.1.tool_calls.0.function.arguments", []),
        (_history(_assistant(_call(arguments="[" * HUGE))), "messages.1.tool_calls.0.function.arguments",
         ["nested too deeply"]),  # json.loads raises RecursionError, not ValueError
        (_history(_assistant(_call(), _call())), "messages.1.tool_calls.1.id", ["used by an earlier tool call"]),
        (_history(_assistant({**_call(), "type": "web_search"})), "messages.1.tool_calls.0.type", []),
        (_history(_assistant(_call("c" * 300))), "messages.1.tool_calls.0.id", []),
        (_history(_assistant({"id": "call_1", "type": "function", "function": {"arguments": "{}"}})),
         "messages.1.tool_calls.0.function.name", []),
        (_history(_assistant(*(_call(f"call_{i}") for i in range(129)))), "messages.1.tool_calls",
         ["at most 128"]),
        ([{"role": "user", "content": "hi", "tool_calls": [_call()]}], "messages.0.tool_calls",
         ["only assistant messages"]),
        ([{"role": "user", "content": "hi", "tool_call_id": "call_1"}], "messages.0.tool_call_id",
         ["only tool messages"]),
        ([*MESSAGES, {"role": "function", "name": "get_weather", "content": "x"}], "messages.1.role",
         ["'function' role", "tool_call_id"]),
        ([*MESSAGES, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}],
         "messages.1.function_call", ["send tool_calls"]),
        (_history(None, {"role": "tool", "tool_call_id": "call_1", "content": "x" * HUGE}), "messages",
         ["maximum context length"]),
        (_history(_assistant(_call(arguments=json.dumps({"city": "x" * HUGE})))), "messages",
         ["maximum context length"]),
    ],
)
def test_hostile_tool_histories_are_400s_naming_the_field(qwen, messages, param, words):
    with qwen.client() as http:
        for route, extra in (("/v1/chat/completions", {"tools": TOOLS, "max_tokens": 2}), ("/tokenize", {})):
            r = http.post(route, json={"model": "qwen", "messages": messages, **extra})
            assert r.status_code == 400, (route, r.text)
            error = r.json()["error"]
            assert error["param"] == param, (route, error)
            for word in words:
                assert word in error["message"], (route, error)
        assert http.get("/health").status_code == 200


def test_tool_call_arguments_longer_than_the_cap_are_refused_before_parsing(monkeypatch):
    """The cap (1 MiB by default, under the 8 MiB default body limit) is checked before anything else:
    even blank arguments (otherwise ``{}``) over it are refused."""
    from trainserve.server import messages
    from trainserve.server.errors import APIError
    from trainserve.server.message_schemas import ChatMessage

    monkeypatch.setattr(messages, "MAX_TOOL_ARGUMENTS", 64)
    history = [ChatMessage.model_validate(m) for m in _history(_assistant(_call(arguments=" " * 65)))]
    with pytest.raises(APIError, match="longer than 64 characters") as error:
        messages.conversation(history)
    assert error.value.status == 400 and error.value.param == "messages.1.tool_calls.0.function.arguments"


def test_a_body_over_the_limit_is_413_and_the_server_keeps_serving(client, qwen):
    messages = _history(None, {"role": "tool", "tool_call_id": "call_1", "content": "x" * (MAX_BYTES + 1)})
    with qwen.client() as http:
        r = http.post("/v1/chat/completions", json={"model": "qwen", "messages": messages, "max_tokens": 2})
        assert r.status_code == 413, r.text
    answer = client.chat.completions.create(model="qwen", messages=_history(), tools=TOOLS, max_tokens=2)
    assert answer.usage.completion_tokens >= 1


def test_a_template_that_ignores_tool_calls_is_a_400(server):
    """The tiny model's own template renders role and content only: the calls would vanish."""
    with server.client() as http:
        r = http.post("/v1/chat/completions", json={"model": server.model, "messages": _history(), "max_tokens": 2})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "messages"
        assert "does not render the tool_calls" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "field, value, replacement",
    [
        ("functions", [{"name": "get_weather", "parameters": {"type": "object"}}], '"type": "function"'),
        ("function_call", "auto", "tool_choice"),
        ("function_call", {"name": "get_weather"}, "tool_choice"),
    ],
)
def test_legacy_function_calling_fields_are_400s_naming_the_replacement(client, field, value, replacement):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=2, **{field: value})
    error = exc.value.body
    assert error["param"] == field and error["code"] == "unsupported_parameter", error
    assert "deprecated function calling" in error["message"] and replacement in error["message"], error
    # the values that mean "not used" are accepted, as before
    ok = client.chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=2, extra_body={
        "functions": [], "function_call": "none"})
    assert ok.choices[0].message.tool_calls is None
