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


def resize_vocab(model: Any, size: int, piece_ids: Sequence[Sequence[int]] = (), interpolation: float = 0.5) -> None:
    """Grow ``model``'s embedding (and an untied ``lm_head``) to ``size`` rows; ``piece_ids[i]`` are the old
    token ids whose mean is blended (weight ``interpolation``) into new row ``i``."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"resize_model_vocab must be an integer, got {size!r}")
    old = model.get_input_embeddings().weight.shape[0]
    if size < old:
        raise ValueError(f"resize_model_vocab={size} is smaller than the model's vocabulary ({old}); "
                         "trainserve only grows it")
    if not 0.0 <= interpolation <= 1.0:
        raise ValueError(f"interpolation must be in [0, 1], got {interpolation!r}")
    if size == old:
        return
    model.resize_token_embeddings(size, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:
        matrices.append(head.weight)
    with torch.no_grad():
        for weight in matrices:
            mean = weight[:old].float().mean(0)
            for row in range(old, size):
                value = mean
                pieces = list(piece_ids[row - old]) if row - old < len(piece_ids) else []
                if pieces and interpolation:
                    value = (1 - interpolation) * mean + interpolation * weight[pieces].float().mean(0)
                weight[row] = value.to(weight.dtype)


def add_new_tokens(model: Any, tokenizer: Any, new_tokens: Sequence[str] = (), method: str = "mean",
                   interpolation: float = 0.5) -> None:
    """Add ``new_tokens`` to ``tokenizer`` and grow ``model``'s vocabulary to match (Unsloth's call).

    Call it after ``from_pretrained(..., fast_inference=False)`` and before ``get_peft_model``; train the
    new rows with ``embed_tokens``/``lm_head`` in ``target_modules``. ``method="mean"`` (the only one):
    see the module docstring."""
    _check_model(model, "add_new_tokens")
    if method != "mean":
        raise NotImplementedError(f"method={method!r} is not supported; use method='mean'")
    if isinstance(new_tokens, str) or not all(isinstance(t, str) and t for t in new_tokens):
        raise ValueError("new_tokens must be a list of non-empty strings")
    existing = set(tokenizer.get_vocab())
    fresh = [t for t in dict.fromkeys(new_tokens) if t not in existing]
    pieces = [tokenizer(t, add_special_tokens=False).input_ids for t in fresh]
    tokenizer.add_tokens(fresh)
    size = max(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    ids = [tokenizer.convert_tokens_to_ids(t) for t in fresh]
    old = model.get_input_embeddings().weight.shape[0]
    by_row = [[] for _ in range(size - old)]
    for token_id, p in zip(ids, pieces, strict=True):
        if token_id >= old:
            by_row[token_id - old] = [i for i in p if i < old]
    resize_vocab(model, size, by_row, interpolation)


def resize_for_from_pretrained(model: Any, size: int | None) -> None:
    """``from_pretrained(resize_model_vocab=size)`` without the engine (new rows: the mean row)."""
    if size is not None:
        _check_model(model, f"resize_model_vocab={size}")
        resize_vocab(model, size)


def resize_for_saved_adapter(model: Any, tokenizer: Any, weights: dict[str, torch.Tensor]) -> None:
    """Reloading an adapter trained with new tokens: grow the base to the saved embedding's rows.

    The new rows must have been trained (saved with the adapter as ``modules_to_save``), else their
    initial values could not be re-created; a saved tokenizer larger than that is refused."""
    rows = max((t.shape[0] for k, t in weights.items() if k.endswith(("embed_tokens.weight", "lm_head.weight"))),
               default=model.config.vocab_size)
    if tokenizer is not None and len(tokenizer) > max(rows, model.config.vocab_size):
        raise NotImplementedError(
            f"the tokenizer saved with the adapter has {len(tokenizer)} tokens, more than the base model's "
            f"vocab_size {model.config.vocab_size}, and the adapter did not train embed_tokens, so the new tokens' "
            "rows were not saved; train them (embed_tokens/lm_head in target_modules) or save_pretrained_merged")
    if rows > model.config.vocab_size:
        _check_model(model, "an adapter with new tokens")
        resize_vocab(model, rows)
