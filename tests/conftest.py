"""Shared test fixtures.

One vLLM engine per test process: every engine test loads the tiny model through
:func:`load_tiny_fast`, whose fixed engine settings make ``from_pretrained`` reuse the running
engine (each call still builds a fresh transformers model over the engine's tensors).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

# Engine settings shared by every in-process engine test (changing one starts a new engine).
ENGINE_KWARGS = dict(max_seq_length=256, load_in_4bit=True, fast_inference=True,
                     gpu_memory_utilization=0.3, max_lora_rank=16)


def load_tiny_fast(**overrides):
    """``FastLanguageModel.from_pretrained(tiny_model(), **ENGINE_KWARGS)`` → (model, tokenizer)."""
    import warnings

    from trainserve import FastLanguageModel, tiny_model

    kwargs = {**ENGINE_KWARGS, **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the one-time "no CUDA, loading 16-bit" warning
        return FastLanguageModel.from_pretrained(tiny_model(), **kwargs)


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from trainserve import tiny_model

    return tiny_model()


@pytest.fixture(scope="module")
def server(request):
    """The suite's shared ``trainserve serve`` process (see ``server_support.shared_server``)."""
    from server_support import shared_server

    return shared_server(request.config, request.session)


@pytest.fixture(scope="module")
def http(server):
    """An HTTP client for :func:`server`."""
    with server.client() as c:
        yield c
