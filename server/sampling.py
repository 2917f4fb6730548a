"""From a validated request body to token-id prompts and vLLM ``SamplingParams``.

vLLM checks the sampling values itself (``SamplingParams`` raises for ``n < 1``, ``top_p`` out of
range, ...); its errors become 400s. What vLLM would silently clip (``max_tokens`` past the
context) is checked here.
"""

from __future__ import annotations

from typing import Any

from trainserve.server.errors import bad_request, client_error_types, from_engine_error
from trainserve.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields

MAX_CHOICES = 256  # prompts × n in one request


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 16:
        raise bad_request("at most 16 stop sequences are supported", param="stop")
    if any(s == "" for s in stops):
        raise bad_request("stop sequences must not be empty", param="stop")
    return stops


def completion_prompts(req: CompletionRequest, tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """The request's prompts as token-id lists (one or many; strings are tokenised)."""
    p = req.prompt
    if isinstance(p, str):
        raw: list[Any] = [p]
    elif p and all(isinstance(t, int) for t in p):
        raw = [p]
    else:
        raw = list(p)
    if not raw:
        raise bad_request("prompt must not be empty", param="prompt")
    prompts = []
    for item in raw:
        ids = list(tokenizer.encode(item)) if isinstance(item, str) else list(item)
        if not ids:
            raise bad_request("prompt must not be empty", param="prompt")
        if max(ids) >= vocab_size:
            raise bad_request(f"token id {max(ids)} is out of vocabulary (size {vocab_size})", param="prompt")
        prompts.append(ids)
    if len(prompts) * req.n > MAX_CHOICES:
        raise bad_request(f"prompts × n must be at most {MAX_CHOICES}", param="n")
    return prompts


def chat_prompt(req: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    """Render the messages with the tokenizer's chat template and tokenise them."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            "this model's tokenizer has no chat template; use /v1/completions", param="messages"
        )
    messages = [
        {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages
    ]
    kwargs = dict(req.chat_template_kwargs or {})
    for reserved in ("tokenize", "add_generation_prompt", "continue_final_message", "conversation"):
        kwargs.pop(reserved, None)
    if req.continue_final_message and (req.add_generation_prompt or req.messages[-1].role != "assistant"):
        raise bad_request(
            "continue_final_message needs add_generation_prompt=false and a final assistant message",
            param="continue_final_message",
        )
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            **kwargs,
        )
    except Exception as exc:  # a template that rejects these messages (jinja raise_exception, ...)
        raise bad_request(f"the chat template failed on these messages: {exc}", param="messages") from exc
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise bad_request("the rendered chat prompt is empty", param="messages")
    return ids


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


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None) -> Any:
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
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
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
        return SamplingParams(**values)
    except client_error_types() as exc:
        raise from_engine_error(exc) from exc
