"""vLLM's utility routes: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``,
``GET /version``, ``GET|POST /ping``.

Same request and response shapes as ``vllm serve`` (so tools that count tokens or probe a vLLM
server work unchanged); behind the API key like every other route. Tokenising runs in a worker
thread, never on the event loop, and a text longer than any prompt could be
(``max_model_len × max_chars_per_token``) is refused before it is tokenised, as for completions, and
so are more tokens to detokenise than ``max_model_len`` (a decode holds the GIL: it would stall
every other request).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from trainserve.server.errors import APIError, bad_request
from trainserve.server.sampling import chat_prompt, max_prompt_text
from trainserve.server.schemas import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest

router = APIRouter()


def _check_model(state: Any, model: str | None) -> None:
    """vLLM checks ``model`` when it is given (404 for one not served)."""
    if model is not None:
        state.models.require(model)


def _tokenize(state: Any, body: TokenizeRequest) -> list[int]:
    tokenizer = state.tokenizer
    if body.prompt is not None:
        text = max_prompt_text(body.prompt, state.max_model_len, state.max_prompt_chars, "prompt")
        add = True if body.add_special_tokens is None else body.add_special_tokens
        return list(tokenizer.encode(text, add_special_tokens=add))
    fields = body.model_dump(
        include={"messages", "add_generation_prompt", "continue_final_message", "chat_template",
                 "chat_template_kwargs"},
        exclude_none=True,
    )
    if body.add_special_tokens is not None:
        fields["add_special_tokens"] = body.add_special_tokens
    try:
        chat = ChatCompletionRequest.model_validate({"model": body.model or state.models.base_name, **fields})
    except ValidationError as exc:  # already validated as a tokenize body: not expected
        raise bad_request(str(exc), param="messages") from exc
    return chat_prompt(
        chat, tokenizer, state.max_model_len, state.max_prompt_chars, state.config.trust_request_chat_template
    )


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> Any:
    state = request.app.state.server
    _check_model(state, body.model)
    ids = await asyncio.to_thread(_tokenize, state, body)
    strs = state.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
    state = request.app.state.server
    _check_model(state, body.model)
    if len(body.tokens) > state.max_model_len:  # the tokenizer's decode holds the GIL throughout
        raise bad_request(
            f"This model's maximum context length is {state.max_model_len} tokens. However, you asked to "
            f"detokenize {len(body.tokens)} tokens.",
            param="tokens",
            code="context_length_exceeded",
        )
    if body.tokens and max(body.tokens) >= state.vocab_size:
        raise bad_request(
            f"token id {max(body.tokens)} is out of vocabulary (size {state.vocab_size})", param="tokens"
        )
    text = await asyncio.to_thread(state.tokenizer.decode, body.tokens)
    return {"prompt": text}


def _jsonable(value: Any) -> Any:
    """vLLM's conversion of a tokenizer's ``init_kwargs`` (``AddedToken`` → its text), and ``str``
    for anything else JSON cannot hold, so an unusual tokenizer cannot turn the answer into a 500."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> Any:
    """vLLM's ``/tokenizer_info`` (its tokenizer_config.json equivalent). Fields naming files or
    directories (``*_file``, ``name_or_path``) are left out: clients never see server paths."""
    tokenizer = request.app.state.server.tokenizer
    config = {
        key: _jsonable(value)
        for key, value in dict(getattr(tokenizer, "init_kwargs", None) or {}).items()
        if not key.endswith(("_file", "_path", "name_or_path"))
    }
    # the transformers class, not the caching subclass vLLM / the engine wrap it in
    cls = next((c for c in type(tokenizer).__mro__ if c.__module__.startswith("transformers.")), type(tokenizer))
    config["tokenizer_class"] = cls.__name__
    if getattr(tokenizer, "chat_template", None):
        config["chat_template"] = tokenizer.chat_template
    return config


@router.get("/version")
async def version() -> Any:
    """vLLM's shape (``version``), with this server's version; the engine's under ``vllm_version``."""
    import vllm

    from trainserve import __version__

    return {"version": __version__, "vllm_version": vllm.__version__}


@router.api_route("/ping", methods=["GET", "POST"])
async def ping(request: Request) -> Response:
    """vLLM's (SageMaker's) liveness probe: an empty 200 while the engine runs, else 503."""
    state = request.app.state.server
    if state.loop.fatal is not None:
        raise APIError(503, "the engine has stopped", code="engine_dead")
    return Response(status_code=200)
