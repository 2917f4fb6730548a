"""Tool calling on /v1/chat/completions (``tools``, ``tool_choice``) through vLLM's Hermes tool parser
and vLLM's structured outputs, streamed and not, on a copy of the tiny model whose chat template
renders tools Hermes-style; a template that ignores tools is a 400. The tiny model's text is random,
so every output that is parsed is forced: by ``tool_choice`` (a JSON schema) or a ``structured_outputs``
regex producing ``<tool_call>{json}</tool_call>``."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import openai
import pytest
from server_support import claim, launch_server

pytestmark = pytest.mark.engine

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n{%- endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_REGEX = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}</tool_call>'


def _launch_hermes():
    """A ``trainserve serve`` of a tiny-model copy whose template renders tools (request templates
    allowed, to send the tiny model's own template, which ignores them)."""
    from trainserve import tiny_model

    model = Path(tempfile.mkdtemp(prefix="trainserve-hermes-")) / "tiny-hermes"
    shutil.copytree(tiny_model(), model)
    (model / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    args = ["--served-model-name", "hermes", "--trust-request-chat-template", "--max-model-len", "1024"]
    return launch_server(args, model=str(model))


DEDICATED_SERVER = _launch_hermes  # started with the suite's shared server (server_support.prestart)


@pytest.fixture(scope="module")
def hermes():
    server = claim(__name__, _launch_hermes)
    yield server
    server.stop()
    shutil.rmtree(Path(server.model).parent, ignore_errors=True)


@pytest.fixture(scope="module")
def client(hermes):
    return hermes.openai(timeout=120)


def _no_whitespace(tiny_path: str) -> dict[str, float]:
    """logit_bias banning whitespace-only tokens: JSON grammars allow any whitespace, which a random
    model may emit until max_tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    return {str(i): -100 for i in range(len(tok)) if tok.decode([i]) and not tok.decode([i]).strip()}


def _chat(client, **kwargs):
    args = {"model": "hermes", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 120, "temperature": 0, **kwargs}
    return client.chat.completions.create(**args)


def _streamed(client, **kwargs) -> tuple[str, dict[int, dict], list[str]]:
    """(content, tool calls by index assembled from the deltas, finish reasons) of a streamed chat."""
    content, calls, finishes = "", {}, []
    for chunk in _chat(client, stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or tc.id
            call["name"] += (tc.function.name or "") if tc.function else ""
            call["arguments"] += (tc.function.arguments or "") if tc.function else ""
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    return content, calls, finishes


def test_tools_reach_the_template_and_a_template_without_tools_is_a_400(client, hermes, tiny_path):
    with_tools = _chat(client, tool_choice="none", max_tokens=1).usage.prompt_tokens
    plain = client.chat.completions.create(model="hermes", messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    assert with_tools > plain + 50  # the <tools> block was rendered
    own = (Path(tiny_path) / "chat_template.jinja").read_text()
    with pytest.raises(openai.BadRequestError) as exc:
        _chat(client, extra_body={"chat_template": own})
    assert exc.value.body["param"] == "tools"
    assert "chat template does not support tools" in exc.value.body["message"]


def test_the_tiny_models_own_template_does_not_support_tools(server):
    client = server.openai(timeout=120)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=server.model, messages=MESSAGES, tools=TOOLS, max_tokens=2)
    assert exc.value.body["param"] == "tools" and "does not support tools" in exc.value.body["message"]
    # tool_choice "none" without tools means no tools: accepted, as in OpenAI
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, tool_choice="none", max_tokens=2)
    assert r.choices[0].message.tool_calls is None


def test_named_tool_choice_streamed_and_not(client, tiny_path):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    bias = _no_whitespace(tiny_path)
    full = _chat(client, tool_choice=choice, logit_bias=bias).choices[0]
    assert full.finish_reason == "tool_calls" and full.message.content is None
    (call,) = full.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    content, calls, finishes = _streamed(client, tool_choice=choice, logit_bias=bias)
    assert content == "" and finishes == ["tool_calls"]
    assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == call.function.arguments


def test_required_tool_choice_streamed_and_not(client, tiny_path):
    bias = _no_whitespace(tiny_path)
    full = _chat(client, tool_choice="required", logit_bias=bias, parallel_tool_calls=False).choices[0]
    assert full.finish_reason == "tool_calls", full
    names = {"get_weather", "get_time"}
    assert len(full.message.tool_calls) == 1 and all(c.function.name in names for c in full.message.tool_calls)
    for c in full.message.tool_calls:
        assert isinstance(json.loads(c.function.arguments), dict)
    content, calls, finishes = _streamed(client, tool_choice="required", logit_bias=bias, parallel_tool_calls=False)
    assert finishes == ["tool_calls"] and content == ""
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in full.message.tool_calls
    ]


def test_auto_parses_hermes_tool_calls_streamed_and_not(client):
    forced = {"structured_outputs": {"regex": "Sure\\. " + CALL_REGEX}}
    full = _chat(client, tool_choice="auto", extra_body=forced).choices[0]
    assert full.finish_reason == "tool_calls", full
    assert full.message.content == "Sure. "
    (call,) = full.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    content, calls, finishes = _streamed(client, tool_choice="auto", extra_body=forced)
    assert content == "Sure. " and finishes == ["tool_calls"]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)
    two = {"structured_outputs": {"regex": CALL_REGEX + CALL_REGEX}}
    assert len(_chat(client, extra_body=two, max_tokens=200).choices[0].message.tool_calls) == 2
    one = _chat(client, extra_body=two, max_tokens=200, parallel_tool_calls=False).choices[0].message
    assert len(one.tool_calls) == 1
    # no call in the text: plain content; the default tool_choice with tools is "auto"
    text = _chat(client, extra_body={"structured_outputs": {"regex": "Hello there"}}).choices[0]
    assert text.message.content == "Hello there" and not text.message.tool_calls and text.finish_reason == "stop"
    content, calls, finishes = _streamed(client, extra_body={"structured_outputs": {"regex": "Hello there"}})
    assert content == "Hello there" and not calls and finishes == ["stop"]


def test_tool_choice_none_returns_the_text(client):
    forced = {"structured_outputs": {"regex": CALL_REGEX}}
    full = _chat(client, tool_choice="none", extra_body=forced).choices[0]
    assert full.message.content.startswith("<tool_call>") and not full.message.tool_calls
    assert full.finish_reason == "stop"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),  # without tools
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format"),
        ({"tools": TOOLS, "tool_choice": "required", "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"tools": TOOLS, "chat_template_kwargs": {"tools": TOOLS}}, "chat_template_kwargs.tools"),
    ],
)
def test_tool_requests_that_cannot_work_are_400s(hermes, extra, param):
    with hermes.client() as http:
        r = http.post(
            "/v1/chat/completions", json={"model": "hermes", "messages": MESSAGES, "max_tokens": 2, **extra}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
        r = http.post("/v1/completions", json={"model": "hermes", "prompt": "x", "max_tokens": 2, "tools": TOOLS})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
