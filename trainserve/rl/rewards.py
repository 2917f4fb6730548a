"""Reward-function validation: a bad reward is an error that names its function, never a silent zero.

TRL turns a reward of ``None`` into NaN and treats it as "this function does not score this
completion" (documented TRL behaviour, kept here). Everything else must be one finite real
number per completion: an exception, a wrong count, a non-number, NaN or ±Inf raises
:class:`RewardFunctionError`.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

_SHOWN = 120  # characters of a completion quoted in an error message


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something other than one finite reward per completion."""

    def __init__(self, name: str, message: str):
        super().__init__(f"reward function {name!r} {message}")
        self.reward_func_name = name


def _quote(completion: Any) -> str:
    text = completion_text(completion)
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "…")


def completion_text(completion: Any) -> str:
    """The text of a completion, plain (``str``) or conversational (a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        parts = []
        for message in completion:
            content = message.get("content", "") if isinstance(message, dict) else message
            if isinstance(content, list):  # content blocks
                content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
            parts.append(str(content))
        return "".join(parts)
    return str(completion)


def validate_rewards(name: str, rewards: Any, completions: Sequence[Any]) -> list[float | None]:
    """Check that ``rewards`` holds one finite number (or ``None``) per completion; return it as a list."""
    if isinstance(rewards, torch.Tensor):
        rewards = rewards.detach().cpu().reshape(-1).tolist()
    elif hasattr(rewards, "tolist") and not isinstance(rewards, (str, bytes)):  # numpy arrays
        rewards = rewards.tolist()
    if isinstance(rewards, (str, bytes, dict)) or not isinstance(rewards, Sequence):
        raise RewardFunctionError(
            name, f"must return a list with one reward per completion, got {type(rewards).__name__}")
    if len(rewards) != len(completions):
        raise RewardFunctionError(
            name, f"returned {len(rewards)} rewards for {len(completions)} completions "
            "(one reward per completion is required)")
    checked: list[float | None] = []
    for i, value in enumerate(rewards):
        if value is None:
            checked.append(None)
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardFunctionError(
                name, f"returned {value!r} ({type(value).__name__}) for completion {i} "
                f"{_quote(completions[i])}; rewards must be real numbers (or None to skip a completion)")
        value = float(value)
        if not math.isfinite(value):
            raise RewardFunctionError(
                name, f"returned {value} for completion {i} {_quote(completions[i])}; rewards must be finite "
                "(return None to skip a completion on purpose)")
        checked.append(value)
    return checked


def _completions_of(args: tuple, kwargs: dict[str, Any]) -> Sequence[Any]:
    if "completions" in kwargs:
        return kwargs["completions"]
    if len(args) >= 2:  # positional (prompts, completions, ...)
        return args[1]
    raise TypeError("reward functions are called with completions=...")


def checked_reward_func(func: Callable[..., Any], name: str) -> Callable[..., Any]:
    """Wrap a TRL reward function so that any failure raises :class:`RewardFunctionError` naming ``name``.

    Synchronous and ``async`` functions are both supported; the wrapper keeps the function's
    ``__name__`` (TRL uses it in metric names) and its sync/async kind.
    """
    if getattr(func, "__trainserve_checked__", False):
        return func
    target = func
    while isinstance(target, functools.partial):
        target = target.func
    is_async = inspect.iscoroutinefunction(target) or (
        not inspect.isroutine(target) and inspect.iscoroutinefunction(type(target).__call__))

    def _raise_from(exc: Exception) -> None:
        raise RewardFunctionError(name, f"raised {type(exc).__name__}: {exc}") from exc

    if is_async:
        async def wrapper(*args: Any, **kwargs: Any) -> list[float | None]:
            completions = _completions_of(args, kwargs)
            try:
                rewards = await func(*args, **kwargs)
            except RewardFunctionError:
                raise
            except Exception as exc:
                _raise_from(exc)
            return validate_rewards(name, rewards, completions)
    else:
        def wrapper(*args: Any, **kwargs: Any) -> list[float | None]:
            completions = _completions_of(args, kwargs)
            try:
                rewards = func(*args, **kwargs)
            except RewardFunctionError:
                raise
            except Exception as exc:
                _raise_from(exc)
            return validate_rewards(name, rewards, completions)

    wrapper.__name__ = name
    wrapper.__qualname__ = name
    wrapper.__doc__ = getattr(func, "__doc__", None)
    wrapper.__wrapped__ = func  # type: ignore[attr-defined]
    wrapper.__trainserve_checked__ = True  # type: ignore[attr-defined]
    return wrapper


def check_model_rewards(name: str, rewards: torch.Tensor) -> None:
    """Raise if a reward *model*'s scores (one column of TRL's reward table) are not all finite."""
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise RewardFunctionError(name, f"(a reward model) gave non-finite scores for completions {bad[:8]}")
