"""The chat messages of a request body (``messages``), strict as every request part is.

Kept apart from :mod:`trainserve.server.schemas` (the request bodies) to keep each module short; the
checks that need the whole conversation (tool calls and their answers) are in
:mod:`trainserve.server.messages`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from trainserve.server.errors import bad_request
from trainserve.server.messages import check_raw_messages

MAX_TOOL_CALL_ID = 256  # characters: OpenAI's ids are ~30, vLLM's ~46
MAX_TOOL_NAME = 256
MAX_TOOLS = 128  # OpenAI's limit on a request's tools


class StrictModel(BaseModel):
    """Base of every request part: a wrong JSON type or an unknown field is a 400, not a coercion."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """``"n": null`` is ``n``'s default (OpenAI and vLLM accept explicit nulls)."""
        if not isinstance(data, dict) or not any(v is None for v in data.values()):
            return data  # (most messages of a long conversation: no per-field work on the event loop)
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if not (v is None and k in fields and not fields[k].is_required() and fields[k].default is not None)
        }


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    """An earlier tool call's function: ``arguments`` a JSON string (OpenAI) or an object (vLLM)."""

    name: str = Field(min_length=1, max_length=MAX_TOOL_NAME)
    arguments: str | dict[str, Any]


class ToolCall(StrictModel):
    """One of an assistant message's ``tool_calls`` (see ``messages.conversation`` for the checks)."""

    id: str = Field(min_length=1, max_length=MAX_TOOL_CALL_ID)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, validate_default=True)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages only
    tool_call_id: str | None = Field(None, max_length=MAX_TOOL_CALL_ID)  # tool messages only

    @field_validator("content")
    @classmethod
    def _content_given(cls, content: Any, info: ValidationInfo) -> Any:
        """A user, system or developer message needs ``content``: a null or missing one is a client error
        (OpenAI's too), not an empty turn. An assistant's may be null (tool calls); a tool message's is
        checked with the tool history (``messages.conversation``)."""
        role = info.data.get("role")
        if content is None and role in ("system", "developer", "user"):
            raise ValueError(f"a {role} message needs content (a string or a list of text parts), got null")
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


def check_messages(data: Any) -> Any:
    """A request's raw ``messages`` checked before pydantic sees them (see ``messages.check_raw_messages``)."""
    return check_raw_messages(data, set(ChatMessage.model_fields))


def check_tool_count(data: Any) -> Any:
    """More than :data:`MAX_TOOLS` tools is a 400 (OpenAI's words and code) before any is validated:
    30,000 tools (6.6 MB) held the event loop and the GIL for 2–3 s — vLLM's tool model, the JSON
    schema of ``tool_choice: "required"`` and the template — stalling every other client."""
    tools = data.get("tools") if isinstance(data, dict) else None
    if isinstance(tools, list) and len(tools) > MAX_TOOLS:
        raise bad_request(
            f"Invalid 'tools': array too long. Expected an array with maximum length {MAX_TOOLS}, but got an "
            f"array with length {len(tools)} instead.",
            param="tools",
            code="array_above_max_length",
        )
    return data
