"""TRL's prompt lists to engine requests, and the engine's outputs back to TRL's lists.

TRL lays a generation batch out as each prompt ``num_generations`` times in a row and expects the
completions (and, when its importance-sampling correction reads them, the sampled tokens'
logprobs) in that order. The engine is faster with one request per prompt (``SamplingParams(n=...)``,
one prefill) and returns a request's samples in any order, each with its ``index``.
"""

from __future__ import annotations

from typing import Any

from trainserve.rl.overlap import EngineBatch


def group_runs(prompt_ids: list[list[int]], n: int) -> list[tuple[list[int], int]]:
    """``(prompt, count)`` runs: TRL repeats each prompt ``n`` times in a row, which becomes one request
    with ``SamplingParams(n=n)`` (one prefill); anything else is one request per prompt."""
    if n > 1 and len(prompt_ids) % n == 0 and all(
            list(prompt_ids[i]) == list(prompt_ids[i - i % n]) for i in range(len(prompt_ids))):
        return [(list(prompt_ids[i]), n) for i in range(0, len(prompt_ids), n)]
    return [(list(p), 1) for p in prompt_ids]


def sampled_logprobs(completion: Any) -> list[float | None]:
    """The logprob of each sampled token of one engine completion (``SamplingParams(logprobs=0)``)."""
    if completion.logprobs is None:
        raise RuntimeError("the engine returned no logprobs although SamplingParams(logprobs=0) asked")
    out: list[float | None] = []
    for token, entry in zip(completion.token_ids, completion.logprobs, strict=True):
        lp = entry.get(token) if entry else None
        out.append(None if lp is None else float(lp.logprob))
    return out


def unpack_outputs(outputs: list[Any], batch: EngineBatch,
                   with_logprobs: bool) -> tuple[list[list[int]], list[list[float | None]] | None]:
    """Completion ids and (``with_logprobs``) sampled-token logprobs in TRL's order (each group's
    samples by index); None for the logprobs otherwise, as TRL's own transformers generation returns."""
    completion_ids: list[list[int]] = []
    logprobs: list[list[float | None]] = []
    for output, n in zip(outputs, batch.counts, strict=True):
        samples = sorted(output.outputs, key=lambda c: c.index)
        if len(samples) != n:
            raise RuntimeError(f"the engine returned {len(samples)} completions for a prompt, not {n}")
        for sample in samples:
            completion_ids.append(list(sample.token_ids))
            if with_logprobs:
                logprobs.append(sampled_logprobs(sample))
    return completion_ids, (logprobs if with_logprobs else None)
