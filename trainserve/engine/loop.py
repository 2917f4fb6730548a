"""The one loop that drives the process's vLLM engine.

Threading model
---------------
vLLM's ``LLMEngine`` is not thread-safe, so exactly one thread at a time *steps* it: whoever
holds ``EngineLoop._lock``. Everything that touches the engine (adding or aborting requests,
adapter writes into LoRA slots, adding LoRAs) runs as a *between-steps* job through
:meth:`EngineLoop.call`, so it can never interleave with a forward pass.

* Synchronous mode (the default; ``fast_generate`` in a training script): the calling thread
  takes the lock, runs pending jobs and steps the engine until its requests finish.
* Background mode (:meth:`start_background`, used by the HTTP server): a daemon thread owns the
  stepping; other threads submit jobs and wait on their futures or request streams. Requests
  from every thread are batched together by vLLM (continuous batching).

Outputs are routed to :class:`RequestStream` objects by request id, whatever thread stepped.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from tqdm.auto import tqdm

from trainserve.engine.detokenize import backend_tokenizer, can_defer, fill_text


class RequestStream:
    """The outputs of one submitted request, filled in by the stepping thread."""

    def __init__(self, request_id: str, lora_int_id: int, on_output: Callable[[Any], None] | None):
        self.request_id = request_id
        self.lora_int_id = lora_int_id
        self.on_output = on_output
        self.final: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def _deliver(self, output: Any) -> None:
        if self.on_output is not None:
            self.on_output(output)
        if output.finished:
            self.final = output
            self.done.set()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        try:
            if self.on_output is not None:
                self.on_output(error)
        finally:
            self.done.set()

    def result(self, timeout: float | None = None) -> Any:
        """The finished ``RequestOutput`` (raises what the engine raised for this request)."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        if self.error is not None:
            raise self.error
        return self.final


