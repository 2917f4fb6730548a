"""From a validated request body to token-id prompts and vLLM ``SamplingParams``.

vLLM checks the sampling values itself (``SamplingParams`` raises for ``n < 1``, ``top_p`` out of
range, ...); its errors become 400s. What vLLM would silently clip (``max_tokens`` past the
context) is checked here.

A text longer than ``max_model_len × max_chars_per_token`` characters (the longest vocabulary
entry) cannot fit the context whatever its tokens, so it is refused *before* tokenising — vLLM's
own rule (``TokenizeParams._text_len_check``): tokenising a 50 MB prompt just to count it took
minutes and gigabytes. With ``truncate_prompt_tokens`` the text is cut to that bound first.
"""

from __future__ import annotations

from typing import Any

from trainserve.server import chat_template
from trainserve.server.errors import APIError, bad_request, client_error_types, from_engine_error
from trainserve.server.messages import conversation, without_tool_calls
from trainserve.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields

MAX_CHOICES = 256  # prompts × n in one request


def max_chars_per_token(tokenizer: Any) -> int:
    """The most characters one token stands for (vLLM's cached tokenizers carry it)."""
    value = getattr(tokenizer, "max_chars_per_token", None)
    if isinstance(value, int) and value > 0:
        return value
    return max(len(token) for token in tokenizer.get_vocab())


def _too_many_chars(chars: int, max_model_len: int, max_chars: int, param: str) -> Exception:
    return bad_request(
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
        f"contains {chars} characters (more than {max_chars} characters, which is the upper bound "
        f"for {max_model_len} tokens). Please reduce the length of the input prompt.",
        param=param,
        code="context_length_exceeded",
    )


def max_prompt_text(text: str, max_model_len: int, max_chars: int, param: str) -> str:
    """``text``, or a 400 when it is longer than any prompt can be (checked before tokenising)."""
    if len(text) > max_chars:
        raise _too_many_chars(len(text), max_model_len, max_chars, param)
    return text


def _bound_text(text: str, req: SamplingFields, max_model_len: int, max_chars: int, param: str) -> str:
    """Refuse (or, when truncating, cut) a text that cannot fit the context, before tokenising it."""
    if len(text) <= max_chars:
        return text
    if req.truncate_prompt_tokens is None:
        raise _too_many_chars(len(text), max_model_len, max_chars, param)
    return text[:max_chars] if req.truncation_side == "right" else text[-max_chars:]


def truncate(ids: list[int], req: SamplingFields, max_model_len: int) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: keep that many tokens (-1: the context less one), from the
    end of the prompt unless ``truncation_side`` is ``"right"`` (vLLM truncates generation prompts
    on the left)."""
    keep = req.truncate_prompt_tokens
    if keep is None:
        return ids
    if keep > max_model_len:
        raise bad_request(
            f"truncate_prompt_tokens={keep} cannot be greater than max_model_len={max_model_len}. "
            "Please request a smaller truncation size.",
            param="truncate_prompt_tokens",
        )
    if keep < 0:
        keep = max_model_len - 1
    if len(ids) <= keep:
        return ids
    return ids[:keep] if req.truncation_side == "right" else ids[len(ids) - keep :]


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 16:
        raise bad_request("at most 16 stop sequences are supported", param="stop")
    if any(s == "" for s in stops):
        raise bad_request("stop sequences must not be empty", param="stop")
    return stops


def completion_prompts(
    req: CompletionRequest, tokenizer: Any, vocab_size: int, max_model_len: int, max_chars: int
) -> list[list[int]]:
    """The request's prompts as token-id lists (one or many; strings are tokenised, none longer
    than ``max_chars`` characters)."""
    p = req.prompt
    if isinstance(p, str):
        raw: list[Any] = [p]
    elif p and all(isinstance(t, int) for t in p):
        raw = [p]
    else:
        raw = list(p)
    if not raw:
        raise bad_request("prompt must not be empty", param="prompt")
    if len(raw) * req.n > MAX_CHOICES:
        raise bad_request(f"prompts × n must be at most {MAX_CHOICES}", param="n")
    prompts = []
    for item in raw:
        if isinstance(item, str):
            text = _bound_text(item, req, max_model_len, max_chars, "prompt")
            ids = list(tokenizer.encode(text, add_special_tokens=req.add_special_tokens))
        else:
            ids = list(item)
        if ids and max(ids) >= vocab_size:
            raise bad_request(f"token id {max(ids)} is out of vocabulary (size {vocab_size})", param="prompt")
        ids = truncate(ids, req, max_model_len)
        if not ids:
            raise bad_request("prompt must not be empty", param="prompt")
        prompts.append(ids)
    return prompts


def chat_prompt(
    req: ChatCompletionRequest,
    tokenizer: Any,
    max_model_len: int,
    max_chars: int,
    trust_template: bool,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Render the messages with the chat template and tokenise them. A template from the request is
    refused unless ``trust_template``, and then rendered in a limited sandbox process. ``tools`` are
    passed to the template, and earlier tool turns as vLLM passes them (``messages.conversation``); a
    template that renders the same prompt without the tools, or without the assistants' tool calls,
    would drop them silently: a 400."""
    template, template_param = chat_template.requested_template(req)
    if template is not None and not trust_template:
        raise chat_template.refuse_untrusted(template_param or "chat_template")
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            "this model's tokenizer has no chat template; use /v1/completions", param="messages"
        )
    messages, chars = conversation(req.messages)  # earlier tool turns as vLLM renders them
    if chars > max_chars and req.truncate_prompt_tokens is None:  # the template adds, never removes
        raise _too_many_chars(chars, max_model_len, max_chars, "messages")
    kwargs = dict(req.chat_template_kwargs or {})
    kwargs.pop("chat_template", None)
    reserved_kwargs = ("tokenize", "add_generation_prompt", "continue_final_message", "conversation", "messages")
    for reserved in (*reserved_kwargs, "tools"):
        if reserved in kwargs:  # would be overridden or break the call: say so instead of ignoring it
            raise bad_request(
                f"chat_template_kwargs.{reserved} is not accepted"
                + (f"; use the request's {reserved} field" if "_" in reserved or reserved == "tools" else ""),
                param=f"chat_template_kwargs.{reserved}",
                code="unsupported_parameter",
            )
    if req.continue_final_message and (req.add_generation_prompt or req.messages[-1].role != "assistant"):
        raise bad_request(
            "continue_final_message needs add_generation_prompt=false and a final assistant message",
            param="continue_final_message",
        )
    text = _render(req, tokenizer, template, template_param, messages, kwargs, max_chars, tools)
    if tools and text == _render(req, tokenizer, template, template_param, messages, kwargs, max_chars, None):
        raise bad_request(
            "this model's chat template does not support tools (it renders the same prompt without them)",
            param="tools",
            code="unsupported_parameter",
        )
    plain = without_tool_calls(messages)
    if plain is not None and text == _render(req, tokenizer, template, template_param, plain, kwargs, max_chars, tools):
        raise bad_request(
            "this model's chat template does not render the tool_calls of assistant messages (it renders "
            "the same prompt without them)",
            param="messages",
            code="unsupported_parameter",
        )
    text = _bound_text(text, req, max_model_len, max_chars, "messages")
    ids = truncate(list(tokenizer.encode(text, add_special_tokens=req.add_special_tokens)), req, max_model_len)
    if not ids:
        raise bad_request("the rendered chat prompt is empty", param="messages")
    return ids


