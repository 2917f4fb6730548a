"""Engine requests of one HTTP request, bridged from the engine's stepping thread to asyncio.

The model name is resolved to its ``LoRARequest`` *in the same between-steps job* that submits
the engine requests, so a reload or unload can never slip in between: the request is pinned to
the version it started with, and the retired version stays in the engine until it finishes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import threading
from collections.abc import AsyncIterator
from typing import Any

from trainserve.server.errors import APIError, client_error_types, from_engine_error

logger = logging.getLogger("trainserve.server")


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was complete."""


class Mailbox:
    """Hands outputs from the engine thread to one event loop with at most one wake-up pending.

    An engine step finishes a token for every running request; waking the event loop once per
    step instead of once per request keeps the engine thread's share of the work small.
    """

    def __init__(self, aio: asyncio.AbstractEventLoop):
        self._aio = aio
        self._items: collections.deque[tuple[asyncio.Queue, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        """Engine thread: deliver ``item`` to ``queue``. Never raises."""
        self._items.append((queue, item))
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._aio.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop is closed: nobody waits for these outputs
            pass

    def _drain(self) -> None:
        with self._lock:
            self._scheduled = False
        items = self._items
        while items:
            queue, item = items.popleft()
            queue.put_nowait(item)


def mailbox_for(state: Any) -> Mailbox:
    """The mailbox of the running event loop (one per server)."""
    aio = asyncio.get_running_loop()
    box = getattr(state, "_mailbox", None)
    if box is None or box._aio is not aio:
        box = state._mailbox = Mailbox(aio)
    return box


class RequestGroup:
    """One engine request per prompt; outputs arrive as ``(prompt index, RequestOutput)``."""

    def __init__(self, state: Any, model: str):
        self.state = state
        self.model = model
        self.label = "base"
        self.streams: list[Any] = []
        self._aio = asyncio.get_running_loop()
        self._mailbox = mailbox_for(state)
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._open = 0

    def _callback(self, index: int) -> Any:
        post, queue = self._mailbox.post, self._queue

        def on_output(item: Any) -> None:  # runs on the engine thread
            post(queue, (index, item))

        return on_output

    def _submit_sync(self, prompts: list[list[int]], params: Any) -> None:
        from vllm.inputs import TokensPrompt

        loop = self.state.loop
        inputs: list[Any] = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        render = getattr(loop, "render", None)
        if render is not None:  # tokenise/render here, not on the engine thread
            try:
                inputs = render(inputs)
            except client_error_types() as exc:
                raise from_engine_error(exc) from exc

        def job() -> tuple[str, list[Any]]:
            lora, label = self.state.models.resolve(self.model)
            streams: list[Any] = []
            try:
                for i, inp in enumerate(inputs):
                    streams.append(loop.submit(inp, params.clone(), lora, on_output=self._callback(i)))
            except BaseException:
                for s in streams:
                    loop.abort(s.request_id)
                raise
            return label, streams

        try:
            self.label, self.streams = loop.call(job)
        except APIError:
            raise
        except client_error_types() as exc:
            raise from_engine_error(exc) from exc
        self._open = len(self.streams)

    async def submit(self, prompts: list[list[int]], params: Any) -> None:
        """Queue the requests (pinned to the model's current version); sets :attr:`label`."""
        if self.state.loop.fatal is not None:
            raise APIError(503, "the engine has stopped", code="engine_dead")
        await asyncio.to_thread(self._submit_sync, prompts, params)

    async def events(self, request: Any = None, poll: float = 1.0) -> AsyncIterator[tuple[int, Any]]:
        """Yield outputs until every request finished; raise what the engine raised, or
        :class:`ClientDisconnected` when ``request`` (a Starlette request) disconnects."""
        while self._open:
            if request is None:
                index, item = await self._queue.get()
            else:
                try:
                    index, item = await asyncio.wait_for(self._queue.get(), poll)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise ClientDisconnected() from None
                    continue
            if isinstance(item, BaseException):
                self._open -= 1
                raise item
            if item.finished:
                self._open -= 1
            yield index, item

    def abort_nowait(self) -> None:
        """Abort unfinished requests from a worker thread (safe inside a cancelled task)."""
        pending = [s.request_id for s in self.streams if not s.done.is_set()]
        if not pending:
            return
        self.state.metrics.aborted.inc()
        loop = self.state.loop

        def abort() -> None:
            for request_id in pending:
                try:
                    loop.abort(request_id)
                except Exception:  # the engine stopped: nothing left to abort
                    logger.debug("abort of %s failed", request_id, exc_info=True)

        self._aio.run_in_executor(None, abort)


def clamp_logprob(value: float) -> float:
    """JSON has no -inf or NaN."""
    return max(float(value), -9999.0) if value == value else -9999.0


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in characters → the bytes they encode (GPT-2's table)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


_BYTE_DECODER = _byte_decoder()
_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenText:
    """Text and bytes of single tokens for logprobs; a token that is only part of a UTF-8
    character is shown as ``bytes:\\xNN...`` (as OpenAI does) instead of an ambiguous ``"\ufffd"``."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._bytes: dict[int, bytes] = {}
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", None) or ())

    def bytes_of(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is not None:
            return cached
        raw = None
        try:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece:
                if all(ch in _BYTE_DECODER for ch in piece):
                    raw = bytes(_BYTE_DECODER[ch] for ch in piece)
                elif match := _HEX_BYTE.fullmatch(piece):
                    raw = bytes([int(match.group(1), 16)])
        except Exception:  # a tokenizer without byte-level pieces
            raw = None
        if raw is None:
            raw = self.tokenizer.decode([token_id]).encode("utf-8")
        self._bytes[token_id] = raw
        return raw

    def text_of(self, token_id: int, logprob: Any, as_id: bool = False) -> str:
        if as_id:  # vLLM's return_tokens_as_token_ids
            return f"token_id:{token_id}"
        decoded = getattr(logprob, "decoded_token", None)
        if decoded and "\ufffd" not in decoded:
            return decoded
        raw = self.bytes_of(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TextCursor:
    """How many characters of a completion's text its tokens so far produced (``text_offset``).

    Follows vLLM's incremental detokeniser (tokenizers' ``DecodeStream``): bytes that do not yet
    decode to whole characters (the text would end in ``"\ufffd"``) are held back until a later
    token completes them, so a token that is only part of a UTF-8 character adds nothing. Counting
    each token's own decoded text (one ``"\ufffd"`` per partial token) ran ahead of the text.
    Special tokens add nothing when the text skips them.
    """

    def __init__(self, tt: TokenText, skip_special_tokens: bool = True):
        self.tt = tt
        self.skip = tt.special_ids if skip_special_tokens else frozenset()
        self.offset = 0
        self._pending = b""

    def advance(self, token_id: int) -> None:
        if token_id in self.skip:
            return
        self._pending += self.tt.bytes_of(token_id)
        text = self._pending.decode("utf-8", "replace")
        if not text.endswith("\ufffd"):
            self.offset += len(text)
            self._pending = b""


def _ranked(candidates: dict[int, Any]) -> list[tuple[int, Any]]:
    return sorted(candidates.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)


def completion_logprobs(
    tt: TokenText, token_ids: Any, logprobs: Any, cursor: TextCursor, as_ids: bool = False
) -> dict[str, Any]:
    """OpenAI completions ``logprobs`` for generated tokens; ``cursor`` carries the text offset."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, candidates in zip(token_ids, logprobs or [], strict=False):
        if candidates is None:  # an echoed prompt's first token: nothing to condition it on
            out["tokens"].append(tt.text_of(token_id, None, as_ids))
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(cursor.offset)
            cursor.advance(token_id)
            continue
        chosen = candidates.get(token_id)
        out["tokens"].append(tt.text_of(token_id, chosen, as_ids))
        out["token_logprobs"].append(clamp_logprob(chosen.logprob) if chosen is not None else None)
        top = {tt.text_of(t, lp, as_ids): clamp_logprob(lp.logprob) for t, lp in _ranked(candidates)}
        out["top_logprobs"].append(top)
        out["text_offset"].append(cursor.offset)
        cursor.advance(token_id)
    return out


def _token_bytes(tt: TokenText, token_id: int, text: str, as_ids: bool) -> list[int]:
    return list(text.encode("utf-8")) if as_ids else list(tt.bytes_of(token_id))


def chat_logprobs(
    tt: TokenText, token_ids: Any, logprobs: Any, top: int, as_ids: bool = False
) -> list[dict[str, Any]]:
    """OpenAI chat ``logprobs.content`` entries for generated tokens (``top`` alternatives each)."""
    content = []
    for token_id, candidates in zip(token_ids, logprobs or [], strict=False):
        chosen = candidates.get(token_id)
        alternatives = [(t, lp) for t, lp in _ranked(candidates) if lp.rank is not None and lp.rank <= top]
        token = tt.text_of(token_id, chosen, as_ids)
        entries = []
        for t, lp in alternatives[:top]:
            alt = tt.text_of(t, lp, as_ids)
            entries.append(
                {"token": alt, "logprob": clamp_logprob(lp.logprob), "bytes": _token_bytes(tt, t, alt, as_ids)}
            )
        content.append(
            {
                "token": token,
                "logprob": clamp_logprob(chosen.logprob) if chosen is not None else -9999.0,
                "bytes": _token_bytes(tt, token_id, token, as_ids),
                "top_logprobs": entries,
            }
        )
    return content
