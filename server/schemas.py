"""Request bodies of the OpenAI routes, validated strictly (a wrong JSON type is a 400, not a coercion).

Every field a request may carry is either honoured (with vLLM's semantics for vLLM's extras) or
rejected with a 400 naming it — never accepted and ignored: a field this server does not know is
refused as OpenAI does ("Unrecognized request argument supplied"), and the OpenAI/vLLM features it
cannot honour (beam search, ...) are refused unless their value means
"not used". An explicit ``null`` means the field's default, as in OpenAI and vLLM. Strings that are
not valid Unicode (a lone surrogate such as ``"\\ud800"``, which JSON allows) are a 400.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, model_validator
from trainserve.server.errors import bad_request
from trainserve.server.message_schemas import ChatMessage, StrictModel, check_messages, check_tool_count
from trainserve.server.messages import conversation

TokenId = Annotated[int, Field(ge=0)]
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's and vLLM's bound)
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]

# field → value that is accepted because it means "feature not used"
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "functions": (None, []),
    "function_call": (None, "none"),
    "tool_choice": (None, "none"),
    "suffix": (None, ""),
    "echo": (None, False),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "prompt_logprobs": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "audio": (None,),
    "prediction": (None,),
    "modalities": (None, ["text"]),
    "parallel_tool_calls": (None,),
    "documents": (None, []),
    "length_penalty": (None, 1, 1.0),
    "logprob_token_ids": (None,),
    "logits_processors": (None,),
    "mm_processor_kwargs": (None,),
    "cache_salt": (None,),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
    "prompt_embeds": (None,),
    "request_id": (None,),
    "reasoning_effort": (None,),
    "thinking_token_budget": (None,),
}
# why a field is refused, where the generic "not supported" would leave the client guessing
_WHY = {
    "suffix": "'suffix' (fill-in-the-middle insertion) is not supported by this server",
    "best_of": "'best_of' is not supported (vLLM removed it); use n, or n with logprobs to rank completions",
    # OpenAI's deprecated function calling: vLLM's request model ignores both fields (its serving
    # layer logs them as ignored); mapping only the request would answer in tool_calls, a shape the
    # legacy clients do not read, so they are refused with the replacement
    "functions": "'functions' (OpenAI's deprecated function calling) is not supported: send "
    'tools: [{"type": "function", "function": <each function>}] (chat completions)',
    "function_call": "'function_call' (OpenAI's deprecated function calling) is not supported: send "
    'tool_choice: "auto", "none" or {"type": "function", "function": {"name": <name>}} with tools',
}
_WHY.update(
    {
        f"guided_{kind}": f"'guided_{kind}' is not supported (vLLM replaced it): send "
        f"structured_outputs: {{\"{kind}\": ...}}"
        for kind in ("json", "regex", "choice", "grammar")
    }
)
_LOGIT_BIAS_KEY = re.compile(r"^[0-9]{1,10}$")


_LEAVES = frozenset({int, float, bool, type(None)})  # JSON values that hold no string
# objects and arrays a body may nest: vLLM's JSON schemas nest at most 64 levels, and deeper values
# (a schema, a tool's parameters, chat_template_kwargs) reach Python's recursion limit in copy.deepcopy
# or the template renderer: a 500 instead of a 400
MAX_BODY_DEPTH = 128


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_unicode(value: Any, path: str, depth: int = 0) -> str | None:
    """The path of the first string (key or value) in ``value`` that is not valid Unicode; a 400
    for objects and arrays nested deeper than :data:`MAX_BODY_DEPTH`.

    Runs on the event loop for every body up to ``--max-request-bytes``: numbers are skipped
    without a Python call each (a list of millions of token ids costs milliseconds, not seconds)."""
    if isinstance(value, str):
        return None if _encodes(value) else (path or "body")
    if isinstance(value, (dict, list)) and depth >= MAX_BODY_DEPTH:
        field = path.split(".")[0]
        raise bad_request(
            f"{field} is nested too deeply (more than {MAX_BODY_DEPTH} levels of objects and arrays)", param=field
        )
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not _encodes(key):
                return path or "body"
            if type(item) not in _LEAVES:
                found = _bad_unicode(item, f"{path}.{key}" if path else str(key), depth + 1)
                if found is not None:
                    return found
    elif isinstance(value, list) and not _LEAVES.issuperset(map(type, value)):
        for i, item in enumerate(value):
            if type(item) not in _LEAVES:
                found = _bad_unicode(item, f"{path}.{i}" if path else str(i), depth + 1)
                if found is not None:
                    return found
    return None


class _Request(StrictModel):
    """A whole request body: checked for invalid Unicode before anything else reads it."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _bad_unicode(data, "")
        if where is not None:
            raise bad_request(
                f"{where} is not valid Unicode (it holds a lone surrogate)", param=where, code="invalid_unicode"
            )
        return data


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(StrictModel):
    """OpenAI's ``response_format.json_schema``."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced (a grammar), strict or not


class ResponseFormat(StrictModel):
    """OpenAI's ``response_format``: ``text``, ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise bad_request(
                "response_format of type json_schema needs json_schema.schema", param="response_format.json_schema"
            )
        if self.type != "json_schema" and self.json_schema is not None:
            raise bad_request(
                f"json_schema belongs to response_format type json_schema, not {self.type}",
                param="response_format.json_schema",
            )
        return self


