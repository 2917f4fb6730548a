"""Per-step output handling that does only what token-ids-only, final-output requests need.

Why: vLLM's ``LLMEngine.step`` passes every running request's new tokens through
``OutputProcessor.process_outputs`` after each engine step — stats, detokeniser, stop strings,
logprobs, output objects — about ten Python calls per request per step. For what
``fast_generate`` and the GRPO rollout submit (``RequestOutputKind.FINAL_ONLY``,
``detokenize=False``, no logprobs) all of that reduces to appending the new token ids to the
request's list until it finishes. With the engine in a child process (vLLM's default) that work
runs beside the engine core; in-process, as trainserve runs it to share the weights, it sits on
the one thread that also schedules the next step, and a rollout of many short sequences is bound by
that thread (H100, 1.5B, 256 sequences: the stepping thread was busy 95% of the rollout). Measured
on this project's CPU machine with 256 running requests: 1.2–1.3 ms per step in ``process_outputs``.

:class:`LeanOutputs` sits in front of the engine's ``process_outputs`` (an instance attribute set
to its bound method; nothing in vLLM is modified). For an output of a request that qualifies
(:func:`vllm_compat.final_only_token_list`), that is not its first, carries no logprobs and does
not finish the request, it appends the token ids and is done. Every other output — first outputs,
finishing ones, requests with logprobs, stop strings or streamed text, every output when vLLM
collects statistics, and every output of a step whose weight version differs from the last
step's — goes through vLLM's own ``process_outputs`` unchanged, in the same call. The request
outputs returned are vLLM's, built by vLLM when each request finishes.
``TRAINSERVE_LEAN_OUTPUTS=0`` leaves vLLM's path alone.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from typing import Any

from trainserve.engine import vllm_compat

PRUNE_EVERY = 64  # steps between checks for tracked requests vLLM no longer holds


def lean_outputs_enabled() -> bool:
    """``TRAINSERVE_LEAN_OUTPUTS``: unset or ``1`` on, ``0`` off; anything else is an error."""
    value = os.environ.get("TRAINSERVE_LEAN_OUTPUTS", "1")
    if value not in ("0", "1"):
        raise ValueError(f"TRAINSERVE_LEAN_OUTPUTS must be 0 or 1, got {value!r}")
    return value == "1"


class LeanOutputs:
    """Stands in front of one engine's ``OutputProcessor.process_outputs`` (see the module doc)."""

    def __init__(self, processor: Any, per_step_fields: tuple[str, ...]):
        self.processor = processor
        self.full: Callable[..., Any] = processor.process_outputs
        self._unset = operator.attrgetter(*per_step_fields) if per_step_fields else None
        self._nones = (None,) * len(per_step_fields)
        if len(per_step_fields) == 1:  # attrgetter of one name returns the value, not a tuple
            self._nones = None
        self.tokens: dict[str, list[int]] = {}  # qualifying requests -> their token list in vLLM's state
        # Extra arguments of the last call (vLLM >= 0.30 passes ``weight_version``; a request records a
        # new version once, so tracking starts over whenever they change).
        self._more: dict[str, Any] = {}
        self._calls = 0
        self.lean_outputs = 0  # outputs handled here (for tests and profiles)
        self.full_outputs = 0

    @classmethod
    def install(cls, llm: Any) -> LeanOutputs | None:
        """Put a :class:`LeanOutputs` in front of ``llm``'s output processor (None when turned off)."""
        if not lean_outputs_enabled():
            return None
        processor, fields = vllm_compat.output_processor(llm)
        lean = cls(processor, fields)
        processor.process_outputs = lean.process_outputs
        return lean

    def uninstall(self) -> None:
        self.processor.__dict__.pop("process_outputs", None)

    def process_outputs(self, engine_core_outputs: list[Any], engine_core_timestamp: float | None = None,
                        iteration_stats: Any = None, **more: Any) -> Any:
        """vLLM's ``process_outputs`` contract: returns its ``OutputProcessorOutput``."""
        if more != self._more:  # e.g. a new weight version (vLLM >= 0.30): every request records it
            self.tokens.clear()
            self._more = dict(more)
        if iteration_stats is not None or getattr(self.processor, "tracing_enabled", False):
            return self.full(engine_core_outputs, engine_core_timestamp, iteration_stats, **more)
        tokens, unset, nones = self.tokens, self._unset, self._nones
        rest = []
        for output in engine_core_outputs:
            token_list = tokens.get(output.request_id)
            if token_list is None or (unset is not None and unset(output) != nones):
                rest.append(output)
            else:
                token_list.extend(output.new_token_ids)
        self.lean_outputs += len(engine_core_outputs) - len(rest)
        self.full_outputs += len(rest)
        result = self.full(rest, engine_core_timestamp, iteration_stats, **more)
        self._track(rest)
        return result

    def _track(self, handled: list[Any]) -> None:
        """After vLLM handled these outputs: start tracking requests that now qualify, stop
        tracking finished ones (and any that vLLM no longer holds, e.g. aborted)."""
        tokens = self.tokens
        states = self.processor.request_states
        for output in handled:
            request_id = output.request_id
            if request_id not in states:
                tokens.pop(request_id, None)
            elif request_id not in tokens:
                token_list = vllm_compat.final_only_token_list(self.processor, request_id)
                if token_list is not None:
                    tokens[request_id] = token_list
        self._calls += 1
        if len(tokens) > len(states) or self._calls % PRUNE_EVERY == 0:  # aborted requests send no last output
            for request_id in [r for r in tokens if r not in states]:
                del tokens[request_id]
