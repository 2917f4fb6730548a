"""One-step-off GRPO on one device: the engine generates batch k+1 while the trainer trains on batch k.

Why
---
On one GPU, rollouts are most of a GRPO step, small-batch decoding leaves the GPU far from busy and
the training step is compute-bound. trainserve's engine reads the very base weights the trainer
holds, so generation and training can run *at the same time* on one device without a second copy
of the model: only the LoRA adapter differs between them, and the engine keeps its own copies of
it in its LoRA slots.

Schedule (``GRPOTrainer(..., overlap=True)``)
---------------------------------------------
``v(j)`` is the adapter after ``j`` optimizer steps. Step ``k`` (1-based) trains on batch ``k``.
As soon as batch ``k``'s completions are collected — at the start of step ``k``, when the adapter
is ``v(k-1)`` — batch ``k+1``'s requests are submitted with ``v(k-1)``, and the engine loop's own
thread generates them while this thread scores batch ``k``, runs the forward/backward passes and
optimizer step ``k``. Step ``k+1`` then trains (starting from ``v(k)``) on completions sampled by
``v(k-1)``: **always exactly one step stale**. The only exceptions have staleness 0: batch 1, the
first batch of every further epoch (the data loader cannot be looked ahead across epochs) and the
first batch after a resume (the pending batch is not part of a checkpoint); they are generated at
once with the current adapter, as without overlap.

Pinning a version
-----------------
The live adapter is double-buffered (:mod:`trainserve.engine.live_adapter`): a new version is only
ever written into a slot that no unfinished request uses. The requests of batch ``k+1`` hold the
slot with ``v(k-1)``, and nothing syncs the adapter again until they have finished, so that slot
keeps ``v(k-1)`` for the whole generation while the optimizer changes the trainer's tensors (the
engine never reads those: it reads its slot). The version a sample was generated with is read back
from the engine's output (its LoRA name, ``live@v<N>``), not assumed: see :class:`RolloutRecord`.

Threads, streams, the GIL
-------------------------
The engine loop runs in background mode for the whole ``train()``: its daemon thread steps vLLM;
this (training) thread only submits requests and later waits for them on ``threading.Event``s,
which release the GIL. vLLM releases the GIL itself while it waits on the GPU (torch ops and
device-to-host copies run without it), so the two threads only share the GIL for their Python
work. On CUDA, the engine thread is switched to its own CUDA stream (the current stream is
per-thread in PyTorch; vLLM's ``current_stream()`` tracks ``torch.cuda.set_stream`` per thread),
so its kernels are not serialised behind the trainer's on the default stream. Cross-stream safety:
the engine only reads the shared base weights (never written) and writes its own buffers; before
each adapter copy into a slot, the engine stream waits on an event recorded on the trainer's
stream, so the optimizer step's writes are complete. PyTorch's caching allocator never hands a
block freed on one stream to another stream, so the two pools cannot overlap.

Memory
------
KV standby (releasing the KV cache while the trainer runs, see :mod:`trainserve.engine.standby`)
is off during an overlapped ``train()``: the KV cache is in use *while* the trainer runs. Standby
already skips itself while the engine loop runs in background mode; at the start the KV cache is
mapped back if standby had released it. The trade-off: with standby, training can use the KV
cache's memory during its step; with overlap, training activations must fit next to the engine
(``gpu_memory_utilization`` is the engine's share: weights + KV cache; the trainer gets the rest).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("trainserve")

_LIVE_NAME = re.compile(r"^live@v(\d+)$")


@dataclass
class RolloutRecord:
    """How one training batch was generated (one per optimizer step of an overlapped run).

    ``step`` is the 1-based optimizer step that trains on the batch; ``policy_step`` the number of
    optimizer steps the generating adapter had seen (``step - 2`` once overlapped, ``step - 1`` for
    a batch generated at once); ``adapter_version`` the live adapter version that generated it and
    ``sample_versions`` that version as the engine reported it for every sample."""

    step: int
    policy_step: int
    adapter_version: int
    sample_versions: list[int]
    generate_seconds: float  # submission → last completion
    wait_seconds: float  # how long the trainer waited for it (≈0 when fully overlapped)
    overlapped: bool  # generated during the previous step (False: generated at once)

    @property
    def staleness(self) -> int:
        """Optimizer steps between the generating adapter and the one the batch trains from."""
        return self.step - 1 - self.policy_step


@dataclass
class EngineBatch:
    """The engine requests for one training batch: one prompt and ``SamplingParams`` per group."""

    prompt_ids: list[list[int]]  # as TRL laid them out (each prompt num_generations times)
    prompts: list[list[int]]  # one per request
    counts: list[int]  # samples per request (its SamplingParams.n)
    params: list[Any]


class Lookahead:
    """An iterator that can show the next item before it is taken (the next step's prompts)."""

    def __init__(self, iterator: Iterator[Any]):
        self.iterator = iterator
        self._buffer: deque[Any] = deque()

    def __iter__(self) -> Lookahead:
        return self

    def __next__(self) -> Any:
        return self._buffer.popleft() if self._buffer else next(self.iterator)

    def peek(self) -> Any | None:
        """The next item without consuming it; None at the end of the iterator."""
        if not self._buffer:
            try:
                self._buffer.append(next(self.iterator))
            except StopIteration:
                return None
        return self._buffer[0]


@dataclass
class _Pending:
    step: int  # global_step (0-based) at which the trainer consumes it
    batch: EngineBatch
    policy_step: int
    version: int
    swap_ms: float
    streams: list[Any]
    t_submit: float
    done: threading.Event = field(default_factory=threading.Event)
    t_done: float = 0.0


class OneStepOff:
    """Runs the overlapped rollouts of one :class:`trainserve.rl.GRPOTrainer`.

    ``prepare(inputs, step)`` turns a data-loader item into the :class:`EngineBatch` for global step
    ``step`` (tokenisation, grouping, seeded ``SamplingParams``: the trainer's own code)."""

    def __init__(self, engine: Any, live: Any, prepare: Callable[[Any, int], EngineBatch],
                 version_offset: Callable[[], int]):
        self.engine = engine
        self.live = live
        self.prepare = prepare
        self.version_offset = version_offset
        self.records: list[RolloutRecord] = []
        self._lookahead: Lookahead | None = None
        self._next_inputs: Any = None
        self._pending: _Pending | None = None
        self.last_swap_ms = 0.0
        self._started_loop = False
        self._restore_stream: Callable[[], None] | None = None

    # ------------------------------------------------------------------ session
    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """For the duration of ``train()``: KV cache mapped, engine loop in its own thread (and CUDA
        stream); at the end, abort a batch that no step will train on and restore the engine."""
        loop = self.engine.loop
        self.engine.standby.before_generate()  # map the KV cache again if standby had released it
        self._started_loop = not loop.background
        loop.start_background()
        self._restore_stream = _engine_stream(loop)
        _log_memory_split(self.engine)
        try:
            yield
        finally:
            self._abort_pending()
            self._lookahead, self._next_inputs = None, None
            if self._restore_stream is not None:
                self._restore_stream()
                self._restore_stream = None
            if self._started_loop:
                loop.stop_background(drain=True)
                self._started_loop = False

    def batch_samples(self, get: Callable[..., tuple[list, Any]], epoch_iterator: Iterator[Any],
                      num_batches: int, device: Any) -> tuple[list, Any]:
        """``Trainer.get_batch_samples`` through a look-ahead: also remembers the next step's item."""
        if self._lookahead is None or self._lookahead.iterator is not epoch_iterator:
            self._lookahead = Lookahead(epoch_iterator)  # a new epoch (or the first): no look-ahead yet
        samples, num_items = get(self._lookahead, num_batches, device)
        self._next_inputs = self._lookahead.peek()
        return samples, num_items

    # ------------------------------------------------------------------ rollouts
    def rollout(self, batch: EngineBatch, step: int, max_steps: int) -> tuple[list[Any], RolloutRecord]:
        """The engine outputs for ``batch`` (global step ``step``), and its record. Submits the next
        step's batch with the adapter as it is now before returning."""
        pending, self._pending = self._pending, None
        if pending is not None and (pending.step != step or pending.batch.prompt_ids != batch.prompt_ids):
            self._abort(pending)
            raise RuntimeError(
                f"overlap: the batch generated ahead for step {pending.step + 1} is not the one step {step + 1} "
                "trains on (the data order changed between the look-ahead and the step)")
        overlapped = pending is not None
        if pending is None:  # batch 1, a new epoch or a resume: generate it now (staleness 0)
            pending = self._submit(batch, step, policy_step=step)
        t_wait = time.perf_counter()
        try:
            outputs = self._collect(pending)
        except BaseException:  # Ctrl-C, a dead engine loop: the batch is no longer pending anywhere
            self._abort(pending)
            raise
        wait_s = time.perf_counter() - t_wait
        sample_versions = [v for out in outputs for v in [_engine_version(out)] * len(out.outputs)]
        if any(v != pending.version for v in sample_versions):
            raise RuntimeError(f"overlap: requests submitted with adapter version {pending.version} were served "
                               f"by versions {sorted(set(sample_versions))}")
        offset = self.version_offset()  # resumed runs: versions continue the saved run's count
        record = RolloutRecord(
            step=step + 1, policy_step=pending.policy_step, adapter_version=pending.version + offset,
            sample_versions=[v + offset for v in sample_versions],
            generate_seconds=pending.t_done - pending.t_submit, wait_seconds=wait_s, overlapped=overlapped)
        self.records.append(record)
        self.last_swap_ms = pending.swap_ms
        if self._next_inputs is not None and step + 1 < max_steps:  # no batch that no step would train on
            # The adapter has seen `step` optimizer steps now; step + 1 trains on this batch after one more.
            self._pending = self._submit(self.prepare(self._next_inputs, step + 1), step + 1, policy_step=step)
        self._next_inputs = None
        return outputs, record

    def _submit(self, batch: EngineBatch, step: int, policy_step: int) -> _Pending:
        """Pin the adapter as it is now (``policy_step`` optimizer steps; one slot of the double
        buffer) and queue ``batch``, which global step ``step`` will train on, with it."""
        loop = self.engine.loop
        # sync_request orders its slot copy after the trainer's queued CUDA work (live_adapter._wait_for)
        updates = self.live.updates
        request = self.live.sync_request()
        version = _version_of(request.lora_name)
        swap_ms = self.live.last_update_ms if self.live.updates > updates else 0.0
        rendered = loop.render([_tokens_prompt(p) for p in batch.prompts])
        pending = _Pending(step=step, batch=batch, policy_step=policy_step, version=version,
                           swap_ms=swap_ms, streams=[], t_submit=time.perf_counter())
        left = [len(rendered)]

        def count(output: Any) -> None:  # the engine thread, as outputs arrive
            if isinstance(output, BaseException) or output.finished:
                left[0] -= 1
                if left[0] == 0:
                    pending.t_done = time.perf_counter()
                    pending.done.set()

        def submit_all() -> list[Any]:  # one job: all requests enter the same engine step
            streams: list[Any] = []
            try:
                for p, params in zip(rendered, batch.params, strict=True):
                    streams.append(loop.submit(p, params, request, on_output=count))
            except BaseException:  # no half-submitted batch keeps running
                for stream in streams:
                    loop.abort(stream.request_id)
                raise
            return streams

        if not rendered:
            raise ValueError("overlap: a training batch without prompts")

        pending.streams = loop.call(submit_all)
        return pending

    def _collect(self, pending: _Pending) -> list[Any]:
        loop = self.engine.loop
        while not pending.done.wait(0.5):
            if loop.fatal is not None:
                raise RuntimeError("the engine loop stopped") from loop.fatal
            if not loop.background:  # someone (a server's stop()) took the loop out of background mode
                loop.start_background()
                self._started_loop = True
        return [s.result() for s in pending.streams]

    def _abort_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._abort(pending)

    def _abort(self, pending: _Pending) -> None:
        for stream in pending.streams:
            if not stream.done.is_set():
                self.engine.loop.abort(stream.request_id)


def _tokens_prompt(ids: list[int]) -> Any:
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(ids))