def _render(
    req: ChatCompletionRequest,
    tokenizer: Any,
    template: str | None,
    template_param: str | None,
    messages: list[dict[str, Any]],
    kwargs: dict[str, Any],
    max_chars: int,
    tools: list[dict[str, Any]] | None,
) -> str:
    """The chat template's text (a request's template in the sandbox process, the model's here)."""
    if tools:
        kwargs = {**kwargs, "tools": tools}
    if template is not None:
        job = {
            "template": template,
            "messages": messages,
            "kwargs": {**tokenizer.special_tokens_map, **kwargs},
            "add_generation_prompt": req.add_generation_prompt,
            "continue_final_message": req.continue_final_message,
            "max_chars": max(max_chars, 1) * 4,
        }
        return chat_template.renderer().render(job, template_param or "chat_template")
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            **kwargs,
        )
    except Exception as exc:  # a template that rejects these messages (jinja raise_exception, ...)
        raise bad_request(f"the chat template failed on these messages: {exc}", param="messages") from exc


def resolve_max_tokens(
    requested: int | None, prompt_lens: list[int], max_model_len: int, param: str, prompt_param: str
) -> int:
    """The output budget: the request's, checked against the context; by default all that is left."""
    longest = max(prompt_lens)
    if requested is not None and requested < 1:
        raise bad_request(f"{param} must be at least 1, got {requested}", param=param)
    if longest >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"has {longest} tokens, which leaves no room for output.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return max_model_len - longest
    if longest + requested > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{longest + requested} tokens ({longest} in the prompt, {requested} for the "
            f"completion). Please reduce the prompt or {param}.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def structured_outputs(req: SamplingFields) -> Any:
    """vLLM ``StructuredOutputsParams`` from ``response_format`` (``json_object``: any JSON object;
    ``json_schema``: that schema) or ``structured_outputs``, as vLLM maps them; None for plain text.
    vLLM's structured-output backend (xgrammar / guidance) compiles and enforces the constraint; it
    checks it when the request is submitted (a bad schema, regex or grammar is a 400)."""
    from vllm.sampling_params import StructuredOutputsParams

    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt is not None and fmt.type == "json_schema":
        assert fmt.json_schema is not None
        return StructuredOutputsParams(json=fmt.json_schema.schema_)
    so = req.structured_outputs
    if so is None:
        return None
    return StructuredOutputsParams(**so.model_dump(exclude_none=True, by_alias=True))


def sampling_params(
    req: SamplingFields, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
) -> Any:
    """vLLM ``SamplingParams`` for the request (DELTA outputs when streaming); vLLM's checks → 400."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    values: dict[str, Any] = dict(
        n=req.n,
        max_tokens=max_tokens,
        seed=req.seed,
        stop=_stop_list(req.stop),
        stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        allowed_token_ids=req.allowed_token_ids,
        bad_words=req.bad_words,
        logit_bias={int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
        output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY,
    )
    optional = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    if req.seed is not None and not -(2**63) <= req.seed < 2**63:
        raise bad_request("seed must fit in a signed 64-bit integer", param="seed")
    try:
        values["structured_outputs"] = structured_outputs(req)
        return SamplingParams(**values)
    except client_error_types() as exc:
        raise _named(from_engine_error(exc), values) from exc


def _named(err: APIError, fields: Any) -> APIError:
    """``err`` with ``param`` set: many of ``SamplingParams``' checks raise a plain ``ValueError``
    (no ``parameter``) whose message starts with the field's name ("top_k must be 0 (disable), or
    at least 1", "n must be 1 when using greedy sampling"); the fields are the request's own names."""
    if err.param is None:
        err.param = next((name for name in fields if err.message.startswith(f"{name} ")), None)
    return err