class EngineLoop:
    """Serialises all access to one in-process vLLM ``LLM`` and routes its outputs."""

    def __init__(self, llm: Any):
        self.llm = llm
        self.engine = llm.llm_engine
        self._lock = threading.RLock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.steps = 0
        self.fatal: BaseException | None = None
        self._in_job = False  # a job is running (guarded by the lock): see _run_jobs
        # Called with a request's LoRARequest in the job that submits it, before vLLM sees it (the
        # adapter registry makes sure the files vLLM may read are there; it may refuse the request).
        self.before_submit: Callable[[Any], None] | None = None

    # ------------------------------------------------------------------ jobs
    @property
    def background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn()`` between engine steps and return its result (re-raising its exception)."""
        if self.background and threading.current_thread() is not self._thread:
            future: Future = Future()
            self._jobs.put((fn, future))
            self._wake.set()
            return future.result(timeout)
        with self._lock:
            self._run_jobs()
            return fn()

    def hold(self) -> None:
        """Keep the engine from stepping until :meth:`release` (re-entrant, per thread).

        Waits for an engine step in progress to end. Used around a full fine-tuning optimizer
        step, which writes the weights the engine computes with: no forward pass sees half an
        update."""
        self._lock.acquire()

    def release(self) -> None:
        """Undo one :meth:`hold` of this thread."""
        self._lock.release()

    def _run_jobs(self) -> None:
        """Run the queued jobs one after the other (the caller holds the lock).

        Not re-entrant: a job that itself calls :meth:`call` (or :meth:`submit`, which does) runs
        that inner function at once, and the other queued jobs wait until the whole job is done.
        Why: a job is one atomic step of its caller's between-steps work. The server resolves a
        model name to an adapter version and submits the request in one job; run inside it, a
        reload's "is this version still in use?" check saw no request yet, its ``remove_lora``
        then ran once the request was admitted, the version's files were deleted, and the engine
        died loading them for that request (a CI run of
        ``tests/test_server_concurrency.py``, 2026-12-02)."""
        if self._in_job:
            return
        while True:
            try:
                fn, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            self._in_job = True
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the waiting caller
                future.set_exception(exc)
            finally:
                self._in_job = False

    # -------------------------------------------------------------- requests
    def submit(
        self,
        prompt: Any,
        params: Any,
        lora_request: Any = None,
        on_output: Callable[[Any], None] | None = None,
    ) -> RequestStream:
        """Queue one request; its outputs go to the returned stream (and ``on_output``)."""
        if not (isinstance(prompt, dict) and "type" in prompt):
            prompt = self.render([prompt])[0]
        request_id = f"ts-{next(self._ids)}"
        lora_id = lora_request.lora_int_id if lora_request is not None else 0
        stream = RequestStream(request_id, lora_id, on_output)

        def add() -> None:
            if lora_request is not None and self.before_submit is not None:
                self.before_submit(lora_request)  # may refuse the request; nothing is queued then
            self._streams[request_id] = stream
            try:
                self.engine.add_request(request_id, prompt, params, lora_request=lora_request)
            except BaseException:
                self._streams.pop(request_id, None)
                raise

        self.call(add)
        self._wake.set()
        return stream

    def render(self, prompts: Sequence[Any]) -> list[Any]:
        """Tokenise prompts (str or ``TokensPrompt``) into engine inputs, in the calling thread."""
        from trainserve.engine.vllm_compat import render_prompts

        return render_prompts(self.llm, list(prompts))

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream is finished with a ``RequestAborted`` error."""

        def do_abort() -> None:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self.engine.abort_request([request_id])
                stream._fail(RequestAborted(request_id))

        self.call(do_abort)

    def in_use_lora_ids(self) -> set[int]:
        """LoRA ids referenced by requests that have not finished (call between steps)."""
        return {s.lora_int_id for s in self._streams.values()}

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def generate(
        self,
        prompts: Sequence[Any],
        params: Any | Sequence[Any],
        lora_request: Any = None,
        use_tqdm: bool = False,
        defer_detokenize: bool = True,
    ) -> list[Any]:
        """Submit every prompt, drive the engine until all finish, return outputs in order.

        With ``defer_detokenize`` (the default) texts are decoded once at the end where that gives
        the same text (see :mod:`trainserve.engine.detokenize`), not token by token between steps.
        """
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        if not prompts:
            return []
        backend = self._text_backend if defer_detokenize else None
        deferred = [can_defer(p, backend) for p in params_list]
        engine_params = _engine_params(params_list, deferred)
        left = [len(prompts)]  # requests of this batch not finished yet (counted by the stepping thread)
        all_done = threading.Event()

        def count(output: Any) -> None:
            if isinstance(output, BaseException) or output.finished:
                left[0] -= 1
                if left[0] == 0:
                    all_done.set()

        streams: list[RequestStream] = []
        rendered = self.render(prompts)
        try:
            for prompt, p in zip(rendered, engine_params, strict=True):
                streams.append(self.submit(prompt, p, lora_request, on_output=count))
        except BaseException:
            for s in streams:
                self.abort(s.request_id)
            raise
        bar = tqdm(total=len(streams), desc="fast_generate", disable=not use_tqdm, leave=False)
        shown = 0
        while not all_done.is_set():
            if self.background:
                all_done.wait(0.5)
            else:
                with self._lock:
                    if not self._pump_once() and not all_done.is_set():
                        raise RuntimeError(f"the engine ran out of work with {left[0]} requests unfinished")
            if len(streams) - left[0] > shown:
                bar.update(len(streams) - left[0] - shown)
                shown = len(streams) - left[0]
            if self.fatal is not None and not all_done.is_set():
                raise RuntimeError("the engine loop stopped") from self.fatal
        bar.close()
        outputs = [s.result() for s in streams]
        if any(deferred):
            picked = [i for i, defer in enumerate(deferred) if defer]
            fill_text([outputs[i] for i in picked], [params_list[i] for i in picked], backend)
        return outputs

    @functools.cached_property
    def _text_backend(self) -> Any:
        """The tokenizer backend deferred decoding uses (None: this tokenizer cannot defer)."""
        return backend_tokenizer(self.llm.get_tokenizer())

    # ---------------------------------------------------------------- stepping
    def _pump_once(self) -> bool:
        """Run pending jobs, then one engine step if there is work. Caller holds the lock."""
        self._run_jobs()
        if not self.engine.has_unfinished_requests():
            return False
        outputs = self.engine.step()
        self.steps += 1
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            try:
                stream._deliver(output)
            except Exception as exc:  # a consumer's callback failed: end that request only
                if self._streams.pop(output.request_id, None) is not None:
                    self.engine.abort_request([output.request_id])
                stream.error = exc
                stream.done.set()
        return True

    def start_background(self) -> None:
        """Hand stepping to a daemon thread (idempotent)."""
        if self.background:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="trainserve-engine", daemon=True)
        self._thread.start()

    def stop_background(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop the stepping thread; with ``drain`` first let running requests finish."""
        if not self.background:
            return
        if drain:
            waiting = list(self._streams.values())
            for s in waiting:
                s.done.wait(timeout)
        self._stop.set()
        self._wake.set()
        assert self._thread is not None
        self._thread.join(timeout)
        self._thread = None
        self._run_jobs_locked()

    def _run_jobs_locked(self) -> None:
        with self._lock:
            self._run_jobs()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                with self._lock:
                    busy = self._pump_once()
            except BaseException as exc:  # the engine itself failed: fail every waiter, stop
                self.fatal = exc
                for stream in list(self._streams.values()):
                    stream._fail(exc)
                self._streams.clear()
                return
            if not busy:
                self._wake.wait(0.05)


def _engine_params(params_list: list[Any], deferred: list[bool]) -> list[Any]:
    """The params to submit: finished outputs only (as ``LLM.generate`` returns; cumulative outputs
    would re-emit every running sequence at every step), token ids only where decoding is deferred.
    One copy per distinct (params, deferred) pair, not one per prompt."""
    from vllm.sampling_params import RequestOutputKind

    copies: dict[tuple[int, bool], Any] = {}
    out = []
    for params, defer in zip(params_list, deferred, strict=True):
        key = (id(params), defer)
        if key not in copies:
            if getattr(params, "output_kind", None) == RequestOutputKind.FINAL_ONLY and not defer:
                copies[key] = params
            else:
                copy = params.clone()
                copy.output_kind = RequestOutputKind.FINAL_ONLY
                if defer:
                    copy.detokenize = False
                copies[key] = copy
        out.append(copies[key])
    return out


class RequestAborted(RuntimeError):
    """The request was aborted before it finished."""
