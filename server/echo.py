"""``echo`` and ``prompt_logprobs`` on ``/v1/completions``, with vLLM's semantics.

Likelihood scoring (lm-eval's ``local-completions`` loglikelihood, multiple-choice and perplexity
tasks) sends ``echo=true, logprobs=k, max_tokens=0 or 1`` and reads the logprob of every prompt
token from ``choices[i].logprobs``. As in vLLM (and OpenAI's legacy completions):

* with ``echo`` the engine is asked for prompt logprobs (``prompt_logprobs``, or else ``logprobs``);
* the first output of each choice is prefixed with the prompt's text, token ids and logprobs; the
  first prompt token has no logprob (``null``, and ``null`` top logprobs);
* ``max_tokens=0`` with ``echo`` returns the prompt alone (the engine still runs one step:
  ``max_tokens=1``, whose token counts in ``usage`` as in vLLM);
* ``prompt_logprobs`` (vLLM's extra) puts vLLM's raw per-token dicts on each choice
  (``{token_id: {"logprob", "rank", "decoded_token"}}``, the first entry ``null``); it is refused
  with ``stream=true``, where there is no place to return it.

Prompt logprobs are bounded per request (:func:`check_prompt_logprobs`): vLLM detokenises every
entry (each prompt token and its alternatives, for each of the ``n`` copies of a prompt) on the
engine thread as the prompt's prefill finishes, so 256 prompts × 240 tokens × 21 entries stalled
every other client for 40 s on a 2-core CPU. The logprobs of generated tokens get the same budget
(:func:`check_output_logprobs`, any request): n=64 × 200 tokens × 21 entries stalled other
clients for 5 s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainserve.server.errors import bad_request
from trainserve.server.generation import clamp_logprob
from trainserve.server.schemas import MAX_LOGPROBS, CompletionRequest


def engine_prompt_logprobs(req: CompletionRequest) -> int | None:
    """The ``prompt_logprobs`` the engine must compute (vLLM: echo implies ``logprobs`` of them)."""
    if req.prompt_logprobs is not None:
        if req.stream:
            raise bad_request(
                "prompt_logprobs are not available when stream=true", param="prompt_logprobs"
            )
        return req.prompt_logprobs
    return req.logprobs if req.echo else None


# entries of prompt logprobs one request may ask for (at least one full-context prompt at the maximum
# of 20 alternatives; 30–200 µs each on a 2-core CPU): lm-eval's loglikelihood requests (logprobs=1,
# 2 entries a token) fit 32k prompt tokens
MAX_PROMPT_LOGPROB_ENTRIES = 1 << 16


def logprob_entry_limit(max_model_len: int) -> int:
    """Logprob entries (a token or one of its alternatives) one request may ask for: the budget, or one
    full-context sequence at the maximum of alternatives, whichever is larger."""
    return max(MAX_PROMPT_LOGPROB_ENTRIES, max_model_len * (MAX_LOGPROBS + 1))


def check_prompt_logprobs(req: CompletionRequest, prompts: list[list[int]], k: int | None, max_model_len: int) -> None:
    """A 400 before anything is queued when the prompt logprobs the engine would compute (``k`` from
    :func:`engine_prompt_logprobs`: each prompt token and ``k`` alternatives, for each of the ``n``
    completions of each prompt, as vLLM computes them per completion) exceed the per-request budget."""
    if k is None:
        return
    tokens = sum(len(p) for p in prompts)
    entries = tokens * req.n * (k + 1)
    limit = logprob_entry_limit(max_model_len)
    if entries > limit:
        param = "prompt_logprobs" if req.prompt_logprobs is not None else "echo"
        raise bad_request(
            f"prompt logprobs for {tokens} prompt tokens x n={req.n} x {k + 1} (each token and {k} "
            f"alternatives) are {entries} entries, more than the {limit} one request may ask for (the engine "
            "computes them in one step, holding up every other request): send fewer or shorter prompts "
            "per request, a smaller n, or a smaller prompt_logprobs / logprobs",
            param=param,
        )


def check_output_logprobs(completions: int, max_tokens: int, k: int | None, max_model_len: int, param: str) -> None:
    """A 400 before anything is queued when the logprobs of the generated tokens could exceed the same
    per-request budget as prompt logprobs: ``completions`` x ``max_tokens`` tokens, each with ``k``
    alternatives. Without it one request (n=64, 200 tokens, 20 alternatives: 269k entries, an 18 MB
    response) held every other client up for seconds while its entries were built."""
    if k is None:
        return
    entries = completions * max_tokens * (k + 1)
    limit = logprob_entry_limit(max_model_len)
    if entries > limit:
        raise bad_request(
            f"logprobs for up to {completions} completion(s) x {max_tokens} tokens x {k + 1} (each token and {k} "
            f"alternatives) are up to {entries} entries, more than the {limit} one request may ask for: ask for "
            "fewer completions (n), a smaller max_tokens, or fewer alternatives",
            param=param,
        )


def prompt_texts(req: CompletionRequest, prompts: list[list[int]], tokenizer: Any, max_chars: int) -> list[str]:
    """The text each prompt echoes: a text prompt as sent (unless it was truncated), token ids
    decoded (vLLM detokenises token-id prompts for echo)."""
    p = req.prompt
    raw: list[Any] = [p] if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)) else list(p)
    texts = []
    for item, ids in zip(raw, prompts, strict=True):
        if isinstance(item, str) and req.truncate_prompt_tokens is None and len(item) <= max_chars:
            texts.append(item)
        else:
            texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return texts


def format_prompt_logprobs(entries: Any) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs`` in JSON: token-id keys, ``-inf`` clamped to -9999."""
    if entries is None:
        return None
    out: list[dict[str, Any] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        out.append(
            {
                str(token_id): {
                    "logprob": clamp_logprob(lp.logprob),
                    "rank": lp.rank,
                    "decoded_token": lp.decoded_token,
                }
                for token_id, lp in entry.items()
            }
        )
    return out


@dataclass
class EchoPlan:
    """What the completions of one request echo (``texts`` and ``ids`` per prompt)."""

    texts: list[str]
    ids: list[list[int]]
    prompt_only: bool  # max_tokens=0: the prompt without a generated token
    echoed: set[int] = field(default_factory=set)

    def prefix(
        self, choice: int, prompt_index: int, prompt_lps: Any, text: str, ids: list[int], lps: Any
    ) -> tuple[str, list[int], Any]:
        """The first output of ``choice`` with the prompt in front (text, token ids, logprobs);
        later outputs unchanged."""
        if choice in self.echoed:
            return ("", [], []) if self.prompt_only else (text, ids, lps)
        self.echoed.add(choice)
        p_text, p_ids = self.texts[prompt_index], self.ids[prompt_index]
        p_lps = list(prompt_lps) if prompt_lps is not None else None
        if self.prompt_only:
            return p_text, list(p_ids), p_lps
        merged = None if p_lps is None or lps is None else [*p_lps, *lps]
        return p_text + text, [*p_ids, *ids], merged
