"""The lean per-step output path (``trainserve/engine/lean_outputs.py``) returns what vLLM's own
``process_outputs`` returns, takes over only the outputs it may, and keeps no state for requests
vLLM has dropped."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import load_tiny_fast
from lean_outputs_check import check_lean_matches_vllm

from trainserve.engine.launch import current_engine
from trainserve.engine.lean_outputs import PRUNE_EVERY, LeanOutputs, lean_outputs_enabled


def test_lean_path_returns_what_vllm_returns():
    load_tiny_fast()
    check_lean_matches_vllm(current_engine())


def test_aborted_requests_are_not_kept():
    from vllm import SamplingParams

    load_tiny_fast()
    engine = current_engine()
    loop = engine.loop
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=0, ignore_eos=True, detokenize=False)
    from vllm.sampling_params import RequestOutputKind

    params.output_kind = RequestOutputKind.FINAL_ONLY
    streams = [loop.submit({"type": "token", "prompt_token_ids": [5, 6, 7 + i]}, params) for i in range(3)]
    done = loop.generate([[4, 5, 6]], SamplingParams(max_tokens=8, detokenize=False, ignore_eos=True))
    assert len(done[0].outputs[0].token_ids) == 8
    assert len(engine.lean_outputs.tokens) == 3  # still running, tracked
    for s in streams:
        loop.abort(s.request_id)
    loop.generate([[4, 5, 6]], SamplingParams(max_tokens=4, detokenize=False, ignore_eos=True))
    assert engine.lean_outputs.tokens == {}


class _Processor:
    """A stand-in for vLLM's OutputProcessor: records what reaches its own path."""

    def __init__(self):
        self.request_states = {}
        self.seen: list[list[str]] = []

    def process_outputs(self, outputs, timestamp=None, stats=None, **more):
        self.seen.append([o.request_id for o in outputs])
        for o in outputs:
            if o.finish_reason is not None:
                self.request_states.pop(o.request_id, None)
        return SimpleNamespace(request_outputs=[], reqs_to_abort=[])


def _out(rid, tokens, finish=None, logprobs=None):
    return SimpleNamespace(request_id=rid, new_token_ids=tokens, finish_reason=finish, new_logprobs=logprobs)


def test_only_unfinished_token_outputs_of_tracked_requests_skip_vllm(monkeypatch):
    from trainserve.engine import vllm_compat

    processor = _Processor()
    lists = {"a": [1], "b": [2]}
    processor.request_states = {"a": object(), "b": object(), "c": object()}
    monkeypatch.setattr(vllm_compat, "final_only_token_list", lambda p, rid: lists.get(rid))
    lean = LeanOutputs(processor, ("finish_reason", "new_logprobs"))
    lean.process_outputs([_out("a", [1]), _out("b", [2]), _out("c", [3])], 0.0, None, weight_version="v1")
    assert processor.seen[-1] == ["a", "b", "c"]  # first outputs go through vLLM, then a and b are tracked
    assert set(lean.tokens) == {"a", "b"}
    lean.process_outputs([_out("a", [4]), _out("b", [5], logprobs=[0.1]), _out("c", [6])], 0.0, None,
                         weight_version="v1")
    assert processor.seen[-1] == ["b", "c"] and lists["a"] == [1, 4]
    lean.process_outputs([_out("a", [7], finish="length")], 0.0, None, weight_version="v1")
    assert processor.seen[-1] == ["a"] and "a" not in lean.tokens and lists["a"] == [1, 4]
    lean.process_outputs([_out("b", [8])], 0.0, None, weight_version="v2")  # new version: vLLM records it
    assert processor.seen[-1] == ["b"]
    lean.process_outputs([_out("b", [9])], 0.0, SimpleNamespace(), weight_version="v2")  # statistics: all to vLLM
    assert processor.seen[-1] == ["b"]
    assert set(lean.tokens) == {"b"}
    del processor.request_states["b"]  # aborted: no last output; dropped within PRUNE_EVERY steps
    for _ in range(PRUNE_EVERY):
        lean.process_outputs([_out("c", [1])], 0.0, None, weight_version="v2")
    assert lean.tokens == {}


def test_switch(monkeypatch):
    monkeypatch.setenv("TRAINSERVE_LEAN_OUTPUTS", "0")
    assert not lean_outputs_enabled()
    assert LeanOutputs.install(object()) is None
    monkeypatch.setenv("TRAINSERVE_LEAN_OUTPUTS", "yes")
    with pytest.raises(ValueError, match="TRAINSERVE_LEAN_OUTPUTS"):
        lean_outputs_enabled()
