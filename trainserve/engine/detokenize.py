"""Decode finished outputs once, at the end, instead of token by token inside the engine loop.

In-process, vLLM detokenises every running request incrementally between engine steps, on the
thread that also schedules the next step; with a few hundred sequences that CPU time leaves the
GPU idle (vLLM's default multi-process mode hides it in another process, which colocation cannot
use). When only finished outputs are wanted, trainserve asks the engine for token ids alone
(``detokenize=False``) and decodes each completion in one batched call afterwards.

The text is the same as vLLM's streaming detokeniser produces, for byte-level BPE tokenizers
(Qwen2, Llama 3) — the only ones this path is used for:

* the final stop token is left out of the text unless ``include_stop_str_in_output``;
* trailing tokens that end in an incomplete UTF-8 character are left out (the stream never
  emits them);
* requests with stop strings, logprobs or prompt logprobs keep vLLM's own detokeniser, since
  those need text (or decoded tokens) while generating.

One case differs: a token-id prompt that ends inside a multi-byte character, whose completion
finishes that character (the stream then attributes the prompt's bytes to the completion).
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


def backend_tokenizer(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` behind a fast tokenizer, if it decodes byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or type(decoder).__name__ != "ByteLevel":
        return None
    return backend


def can_defer(params: Any, backend: Any | None) -> bool:
    """Whether ``params`` can run with ``detokenize=False`` and be decoded afterwards."""
    return (
        backend is not None
        and getattr(params, "detokenize", True)
        and not getattr(params, "stop", None)
        and getattr(params, "logprobs", None) is None
        and getattr(params, "prompt_logprobs", None) is None
        and (params.skip_special_tokens or params.spaces_between_special_tokens)
    )


def _text_tokens(completion: Any, params: Any) -> list[int]:
    ids = list(completion.token_ids)
    if ids and completion.finish_reason == "stop" and not params.include_stop_str_in_output:
        ids = ids[:-1]  # the stop token (EOS or a stop_token_id) is not part of the text
    return ids


def fill_text(outputs: list[Any], params_list: list[Any], backend: Any) -> None:
    """Set ``completion.text`` on every completion of ``outputs`` (one batched decode per setting)."""
    groups: dict[bool, list[tuple[Any, list[int]]]] = {}
    for output, params in zip(outputs, params_list, strict=True):
        for completion in output.outputs:
            groups.setdefault(bool(params.skip_special_tokens), []).append(
                (completion, _text_tokens(completion, params)))
    for skip, items in groups.items():
        texts = backend.decode_batch([ids for _, ids in items], skip_special_tokens=skip)
        for (completion, ids), text in zip(items, texts, strict=True):
            if text.endswith(_REPLACEMENT):
                text = _complete_prefix(backend, ids, skip)
            completion.text = text


def _complete_prefix(backend: Any, ids: list[int], skip: bool) -> str:
    """The text of the longest token prefix whose decoding does not end in U+FFFD, which is what a
    streaming detokeniser has emitted when generation stops (it holds back such text)."""
    for end in range(len(ids) - 1, -1, -1):
        text = backend.decode(ids[:end], skip_special_tokens=skip)
        if not text.endswith(_REPLACEMENT):
            return text
    return ""
