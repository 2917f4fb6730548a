"""Deferred detokenisation gives the text vLLM's streaming detokeniser gives (engine and unit level)."""

from __future__ import annotations

import random

from conftest import load_tiny_fast
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer

from trainserve.engine.detokenize import backend_tokenizer, can_defer, fill_text
from trainserve.model_api import state_of


class _Completion:
    def __init__(self, ids, finish_reason):
        self.token_ids, self.finish_reason, self.text = ids, finish_reason, None


class _Output:
    def __init__(self, completion):
        self.outputs = [completion]


def _streamed(backend, prompt, ids, skip):
    """What a DecodeStream primed with the prompt emits for ``ids`` (as vLLM's detokeniser runs it)."""
    stream = DecodeStream(ids=prompt, skip_special_tokens=skip)
    return "".join(stream.step(backend, i) or "" for i in ids)


def test_matches_a_primed_decode_stream_on_random_ids(tiny_path):
    from vllm import SamplingParams

    backend = backend_tokenizer(AutoTokenizer.from_pretrained(tiny_path))
    assert backend is not None, "the tiny tokenizer is byte-level BPE: deferred decoding must apply"
    rng = random.Random(0)
    vocab = backend.get_vocab_size()
    prompt = backend.encode("The secret phrase is").ids
    partial = 0
    for trial in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 24))]
        skip = trial % 3 != 0
        params = SamplingParams(skip_special_tokens=skip)
        completion = _Completion(ids, "length")
        fill_text([_Output(completion)], [params], backend)
        assert completion.text == _streamed(backend, prompt, ids, skip), ids
        partial += backend.decode(ids, skip_special_tokens=skip).endswith("\ufffd")
    assert partial > 10, "random byte tokens should end inside a UTF-8 character often"


def test_stop_token_is_left_out_unless_asked(tiny_path):
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_path)
    backend = backend_tokenizer(tok)
    ids = tok(" hello world").input_ids + [tok.convert_tokens_to_ids("!")]
    for include, expected in ((False, " hello world"), (True, " hello world!")):
        completion = _Completion(ids, "stop")
        fill_text([_Output(completion)], [SamplingParams(include_stop_str_in_output=include)], backend)
        assert completion.text == expected


def test_requests_that_need_text_while_generating_are_not_deferred(tiny_path):
    from vllm import SamplingParams

    backend = backend_tokenizer(AutoTokenizer.from_pretrained(tiny_path))
    assert can_defer(SamplingParams(), backend)
    assert not can_defer(SamplingParams(stop=["."]), backend)
    assert not can_defer(SamplingParams(logprobs=0), backend)
    assert not can_defer(SamplingParams(prompt_logprobs=0), backend)
    assert not can_defer(SamplingParams(detokenize=False), backend)
    assert not can_defer(SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=False), backend)
    assert not can_defer(SamplingParams(), None)


def test_engine_texts_match_vllms_detokenizer():
    from vllm import SamplingParams

    model, tok = load_tiny_fast()
    loop = state_of(model).engine.loop
    stop_id = tok.convert_tokens_to_ids("Ġthe")
    prompts, params = [], []
    for i in range(24):
        prompts.append("Question: What is two plus two? Answer:" if i % 2 else tok(f"Story {i}:").input_ids)
        params.append(SamplingParams(
            temperature=1.0, seed=i, max_tokens=8 + 3 * i, n=1 + i % 3,
            stop_token_ids=[stop_id] if i % 4 == 1 else None, include_stop_str_in_output=i % 8 == 5,
            skip_special_tokens=i % 5 != 0,
            stop=[" the"] if i % 6 == 3 else None, logprobs=0 if i % 7 == 2 else None))  # these two: not deferred
    deferred = loop.generate(prompts, params, defer_detokenize=True)
    streamed = loop.generate(prompts, params, defer_detokenize=False)
    reasons = set()
    for a, b in zip(deferred, streamed, strict=True):
        for ca, cb in zip(sorted(a.outputs, key=lambda c: c.index), sorted(b.outputs, key=lambda c: c.index),
                          strict=True):
            assert list(ca.token_ids) == list(cb.token_ids)
            assert (ca.finish_reason, ca.stop_reason) == (cb.finish_reason, cb.stop_reason)
            assert ca.text == cb.text, (list(ca.token_ids), ca.text, cb.text)
            reasons.add(ca.finish_reason)
    assert reasons == {"stop", "length"}
    assert loop.generate([], params[0]) == []
