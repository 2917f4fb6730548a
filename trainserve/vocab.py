"""New tokens: ``add_new_tokens(model, tokenizer, new_tokens)`` (Unsloth's) and ``from_pretrained(...,
resize_model_vocab=N)``.

Only without the colocated engine (``fast_inference=False``). The engine's vocabulary is fixed when
it starts: its embedding/``lm_head`` tensors are allocated for the checkpoint's ``vocab_size``
(padded by vLLM to a multiple of 64), the trainer's embedding is a view of their first
``vocab_size`` rows, and every adapter and the base share them. So the route is: add the tokens
and train their rows (``embed_tokens``/``lm_head`` in ``target_modules`` or ``modules_to_save``) with
``fast_inference=False``, ``save_pretrained_merged``, then load the merged checkpoint with
``fast_inference=True``: the engine then has the new vocabulary (``vocab_size`` from the checkpoint;
vLLM's padding rows beyond it are never viewed by the trainer nor sampled by the engine).

New rows start as the mean of the existing embedding (and ``lm_head``) rows, blended with the mean
of the rows of the pieces the *old* tokenizer splits each new token into (``interpolation``), so a
new token starts near what its text meant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

ENGINE_ROUTE = ("the colocated engine's vocabulary is fixed when it starts (its embedding is shared by the base "
                "and every adapter); add tokens with fast_inference=False, train their rows (embed_tokens/lm_head "
                "in target_modules), save_pretrained_merged, and load the merged checkpoint with fast_inference=True")


def _check_model(model: Any, what: str) -> None:
    from trainserve.model_api import state_of

    if state_of(model) is not None:
        raise NotImplementedError(f"{what} with fast_inference=True: {ENGINE_ROUTE}")
    if hasattr(model, "peft_config"):
        raise ValueError(f"{what} must run before get_peft_model (the adapter is built for the vocabulary it sees)")


def pop_resize_model_vocab(kwargs: dict[str, Any], fast_inference: bool) -> int | None:
    """``from_pretrained``'s ``resize_model_vocab`` keyword (refused with the engine, with the route)."""
    size = kwargs.pop("resize_model_vocab", None)
    if size is not None and fast_inference:
        raise NotImplementedError(f"resize_model_vocab={size!r} with fast_inference=True: {ENGINE_ROUTE}")
    return size


def check_vocab_size(size: Any, vocab_size: int) -> None:
    """``resize_model_vocab=size`` (None: not asked) must be an integer no smaller than ``vocab_size``
    (the checkpoint's ``config.vocab_size``): ``from_pretrained`` checks it before the model loads."""
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"resize_model_vocab must be an integer, got {size!r}")
    if size < vocab_size:
        raise ValueError(f"resize_model_vocab={size} is smaller than the model's vocabulary ({vocab_size}); "
                         "trainserve only grows it")


def _check_interpolation(interpolation: Any) -> None:
    if isinstance(interpolation, bool) or not isinstance(interpolation, (int, float)) \
            or not 0.0 <= interpolation <= 1.0:
        raise ValueError(f"interpolation must be a number in [0, 1], got {interpolation!r}")


def _init_rows(model: Any, first: int, last: int, piece_ids: Sequence[Sequence[int]], interpolation: float) -> None:
    """Set embedding (and untied ``lm_head``) rows ``first..last-1`` to the mean of rows ``0..first-1``,
    blended (weight ``interpolation``) with the mean of rows ``piece_ids[row - first]``."""
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:
        matrices.append(head.weight)
    with torch.no_grad():
        for weight in matrices:
            mean = weight[:first].float().mean(0)
            for row in range(first, last):
                value = mean
                pieces = list(piece_ids[row - first]) if row - first < len(piece_ids) else []
                if pieces and interpolation:
                    value = (1 - interpolation) * mean + interpolation * weight[pieces].float().mean(0)
                weight[row] = value.to(weight.dtype)


def resize_vocab(model: Any, size: int, piece_ids: Sequence[Sequence[int]] = (), interpolation: float = 0.5) -> None:
    """Grow ``model``'s embedding (and an untied ``lm_head``) to ``size`` rows; ``piece_ids[i]`` are the old
    token ids whose mean is blended (weight ``interpolation``) into new row ``i``."""
    old = model.get_input_embeddings().weight.shape[0]
    check_vocab_size(size, old)
    _check_interpolation(interpolation)
    if size == old:
        return
    model.resize_token_embeddings(size, mean_resizing=False)
    _init_rows(model, old, size, piece_ids, interpolation)


