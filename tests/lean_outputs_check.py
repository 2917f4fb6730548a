"""The check shared by the CPU and GPU tests of the lean per-step output path: one mixed batch through
the engine with and without it must give the same outputs, and the lean path must have been taken."""

from __future__ import annotations

from trainserve.engine import vllm_compat
from trainserve.engine.lean_outputs import LeanOutputs


def mixed_batch(max_tokens: int = 12):
    """Token-id requests (one with n=3) beside requests the lean path must leave to vLLM."""
    from vllm import SamplingParams

    prompts = [[5 + i, 9, 11 + i, 4] for i in range(6)]
    m = max_tokens
    params = [
        SamplingParams(max_tokens=m, temperature=1.0, seed=1, ignore_eos=True, detokenize=False),
        SamplingParams(max_tokens=m - 5, temperature=1.0, seed=2, ignore_eos=True, detokenize=False, n=3),
        SamplingParams(max_tokens=m - 3, temperature=1.0, seed=3, ignore_eos=True, detokenize=False, logprobs=0),
        SamplingParams(max_tokens=m - 2, temperature=1.0, seed=4, ignore_eos=True),  # decoded at the end
        SamplingParams(max_tokens=m - 2, temperature=1.0, seed=5, stop=["a"]),  # vLLM's detokeniser, stop strings
        SamplingParams(max_tokens=m + 8, temperature=1.0, seed=6, stop_token_ids=[7, 8, 9, 10]),
    ]
    # outputs the lean path must take at least: every one after the first and before the last
    least = (m - 2) + 3 * (m - 7) + (m - 4)
    return prompts, params, least


def summary(outputs):
    return [[(list(c.token_ids), c.finish_reason, c.text,
              None if c.logprobs is None else [sorted((t, round(lp.logprob, 5)) for t, lp in e.items())
                                              for e in c.logprobs])
             for c in o.outputs] for o in outputs]


def check_lean_matches_vllm(engine, max_tokens: int = 12) -> int:
    """Run the batch with the lean path, then with vLLM's alone; returns the outputs it took."""
    lean = engine.lean_outputs
    assert lean is not None, "the lean output path is not installed on this vLLM"
    prompts, params, least = mixed_batch(max_tokens)
    before = lean.lean_outputs
    vllm_compat.reset_prefix_cache(engine.llm)
    with_lean = engine.loop.generate(prompts, params)
    taken = lean.lean_outputs - before
    assert taken >= least, f"the lean path handled only {taken} outputs (expected at least {least})"
    assert lean.tokens == {}, "finished requests are still tracked"
    lean.uninstall()
    try:
        vllm_compat.reset_prefix_cache(engine.llm)
        plain = engine.loop.generate(prompts, params)
    finally:
        engine.lean_outputs = LeanOutputs.install(engine.llm)
    assert lean.lean_outputs - before == taken  # vLLM's own path ran alone
    assert summary(with_lean) == summary(plain)
    assert [len(o.outputs) for o in with_lean] == [1, 3, 1, 1, 1, 1]
    return taken
