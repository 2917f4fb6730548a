"""Structured output through vLLM's structured-output backend: OpenAI's ``response_format``
(``json_object``, ``json_schema``) and vLLM's ``structured_outputs`` (json, regex, choice, grammar)
on completions and chat, streamed and not; bad constraints are 400s and the engine keeps serving."""

from __future__ import annotations

import json
import re

import openai
import pytest
from server_support import PROMPTS

pytestmark = pytest.mark.engine

COLORS = {"type": "string", "enum": ["red", "green", "blue"]}


@pytest.fixture(scope="module")
def client(server):
    return server.openai(timeout=120)


def _complete(client, model: str, **extra):
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=24, temperature=0, extra_body=extra)
    return r.choices[0]


def test_structured_outputs_on_completions(client, server):
    plain = _complete(client, server.model).text
    choice = _complete(client, server.model, structured_outputs={"choice": ["alpha", "omega"]})
    assert choice.text in ("alpha", "omega") and choice.finish_reason == "stop"
    regex = _complete(client, "a1", structured_outputs={"regex": "[0-9]{3}-[a-c]{2}"})
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", regex.text), regex.text
    grammar = _complete(client, server.model, structured_outputs={"grammar": 'root ::= "yes" | "no"'})
    assert grammar.text in ("yes", "no")
    schema = _complete(client, server.model, structured_outputs={"json": COLORS})
    assert json.loads(schema.text) in COLORS["enum"]
    assert plain not in (choice.text, regex.text, grammar.text, schema.text)  # the constraint changed the output


def test_response_format_on_chat_streamed_and_not(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "color", "schema": COLORS, "strict": True}}
    messages = [{"role": "user", "content": "Pick a colour"}]
    full = client.chat.completions.create(
        model="a2", messages=messages, max_tokens=24, temperature=0, response_format=fmt
    )
    assert json.loads(full.choices[0].message.content) in COLORS["enum"]
    stream = client.chat.completions.create(
        model="a2", messages=messages, max_tokens=24, temperature=0, response_format=fmt, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == full.choices[0].message.content
    obj = client.chat.completions.create(
        model="a2", messages=messages, max_tokens=8, temperature=0, response_format={"type": "json_object"}
    )
    assert obj.choices[0].message.content.lstrip().startswith("{")
    text = client.chat.completions.create(
        model="a2", messages=messages, max_tokens=8, temperature=0, response_format={"type": "text"}
    )
    plain = client.chat.completions.create(model="a2", messages=messages, max_tokens=8, temperature=0)
    assert text.choices[0].message.content == plain.choices[0].message.content  # text: no constraint
    assert not plain.choices[0].message.content.lstrip().startswith("{")


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"structured_outputs": {"regex": "(["}}, None),
        ({"structured_outputs": {"json": {"type": "nonsense"}}}, None),
        ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, None),
        ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "disable_any_whitespace": True}}, None),
        ({"structured_outputs": {"json": {}}, "response_format": {"type": "json_object"}}, "structured_outputs"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
    ],
)
def test_bad_constraints_are_400_and_the_engine_keeps_serving(client, server, extra, param):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=server.model, prompt="x", max_tokens=2, extra_body=extra)
    if param is not None:
        assert exc.value.body["param"] == param, exc.value.body
    # the engine still serves: a plain request gets its two tokens (ignore_eos: the random tiny model may
    # sample EOS first, which would end a correct request early)
    after = client.completions.create(model=server.model, prompt="x", max_tokens=2, extra_body={"ignore_eos": True})
    assert after.usage.completion_tokens == 2
