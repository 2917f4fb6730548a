"""Chat messages as the chat template sees them, with earlier tool turns checked strictly.

A second tool turn from a real client (the openai SDK appending ``response.choices[0].message``,
LangChain's agents) carries an assistant message with ``tool_calls`` (``content`` often null) and
then one ``{"role": "tool", "tool_call_id", "content"}`` message per answered call. They are
rendered as vLLM renders them (``vllm.renderers.chat_utils``): an assistant's null content is
``""``, ``function.arguments`` (a JSON string in OpenAI's API) becomes the dict that tool-calling
templates such as Qwen2.5's expect (``tool_call.arguments | tojson``), and a tool message keeps its
``tool_call_id``. Unlike vLLM, which logs a warning and substitutes ``{}`` for arguments that are
not a JSON object, and renders a ``tool`` message whatever id it names, such conversations are a
400 naming the field: every field is either honoured or refused, and this server never emits such
arguments or ids itself.
"""

from __future__ import annotations

import json
from typing import Any

from trainserve.server.errors import bad_request

MAX_TOOL_CALLS = 128  # per assistant message (OpenAI allows at most 128 tools in a request)
# characters of one earlier call's ``function.arguments`` string: parsed before the prompt length is known
MAX_TOOL_ARGUMENTS = 1 << 20
# the kinds of content part OpenAI and vLLM accept besides text, by the name used in the error
_MEDIA_PARTS = {"image_url": "image", "image": "image", "input_image": "image", "input_audio": "audio",
                "audio_url": "audio", "video_url": "video", "file": "file"}
# legacy or unsupported message fields → what to send instead
_INSTEAD = {
    "function_call": "the legacy function_call is not supported: send tool_calls "
    '([{"id", "type": "function", "function": {"name", "arguments"}}])',
}


MAX_MESSAGES = 4096
"""Messages per chat or tokenize request (each costs at least a few template tokens, so a request past
this cannot fit any context trainserve serves; hosted OpenAI-compatible APIs cap it lower)."""


def check_raw_messages(data: Any, fields: set[str]) -> Any:
    """Name what a message holds that this server cannot honour (media parts, the legacy
    ``function`` role and ``function_call``) instead of pydantic's union error ("Input should be a
    valid string (and 2 more)"); drop fields other than ``fields`` that are empty (``"refusal":
    null`` as the openai SDK sends back)."""
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        return data
    if len(data["messages"]) > MAX_MESSAGES:
        # checked before pydantic validates each one: 200K tiny messages (6 MB) stalled every client ~2 s
        raise bad_request(f"at most {MAX_MESSAGES} messages per request, got {len(data['messages'])}",
                          param="messages", code="too_many_messages")
    messages = []
    for i, message in enumerate(data["messages"]):
        if isinstance(message, dict):
            content = message.get("content")
            for part in content if isinstance(content, list) else []:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind in _MEDIA_PARTS:
                    raise bad_request(
                        f"{_MEDIA_PARTS[kind]} input is not supported by this server",
                        param=f"messages.{i}.content",
                        code="unsupported_content",
                    )
            if message.get("role") == "function":
                raise bad_request(
                    "the legacy 'function' role is not supported: answer a tool call with "
                    '{"role": "tool", "tool_call_id": <the call\'s id>, "content": <the result>}',
                    param=f"messages.{i}.role",
                    code="unsupported_parameter",
                )
            extra = [k for k in message if k not in fields]
            for key in extra:
                if message[key] not in (None, [], ""):
                    raise bad_request(
                        f"messages.{i}.{key}: " + _INSTEAD.get(key, "not supported by this server"),
                        param=f"messages.{i}.{key}",
                        code="unsupported_parameter",
                    )
            if extra:
                message = {k: v for k, v in message.items() if k not in extra}
        messages.append(message)
    return {**data, "messages": messages}


