"""Request bodies of the OpenAI routes, validated strictly (a wrong JSON type is a 400, not a coercion).

Unknown *fields* are accepted and ignored, as OpenAI and vLLM do, except the OpenAI features this
server cannot honour (tools, structured output, logit bias, ...): those are rejected with a 400
rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from trainserve.server.errors import bad_request

TokenId = Annotated[int, Field(ge=0)]

# field → value that is accepted because it means "feature not used"
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "functions": (None, []),
    "function_call": (None, "none"),
    "tool_choice": (None, "none"),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "echo": (None, False),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "prompt_logprobs": (None,),
    "structured_outputs": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "audio": (None,),
    "prediction": (None,),
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(_Strict):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions`` (OpenAI and vLLM extras)."""

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

    @model_validator(mode="after")
    def _reject_unsupported(self) -> SamplingFields:
        extra = self.model_extra or {}
        for name, accepted in _UNSUPPORTED.items():
            if name in extra and not any(extra[name] == ok for ok in accepted):
                raise bad_request(
                    f"{name!r} is not supported by this server", param=name, code="unsupported_parameter"
                )
        fmt = extra.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise bad_request(
                "only response_format {'type': 'text'} is supported",
                param="response_format",
                code="unsupported_parameter",
            )
        return self


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=20)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class LoadLoraRequest(_Strict):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadLoraRequest(_Strict):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: int | None = None
