"""Tool calling on ``/v1/chat/completions``: ``tools`` and ``tool_choice`` as vLLM serves them.

The tools go to the chat template (``apply_chat_template(tools=...)``); a template that renders the
same prompt with and without them does not support tools and the request is a 400 (see
``sampling.chat_prompt``). What the model answers is turned into OpenAI's ``tool_calls`` as vLLM does:

* ``"auto"``: vLLM's Hermes tool parser (``ToolParserManager.get_tool_parser("hermes")``, the one
  vLLM uses for Qwen2/Qwen2.5) extracts ``<tool_call>{json}</tool_call>`` from the text, and streams
  tool-call deltas with ``extract_tool_calls_streaming``;
* a named function or ``"required"``: the output is constrained by vLLM's structured outputs to the
  JSON schema vLLM derives (``get_json_schema_from_tools``: the function's parameters, or an array
  of ``{"name", "parameters"}``), and that JSON becomes the tool calls;
* ``"none"``: the tools are rendered into the prompt and the text is returned as it is.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from trainserve.server.errors import bad_request
from trainserve.server.schemas import ChatCompletionRequest, StructuredOutputs

PARSER = "hermes"  # vLLM's parser for Qwen2 / Qwen2.5 (and Hermes) chat templates


def _vllm_request(body: ChatCompletionRequest) -> Any:
    """vLLM's own ``ChatCompletionRequest`` holding the tools: vLLM validates them and ``tool_choice``."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmRequest

    try:
        return VllmRequest.model_validate(
            {"model": body.model, "messages": [{"role": "user", "content": ""}], "tools": body.tools,
             "tool_choice": "auto" if body.tool_choice is None else body.tool_choice,
             "parallel_tool_calls": body.parallel_tool_calls}
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(part) for part in err.get("loc", ())]
        param = "tool_choice" if loc and loc[0] == "tool_choice" else "tools"
        raise bad_request(f"{param}: {err.get('msg')} (at {'.'.join(loc)})", param=param) from exc
    except Exception as exc:  # vLLM's VLLMValidationError names the parameter
        param = getattr(exc, "parameter", None) or "tool_choice"
        raise bad_request(str(exc), param=param) from exc