def add_new_tokens(model: Any, tokenizer: Any, new_tokens: Sequence[str] = (), method: str = "mean",
                   interpolation: float = 0.5) -> None:
    """Add ``new_tokens`` to ``tokenizer`` and grow ``model``'s vocabulary to match (Unsloth's call).

    Call it after ``from_pretrained(..., fast_inference=False)`` and before ``get_peft_model``; train the
    new rows with ``embed_tokens``/``lm_head`` in ``target_modules``. ``method="mean"`` (the only one):
    see the module docstring. Every argument is checked before the tokenizer changes.

    The rows initialised are the new token ids (old ``len(tokenizer)`` to the new one), whether or not
    the embedding had to grow: checkpoints pad their embedding beyond the tokenizer (Qwen2: 151,936
    rows for 151,665 tokens), so new ids usually land in existing padding rows, which hold zeros or
    noise, not a meaningful start."""
    _check_model(model, "add_new_tokens")
    if method != "mean":
        raise NotImplementedError(f"method={method!r} is not supported; use method='mean'")
    _check_interpolation(interpolation)
    if isinstance(new_tokens, str) or not all(isinstance(t, str) and t for t in new_tokens):
        raise ValueError("new_tokens must be a list of non-empty strings")
    existing = set(tokenizer.get_vocab())
    fresh = [t for t in dict.fromkeys(new_tokens) if t not in existing]
    pieces = [tokenizer(t, add_special_tokens=False).input_ids for t in fresh]
    rows = model.get_input_embeddings().weight.shape[0]
    first = min(len(tokenizer), rows)  # the rows of real tokens: the mean's source
    tokenizer.add_tokens(fresh)
    last = len(tokenizer)
    if last > rows:
        model.resize_token_embeddings(last, mean_resizing=False)
    by_row: list[list[int]] = [[] for _ in range(max(last - first, 0))]
    for token, p in zip(fresh, pieces, strict=True):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if first <= token_id < last:
            by_row[token_id - first] = [i for i in p if i < first]
    _init_rows(model, first, last, by_row, interpolation)


def resize_for_from_pretrained(model: Any, size: int | None) -> None:
    """``from_pretrained(resize_model_vocab=size)`` without the engine (new rows: the mean row)."""
    if size is not None:
        _check_model(model, f"resize_model_vocab={size}")
        resize_vocab(model, size)


def resize_for_saved_adapter(model: Any, tokenizer: Any, weights: dict[str, torch.Tensor],
                             base_tokens: int | None = None) -> None:
    """Reloading an adapter trained with new tokens: grow the base to the saved embedding's rows.

    ``tokenizer`` is the one saved with the adapter (or the base's), ``base_tokens`` the base
    tokenizer's length. The new tokens' rows must have been trained (saved with the adapter as
    ``modules_to_save``), else their initial values (``add_new_tokens``: blended from each token's
    pieces) could not be re-created: a saved tokenizer larger than the saved rows is refused, and so
    is, on an untied base (its own ``lm_head``), saving only one of ``embed_tokens``/``lm_head``
    when tokens were added (whether the embedding grew or the new ids fit in the checkpoint's
    padding rows, which hold other values). Tokens added with no embedding trained at all and fitting
    in the padding rows are let through: nothing says ``add_new_tokens`` initialised them."""
    saved = {k.rsplit(".", 2)[-2]: t.shape[0] for k, t in weights.items()
             if k.endswith(("embed_tokens.weight", "lm_head.weight"))}
    rows = max(saved.values(), default=model.config.vocab_size)
    if tokenizer is not None and len(tokenizer) > max(rows, model.config.vocab_size):
        raise NotImplementedError(
            f"the tokenizer saved with the adapter has {len(tokenizer)} tokens, more than the base model's "
            f"vocab_size {model.config.vocab_size}, and the adapter did not train embed_tokens, so the new tokens' "
            "rows were not saved; train them (embed_tokens/lm_head in target_modules) or save_pretrained_merged")
    added = tokenizer is not None and base_tokens is not None and len(tokenizer) > base_tokens
    head = model.get_output_embeddings()
    untied = head is not None and head.weight is not model.get_input_embeddings().weight
    unsaved = sorted({"embed_tokens", "lm_head"} - set(saved))
    if untied and saved and unsaved and (added or rows > model.config.vocab_size):
        raise NotImplementedError(
            f"the adapter was trained with new tokens and saved the trained {sorted(saved)} only; the base's "
            f"lm_head is not tied to its embedding, so the new tokens' rows of {unsaved} were initialised when "
            "the tokens were added and are not saved: they cannot be re-created. Train both (embed_tokens and "
            "lm_head in target_modules) or export with save_pretrained_merged")
    if rows > model.config.vocab_size:
        _check_model(model, "an adapter with new tokens")
        resize_vocab(model, rows)
