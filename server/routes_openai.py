"""``POST /v1/completions`` and ``POST /v1/chat/completions``, streaming (SSE) and not."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from trainserve.server.echo import (
    EchoPlan,
    check_output_logprobs,
    check_prompt_logprobs,
    engine_prompt_logprobs,
    format_prompt_logprobs,
    prompt_texts,
)
from trainserve.server.errors import APIError, engine_failure, error_body
from trainserve.server.generation import (
    ClientDisconnected,
    RequestGroup,
    TextCursor,
    chat_logprobs,
    completion_logprobs,
)
from trainserve.server.sampling import chat_prompt, completion_prompts, resolve_max_tokens, sampling_params
from trainserve.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from trainserve.server.tools import ToolPlan, planned

VERSION_HEADER = "x-trainserve-adapter-version"
router = APIRouter()


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: Any = None  # completions: dict of lists; chat: list of entries
    cursor: TextCursor | None = None  # completions: text_offset of the next token
    token_ids: list[int] = field(default_factory=list)
    started: bool = False


class _Run:
    """Turns engine outputs into OpenAI response objects (``chat`` or ``completion``)."""

    def __init__(
        self,
        state: Any,
        body: SamplingFields,
        chat: bool,
        group: RequestGroup,
        prompts: list[list[int]],
        logprobs: int | None,
        echo: EchoPlan | None = None,
        with_prompt_logprobs: bool = False,
        tools: ToolPlan | None = None,
    ):
        self.state, self.body, self.chat, self.group = state, body, chat, group
        self.tools = tools
        self.constraint: str | None = None  # the field that constrains the output (named in its errors)
        self.echo = echo
        self.with_prompt_logprobs = with_prompt_logprobs
        self.prompt_lps: dict[int, Any] = {}  # prompt index → the engine's prompt logprobs
        self.prompts = prompts
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.as_ids = bool(body.return_tokens_as_token_ids)
        self.return_ids = bool(body.return_token_ids)
        self.sent_prompt_ids = False
        self.logprobs = logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices: dict[int, _Choice] = {}
        self.started = time.perf_counter()
        self.first_token = False

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _header(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": self.group.label,
        }

    def usage(self) -> dict[str, int]:
        completion = sum(c.tokens for c in self.choices.values())
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def absorb(self, prompt_index: int, output: Any) -> list[tuple[int, Any, Any, str | None, list[int]]]:
        """Record one engine output; return ``(choice, text, logprobs, finish_reason, token ids)`` per
        completion."""
        deltas = []
        tt = self.state.token_text
        for out in output.outputs:
            index = prompt_index * self.body.n + out.index
            choice = self.choices.setdefault(index, _Choice())
            if output.prompt_logprobs and prompt_index not in self.prompt_lps:  # once (DELTA: first output)
                self.prompt_lps[prompt_index] = output.prompt_logprobs
            text, ids, lps = out.text, list(out.token_ids), out.logprobs
            if self.echo is not None:
                text, ids, lps = self.echo.prefix(
                    index, prompt_index, self.prompt_lps.get(prompt_index), text, ids, lps
                )
            choice.text.append(text)
            choice.tokens += len(out.token_ids)
            if self.return_ids:
                choice.token_ids.extend(out.token_ids)
            lp = None
            if self.logprobs is not None:
                if self.chat:
                    lp = chat_logprobs(tt, out.token_ids, out.logprobs, self.logprobs, self.as_ids)
                    if choice.logprobs is None:
                        choice.logprobs = []
                    choice.logprobs.extend(lp)  # in place: a new list per delta was quadratic in the length
                else:
                    if choice.cursor is None:
                        choice.cursor = TextCursor(tt, self.body.skip_special_tokens)
                    lp = completion_logprobs(tt, ids, lps, choice.cursor, self.as_ids)
                    if choice.logprobs is None:
                        choice.logprobs = {k: [] for k in lp}
                    for k, v in lp.items():
                        choice.logprobs[k].extend(v)
            if out.finish_reason == "abort":
                raise APIError(503, "the request was aborted by the engine", code="aborted")
            if out.finish_reason == "error":  # not an OpenAI finish_reason: the engine failed this request
                raise engine_failure(self.constraint)
            if out.finish_reason is not None:
                choice.finish_reason = out.finish_reason
            if out.token_ids and not self.first_token:
                self.first_token = True
                self.state.metrics.first_token_seconds.observe(time.perf_counter() - self.started)
            deltas.append((index, text, lp, out.finish_reason, list(out.token_ids)))
        return deltas

    def count_tokens(self) -> None:
        usage = self.usage()
        m = self.state.metrics
        m.prompt_tokens.labels(self.body.model).inc(usage["prompt_tokens"])
        m.generation_tokens.labels(self.body.model).inc(usage["completion_tokens"])

    def final(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            text = "".join(c.text)
            if self.chat:
                message, finish = {"role": "assistant", "content": text}, c.finish_reason
                if self.tools is not None:
                    message, finish = self.tools.message(text, finish)
                item = {
                    "index": index,
                    "message": message,
                    "logprobs": {"content": c.logprobs or []} if self.logprobs is not None else None,
                    "finish_reason": finish,
                }
            else:
                item = {
                    "index": index,
                    "text": text,
                    "logprobs": c.logprobs,
                    "finish_reason": c.finish_reason,
                }
                if self.return_ids:  # vLLM's return_token_ids: the prompt's ids on each choice
                    item["prompt_token_ids"] = self.prompts[index // self.body.n]
                if self.with_prompt_logprobs:  # vLLM's prompt_logprobs (also with echo and logprobs)
                    item["prompt_logprobs"] = format_prompt_logprobs(self.prompt_lps.get(index // self.body.n))
            if self.return_ids:
                item["token_ids"] = c.token_ids
            choices.append(item)
        body = {**self._header(self.object), "choices": choices, "usage": self.usage()}
        if self.return_ids and self.chat:
            body["prompt_token_ids"] = self.prompts[0]
        return body

    def chunk(self, index: int, text: str, lp: Any, finish: str | None, ids: list[int]) -> dict[str, Any] | None:
        choice = self.choices[index]
        first = not choice.started
        if self.chat:
            delta: dict[str, Any] = {"content": text}
            if self.tools is not None:
                delta, finish = self.tools.delta(index, text, ids, finish)
                if not delta and finish is None and lp is None and not first:
                    return None  # nothing to send yet (a tool call still being parsed)
            if not choice.started:
                delta["role"] = "assistant"
            item = {
                "index": index,
                "delta": delta,
                "logprobs": {"content": lp} if lp is not None else None,
                "finish_reason": finish,
            }
        else:
            item = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
            if self.return_ids and first:
                item["prompt_token_ids"] = self.prompts[index // self.body.n]
        if self.return_ids:
            item["token_ids"] = ids
        choice.started = True
        chunk = {
            **self._header("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [item],
        }
        if self.return_ids and self.chat and not self.sent_prompt_ids:  # once, on the first chunk (vLLM)
            chunk["prompt_token_ids"] = self.prompts[0]
            self.sent_prompt_ids = True
        options = self.body.stream_options
        if options is not None and options.include_usage:
            chunk["usage"] = self.usage() if options.continuous_usage_stats else None
        return chunk


async def _generate(
    request: Request,
    body: SamplingFields,
    chat: bool,
    prompts: list[list[int]],
    max_tokens: int,
    logprobs: int | None,
    echo: EchoPlan | None = None,
    prompt_logprobs: int | None = None,
    tools: ToolPlan | None = None,
) -> Any:
    state = request.app.state.server
    params = sampling_params(body, max_tokens, logprobs, prompt_logprobs)
    constraint = _constraint_param(body, tools)
    if params.structured_outputs is not None and constraint is not None:  # before anything is queued
        await asyncio.to_thread(state.grammars.check, params.structured_outputs, constraint)
    group = RequestGroup(state, body.model)
    try:
        await group.submit(prompts, params)
    except APIError as exc:
        # vLLM's structured-output checks (run as the request is added) name no parameter; the
        # engine's other checks at that point do, or were made earlier
        if exc.status == 400 and exc.param is None and constraint is not None:
            exc.param = constraint
        raise
    run = _Run(state, body, chat, group, prompts, logprobs, echo, prompt_logprobs is not None, tools)
    run.constraint = constraint
    headers = {VERSION_HEADER: group.label}
    if not body.stream:
        try:
            async for prompt_index, output in group.events(request):
                run.absorb(prompt_index, output)
        except ClientDisconnected:
            group.abort_nowait()
            return JSONResponse(error_body(499, "client disconnected"), status_code=499)
        except BaseException:
            group.abort_nowait()
            raise
        finally:
            run.count_tokens()
        # built and serialised off the event loop: a large response (many choices, logprobs) would
        # otherwise hold up every other client's request for as long as that takes
        return await asyncio.to_thread(lambda: JSONResponse(run.final(), headers=headers))
    return EventSourceResponse(_stream(run), headers=headers, sep="\n", ping=15)


def _constraint_param(body: SamplingFields, tools: ToolPlan | None) -> str | None:
    """The request field that constrains the output, if any (named in its errors)."""
    if tools is not None and tools.mode in ("named", "required"):
        return "tools"  # the constraint is the schema of the tools' parameters
    if body.response_format is not None and body.response_format.type != "text":
        return "response_format"
    return "structured_outputs" if body.structured_outputs is not None else None


async def _stream(run: _Run) -> Any:
    group = run.group
    finished = False
    try:
        async for prompt_index, output in group.events():
            for index, text, lp, finish, ids in run.absorb(prompt_index, output):
                chunk = run.chunk(index, text, lp, finish, ids)
                if chunk is not None:
                    yield json.dumps(chunk, separators=(",", ":"))
        options = run.body.stream_options
        if options is not None and options.include_usage:
            yield json.dumps(
                {
                    **run._header(f"{run.object}.chunk" if run.chat else run.object),
                    "choices": [],
                    "usage": run.usage(),
                },
                separators=(",", ":"),
            )
        finished = True
    except APIError as exc:
        yield json.dumps(error_body(exc.status, exc.message, exc.param, exc.code, exc.type))
    except Exception as exc:  # the engine failed this request
        yield json.dumps(error_body(500, f"generation failed: {exc}", code="engine_error"))
    finally:
        if not finished:
            group.abort_nowait()
        run.count_tokens()
    yield "[DONE]"


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    state = request.app.state.server
    state.models.require(body.model)
    prompts = await asyncio.to_thread(
        completion_prompts, body, state.tokenizer, state.vocab_size, state.max_model_len, state.max_prompt_chars
    )
    prompt_only = body.echo and body.max_tokens == 0  # vLLM: echo the prompt, generate nothing
    max_tokens = resolve_max_tokens(
        1 if prompt_only else body.max_tokens, [len(p) for p in prompts], state.max_model_len, "max_tokens", "prompt"
    )
    prompt_logprobs = engine_prompt_logprobs(body)
    check_prompt_logprobs(body, prompts, prompt_logprobs, state.max_model_len)
    check_output_logprobs(len(prompts) * body.n, max_tokens, body.logprobs, state.max_model_len, "logprobs")
    echo = None
    if body.echo:
        texts = await asyncio.to_thread(prompt_texts, body, prompts, state.tokenizer, state.max_prompt_chars)
        echo = EchoPlan(texts, prompts, bool(prompt_only))
    return await _generate(request, body, False, prompts, max_tokens, body.logprobs, echo, prompt_logprobs)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = request.app.state.server
    state.models.require(body.model)
    tools, body, tool_list = await asyncio.to_thread(planned, body, state.tokenizer)
    prompt = await asyncio.to_thread(
        chat_prompt,
        body,
        state.tokenizer,
        state.max_model_len,
        state.max_prompt_chars,
        state.config.trust_request_chat_template,
        tool_list,
    )
    requested, param = body.max_tokens, "max_tokens"
    if body.max_completion_tokens is not None:
        requested, param = body.max_completion_tokens, "max_completion_tokens"
    max_tokens = resolve_max_tokens(requested, [len(prompt)], state.max_model_len, param, "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    check_output_logprobs(body.n, max_tokens, logprobs, state.max_model_len,
                          "top_logprobs" if body.top_logprobs else "logprobs")
    return await _generate(request, body, True, [prompt], max_tokens, logprobs, tools=tools)