class StructuredOutputs(StrictModel):
    """vLLM's ``structured_outputs``: exactly one constraint, enforced by vLLM's structured-output
    backend. vLLM's per-request ``disable_any_whitespace``, ``disable_additional_properties`` and
    ``whitespace_pattern`` are not accepted: its backends read those from the server's settings,
    so a request's value would be ignored."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        # (not model_dump: it would copy a large JSON schema just to see which fields are set)
        given = [f.alias or k for k, f in type(self).model_fields.items() if getattr(self, k) is not None]
        if len(given) != 1:
            raise bad_request(
                "structured_outputs needs exactly one of json, regex, choice, grammar, json_object"
                + (f" (got {', '.join(given)})" if given else ""),
                param="structured_outputs",
            )
        if self.json_object is False:
            raise bad_request("structured_outputs.json_object must be true when given", param="structured_outputs")
        return self


class SamplingFields(_Request):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions`` (OpenAI and vLLM extras)."""

    model_config = ConfigDict(strict=True, extra="allow")  # unknown fields: refused below, by name

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM extensions
    ignore_eos: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    priority: Int64 = 0
    logit_bias: dict[str, float] | None = None  # OpenAI: token id (as a string) → bias in [-100, 100]
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _reject_unsupported(self) -> SamplingFields:
        extra = self.model_extra or {}
        for name, accepted in _UNSUPPORTED.items():
            if name in extra and not any(extra[name] == ok for ok in accepted):
                raise bad_request(
                    _WHY.get(name, f"{name!r} is not supported by this server"),
                    param=name,
                    code="unsupported_parameter",
                )
        unknown = [name for name in extra if name not in _UNSUPPORTED]
        if unknown:
            raise bad_request(
                f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0], code="unknown_parameter"
            )
        if self.stream_options is not None and self.stream_options.model_fields_set and not self.stream:
            # it would be ignored; vLLM refuses it the same way
            raise bad_request("stream_options can only be given with stream=true", param="stream_options")
        if self.priority != 0:  # vLLM's answer when the engine does not schedule by priority
            raise bad_request(
                "priority is not supported: this server's engine does not use priority scheduling",
                param="priority",
                code="unsupported_parameter",
            )
        for key, bias in (self.logit_bias or {}).items():
            if not _LOGIT_BIAS_KEY.match(key):
                raise bad_request(
                    f"logit_bias keys must be token ids written as strings, got {key!r}", param="logit_bias"
                )
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise bad_request(
                    f"logit_bias[{key!r}] must be between -100 and 100, got {bias}", param="logit_bias"
                )
        fmt = self.response_format
        if fmt is not None and fmt.type != "text" and self.structured_outputs is not None:
            raise bad_request(
                "give either response_format or structured_outputs, not both", param="structured_outputs"
            )
        return self


def _prompt_kind(value: Any) -> str:
    """Which form of ``prompt`` to validate, from its first element: pydantic then checks that form
    alone (a plain union validates a list of millions of token ids against every form, collecting an
    error per element of each failing one, for seconds on the event loop). The tags are not
    identifiers, so error params stay ``prompt.<i>``."""
    if isinstance(value, list) and value:
        first = value[0]
        return "list[str]" if isinstance(first, str) else "list[list]" if isinstance(first, list) else "list[int]"
    return "list[int]" if isinstance(value, list) else "str"


Prompt = Annotated[
    Annotated[str, Tag("str")]
    | Annotated[list[str], Tag("list[str]")]
    | Annotated[list[TokenId], Tag("list[int]")]
    | Annotated[list[list[TokenId]], Tag("list[list]")],
    Discriminator(_prompt_kind),
]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = True  # vLLM: the tokenizer's BOS etc. are added to text prompts
    echo: bool = False  # the prompt (and its logprobs) in front of the completion: see echo.py
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's extra: per-prompt-token logprobs


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # vLLM: the chat template already holds the special tokens
    chat_template: str | None = None  # only with --trust-request-chat-template
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # see tools.py (completions refuse them)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # false: at most one tool call

    @model_validator(mode="before")
    @classmethod
    def _unsupported_message_parts(cls, data: Any) -> Any:
        return check_messages(check_tool_count(data))

    @model_validator(mode="after")
    def _tool_turns(self) -> ChatCompletionRequest:
        conversation(self.messages)  # earlier tool calls and their answers, checked before anything runs
        return self


class LoadLoraRequest(_Request):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False

    @model_validator(mode="after")
    def _no_nul(self) -> LoadLoraRequest:
        if "\x00" in self.lora_path:
            raise bad_request("lora_path must not contain a NUL byte", param="lora_path")
        return self


class UnloadLoraRequest(_Request):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: int | None = None

    @model_validator(mode="after")
    def _by_name_only(self) -> UnloadLoraRequest:
        if self.lora_int_id is not None:  # it would be ignored: refuse it rather than unload by name alone
            raise bad_request(
                "lora_int_id is not supported: adapters are unloaded by lora_name",
                param="lora_int_id",
                code="unsupported_parameter",
            )
        return self


class TokenizeRequest(_Request):
    """vLLM's ``POST /tokenize`` body: a ``prompt`` (``TokenizeCompletionRequest``) or chat
    ``messages`` (``TokenizeChatRequest``, rendered with the chat template as for chat completions)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # vLLM: true for a prompt, false for messages
    return_token_strs: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported_message_parts(cls, data: Any) -> Any:
        return check_messages(data)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give either prompt or messages", param="prompt" if self.prompt is None else "messages")
        if self.prompt is not None:
            for name in ("chat_template", "chat_template_kwargs"):
                if getattr(self, name) is not None:
                    raise bad_request(f"{name} applies to messages, not to a prompt", param=name)
        return self


class DetokenizeRequest(_Request):
    """vLLM's ``POST /detokenize`` body."""

    model: str | None = None
    tokens: list[TokenId]