def _version_of(lora_name: str) -> int:
    match = _LIVE_NAME.match(lora_name or "")
    if match is None:
        raise RuntimeError(f"overlap: expected a live adapter request (live@v<N>), got {lora_name!r}")
    return int(match.group(1))


def _engine_version(output: Any) -> int:
    """The live adapter version the engine generated ``output`` with (from its LoRA name)."""
    request = getattr(output, "lora_request", None)
    if request is None:
        raise RuntimeError("overlap: the engine output carries no LoRA request; cannot tell its adapter version")
    return _version_of(request.lora_name)


def _engine_stream(loop: Any) -> Callable[[], None] | None:
    """CUDA only: move the engine loop's thread onto its own stream; returns the undo.

    ``loop.call`` runs the job *in the loop's thread* (background mode), which is what makes the
    per-thread current stream the engine's. Work queued on the old stream is finished first."""
    import torch

    if not torch.cuda.is_available():
        return None
    if not loop.background:
        raise RuntimeError("the engine stream can only be set while the engine loop runs in background mode")
    stream = torch.cuda.Stream()

    def switch() -> Any:
        previous = torch.cuda.current_stream()
        previous.synchronize()
        torch.cuda.set_stream(stream)
        return previous

    previous = loop.call(switch)

    def restore() -> None:
        def back() -> None:
            stream.synchronize()
            torch.cuda.set_stream(previous)

        if loop.background:
            loop.call(back)

    return restore


def _log_memory_split(engine: Any) -> None:
    import torch

    if not torch.cuda.is_available():
        return
    free, total = torch.cuda.mem_get_info()
    logger.info("overlap: the KV cache stays mapped while training (engine share gpu_memory_utilization=%.2f); "
                "%.1f of %.1f GiB free for training", engine.spec.gpu_memory_utilization, free / 2**30, total / 2**30)