class ToolPlan:
    """How one request's output becomes tool calls (``mode``: auto, named, required or none)."""

    def __init__(self, body: ChatCompletionRequest, tokenizer: Any):
        self.request = _vllm_request(body)
        choice = self.request.tool_choice
        self.mode = choice if isinstance(choice, str) else "named"
        self.name = None if isinstance(choice, str) else choice.function.name
        self.tokenizer = tokenizer
        self._parsers: dict[int, Any] = {}
        self._text: dict[int, str] = {}
        self._ids: dict[int, list[int]] = {}
        self._called: set[int] = set()
        self.single = body.parallel_tool_calls is False  # at most one call (auto: the first one)

    @functools.cached_property
    def tools(self) -> list[dict[str, Any]]:
        """The tools as the chat template gets them: vLLM's models dumped, with each function's
        ``parameters`` (already plain JSON) as they are — dumping 6 MB of them took a second
        holding the GIL, the same objects rebuilt."""
        dumped = []
        for tool in self.request.tools:
            item = tool.model_dump(exclude_none=True, exclude={"function": {"parameters"}})
            if tool.function.parameters is not None:
                item["function"]["parameters"] = tool.function.parameters
            dumped.append(item)
        return dumped

    def adjust(self, body: ChatCompletionRequest) -> ChatCompletionRequest:
        """The request as generated: a forced call is constrained to vLLM's JSON schema; with the
        parser, special tokens are kept unless the request says otherwise (vLLM's Hermes parser)."""
        if self.mode in ("named", "required"):
            for field in ("response_format", "structured_outputs"):
                value = getattr(body, field)
                if value is not None and getattr(value, "type", None) != "text":
                    raise bad_request(
                        f"{field} cannot be combined with tool_choice {self.mode!r}: the output is "
                        "constrained to the tool call's JSON schema",
                        param=field,
                    )
            from vllm.tool_parsers.utils import get_json_schema_from_tools

            schema = get_json_schema_from_tools(
                self.request.tool_choice, self.request.tools, self.request.parallel_tool_calls
            )
            so = StructuredOutputs.model_validate({"json": schema})
            return body.model_copy(update={"structured_outputs": so, "response_format": None})
        if self.mode == "auto" and "skip_special_tokens" not in body.model_fields_set:
            return body.model_copy(update={"skip_special_tokens": False})
        return body

    def _parser(self, index: int) -> Any:
        if index not in self._parsers:
            from vllm.tool_parsers import ToolParserManager

            cls = ToolParserManager.get_tool_parser(PARSER)
            self._parsers[index] = cls(self.tokenizer, self.request.tools)
        return self._parsers[index]

    def _forced_calls(self, text: str) -> list[dict[str, Any]] | None:
        """The calls in a forced (named / required) output, or None when it is not complete JSON."""
        from vllm.renderers.chat_utils import make_tool_call_id

        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.mode == "named":
            calls = [(self.name, text)]
        elif isinstance(value, list):
            calls = [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value]
        else:
            return None
        return [
            {"id": make_tool_call_id(), "type": "function", "function": {"name": n, "arguments": a}}
            for n, a in calls
        ]

    def message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """A non-streamed choice's ``message`` and ``finish_reason``."""
        message: dict[str, Any] = {"role": "assistant", "content": text}
        calls = None
        if self.mode in ("named", "required"):
            calls = self._forced_calls(text)
        elif self.mode == "auto":
            info = self._parser(-1).extract_tool_calls(text, self.request)
            if info.tools_called:
                calls = [call.model_dump(exclude_none=True) for call in info.tool_calls]
                calls = calls[:1] if self.single else calls
                message["content"] = info.content
        if not calls:
            return message, finish
        if self.mode != "auto":
            message["content"] = None
        message["tool_calls"] = calls
        return message, "tool_calls"

    def delta(self, index: int, text: str, ids: list[int], finish: str | None) -> tuple[dict[str, Any], str | None]:
        """A streamed chunk's ``delta`` (tool-call deltas as vLLM emits them) and ``finish_reason``."""
        previous, previous_ids = self._text.get(index, ""), self._ids.get(index, [])
        current, current_ids = previous + text, previous_ids + ids
        self._text[index], self._ids[index] = current, current_ids
        delta: dict[str, Any] = {}
        if self.mode == "none":
            delta = {"content": text}
        elif self.mode == "auto":
            msg = self._parser(index).extract_tool_calls_streaming(
                previous, current, text, previous_ids, current_ids, ids, self.request
            )
            if msg is not None:
                delta = {k: v for k, v in msg.model_dump(exclude_none=True).items() if v not in ([], None)}
                delta.pop("role", None)
                if self.single and delta.get("tool_calls"):
                    delta["tool_calls"] = [c for c in delta["tool_calls"] if c.get("index") == 0]
                    delta = {k: v for k, v in delta.items() if v}
                if delta.get("tool_calls"):
                    self._called.add(index)
        elif self.mode == "named":
            from vllm.renderers.chat_utils import make_tool_call_id

            call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
            if not previous and (text or finish is not None):
                call.update(id=make_tool_call_id(), type="function")
                call["function"]["name"] = self.name
                self._called.add(index)
            if text or "id" in call:
                delta = {"tool_calls": [call]}
        elif finish is not None:  # required: the whole array, once it is complete
            calls = self._forced_calls(current)
            if calls:
                delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
                self._called.add(index)
            else:  # cut off: the text as it is, as non-streamed
                delta = {"content": current}
        if finish is not None and index in self._called and self.mode != "none":
            if self.mode != "named" or self._forced_calls(current):
                finish = "tool_calls"
        return delta, finish


def plan(body: ChatCompletionRequest, tokenizer: Any) -> ToolPlan | None:
    """The request's tool plan, or None when it uses no tools (``tool_choice`` alone is a 400)."""
    if not body.tools:
        if body.tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None
    return ToolPlan(body, tokenizer)


def planned(
    body: ChatCompletionRequest, tokenizer: Any
) -> tuple[ToolPlan | None, ChatCompletionRequest, list[dict[str, Any]] | None]:
    """``(plan, the request as generated, the tools for the template)``. Validating, dumping and (for
    a forced call) deriving the schema of large tools takes a while: call it from a worker thread,
    not on the event loop."""
    tools = plan(body, tokenizer)
    if tools is None:
        return None, body, None
    return tools, tools.adjust(body), tools.tools