def _arguments(value: str | dict[str, Any], param: str) -> dict[str, Any]:
    """``function.arguments`` as the dict chat templates render (vLLM: ``""`` means ``{}``)."""
    if isinstance(value, dict):
        return value
    if len(value) > MAX_TOOL_ARGUMENTS:
        raise bad_request(f"{param} is longer than {MAX_TOOL_ARGUMENTS} characters", param=param)
    if not value.strip():
        return {}
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise bad_request(f"{param} is not valid JSON ({exc})", param=param) from exc
    except RecursionError as exc:  # "[[[[..." deeper than Python's recursion limit: not a ValueError
        raise bad_request(f"{param} is nested too deeply to parse as JSON", param=param) from exc
    if not isinstance(parsed, dict):
        raise bad_request(f"{param} must be a JSON object, got {type(parsed).__name__}", param=param)
    return parsed


def _arguments_chars(value: str | dict[str, Any]) -> int:
    return len(value) if isinstance(value, str) else len(json.dumps(value, ensure_ascii=False))


def _template_call(call: Any, param: str, ids: dict[str, bool]) -> dict[str, Any]:
    if call.id in ids:
        raise bad_request(f"{param}.id {call.id!r} is used by an earlier tool call", param=f"{param}.id")
    ids[call.id] = False
    args = _arguments(call.function.arguments, f"{param}.function.arguments")
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}


def conversation(messages: list[Any]) -> tuple[list[dict[str, Any]], int]:
    """The messages as the chat template takes them, and how many characters they carry (content,
    tool-call names, ids and arguments: a text longer than any prompt is refused before rendering).

    400s (naming ``messages.<i>.<field>``): ``tool_calls`` on a message that is not the assistant's,
    more than :data:`MAX_TOOL_CALLS` calls in one message, a call id used twice, arguments that are not
    a JSON object (or nested too deeply for Python's parser, or longer than :data:`MAX_TOOL_ARGUMENTS`), a
    tool message without content or ``tool_call_id``, a ``tool_call_id`` that no earlier assistant tool
    call has (or that was answered already), ``tool_call_id`` on another role.
    """
    out: list[dict[str, Any]] = []
    answered: dict[str, bool] = {}  # tool call id → answered by a tool message yet
    chars = 0
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        text = m.text()
        item: dict[str, Any] = {"role": m.role, "content": text}
        chars += len(text)
        if m.name:
            item["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise bad_request(f"{where}.tool_calls: only assistant messages carry tool calls",
                                  param=f"{where}.tool_calls")
            if len(m.tool_calls) > MAX_TOOL_CALLS:
                raise bad_request(f"{where}.tool_calls: at most {MAX_TOOL_CALLS} tool calls in one message",
                                  param=f"{where}.tool_calls")
            item["tool_calls"] = [_template_call(c, f"{where}.tool_calls.{j}", answered)
                                  for j, c in enumerate(m.tool_calls)]
            chars += sum(len(c.id) + len(c.function.name) + _arguments_chars(c.function.arguments)
                         for c in m.tool_calls)
        if m.role == "tool":
            if m.content is None:
                raise bad_request(f"{where}.content: a tool message needs content (the tool's result)",
                                  param=f"{where}.content")
            call_id = m.tool_call_id
            if call_id is None:
                raise bad_request(
                    f"{where}.tool_call_id: a tool message needs the id of the assistant tool call it answers",
                    param=f"{where}.tool_call_id",
                )
            if call_id not in answered:
                known = ", ".join(repr(k) for k in list(answered)[:8]) or "none"
                raise bad_request(
                    f"{where}.tool_call_id {call_id[:64]!r} does not answer a tool call of an earlier "
                    f"assistant message (their ids: {known})",
                    param=f"{where}.tool_call_id",
                )
            if answered[call_id]:
                raise bad_request(f"{where}.tool_call_id {call_id!r} was answered by an earlier tool message",
                                  param=f"{where}.tool_call_id")
            answered[call_id] = True
            item["tool_call_id"] = call_id
            chars += len(call_id)
        elif m.tool_call_id:  # "" or null on another role: not used, as before
            raise bad_request(f"{where}.tool_call_id: only tool messages answer a tool call",
                              param=f"{where}.tool_call_id")
        out.append(item)
    return out, chars


def without_tool_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The messages with assistant ``tool_calls`` left out, or None when there are none: a template
    that renders both alike ignores the calls (the tiny model's does), which is a 400, not a silent
    drop of the conversation's tool turns."""
    if not any("tool_calls" in m for m in messages):
        return None
    return [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
