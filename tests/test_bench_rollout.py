"""The rollout benchmark gives every timed rollout fresh prompts, the same in every arm, and counts the
prompt tokens an arm took from vLLM's prefix cache (a repeat of the same prompts under the same
adapter id skipped most of its prefill in the plain-vLLM arms before 2026-12-02)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.append(str(SCRIPTS))

import bench_rollout as bench  # noqa: E402


def test_each_timed_rollout_has_fresh_prompts_shared_by_all_arms():
    a = SimpleNamespace(prompts=16, prompt_len=8, repeats=3)
    sets = bench._rollout_prompts(a)
    assert len(sets) == 3 and all(len(s) == 16 and all(len(p) == 8 for p in s) for s in sets)
    seen = [tuple(p) for s in sets for p in s] + [tuple(p) for p in bench._prompts(16, 8)]  # + the warm-up set
    assert len(set(seen)) == len(seen), "a prompt repeats between rollouts"
    assert bench._rollout_prompts(a) == sets  # another arm's process gets the very same prompts
    later = bench._rollout_prompts(a, first=1 + a.repeats)
    assert not {tuple(p) for s in later for p in s} & set(seen)


def test_timed_reports_the_median_and_the_cached_prompt_tokens():
    calls, before = [], []

    def run(prompts):
        calls.append(prompts)
        return [SimpleNamespace(num_cached_tokens=len(prompts)), SimpleNamespace(num_cached_tokens=None)]

    seconds, outs, cached = bench._timed(run, [[1], [2, 3], [4, 5, 6]], before=lambda: before.append(len(calls)))
    assert calls == [[1], [2, 3], [4, 5, 6]] and before == [0, 1, 2]
    assert cached == 6 and outs[0].num_cached_tokens == 3 and seconds >= 0
