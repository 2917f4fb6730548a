"""Full fine-tuning with the live engine: ``full_finetuning=True, fast_inference=True``.

The trainer's parameters are the engine's tensors; after an optimizer step the engine must
generate exactly what the trainer computes (logprob parity), never from KV cached before the step.
The module shuts its engine down at the end: full fine-tuning changed the engine's weights.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import load_tiny_fast

pytestmark = pytest.mark.engine

# > 128 tokens: the CPU engine caches KV in blocks of 128, so the first block is reused by a prefix hit.
LONG = " ".join(["the quick brown fox jumps over the lazy dog and"] * 6)


@pytest.fixture(scope="module")
def full():
    from trainserve import shutdown_engine

    shutdown_engine()
    model, tok = load_tiny_fast(full_finetuning=True, load_in_4bit=False, use_gradient_checkpointing=True)
    yield model, tok
    shutdown_engine()


def _params(n: int, **kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, logprobs=0, **kw)


def _engine(model, prompt_ids: list[int], n: int = 6) -> tuple[list[int], list[float]]:
    out = model.fast_generate([prompt_ids], sampling_params=_params(n))[0].outputs[0]
    return list(out.token_ids), [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs, strict=True)]


def _trainer_logprobs(model, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """log p(tokens[i] | prompt + tokens[:i]) from the trainer's forward."""
    ids = torch.tensor([prompt_ids + tokens[:-1]])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[i, t]) for i, t in enumerate(tokens)]


def _step(model, tok, lr: float = 3e-2, **opt_kwargs) -> None:
    ids = torch.tensor([tok("Paris is the capital of France. " * 4).input_ids])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **opt_kwargs)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def test_every_parameter_is_trainable_and_a_view_of_the_engine(full):
    from trainserve.model_api import state_of
    from trainserve.weights import shared_storage_report

    model, _ = full
    engine = state_of(model).engine
    assert all(p.requires_grad for p in model.parameters())
    assert shared_storage_report(model, engine.model)["separate"] == 0
    assert model.model._trainserve_gc is True  # from_pretrained's use_gradient_checkpointing applies


def test_generation_follows_a_training_step_and_never_reuses_stale_kv(full):
    model, tok = full
    prompt = tok(LONG).input_ids
    assert len(prompt) > 128
    before_tokens, before_lp = _engine(model, prompt)  # fills the prefix cache with the old weights' KV
    assert before_lp == pytest.approx(_trainer_logprobs(model, prompt, before_tokens), abs=1e-4)
    _step(model, tok)
    tokens, lp = _engine(model, prompt)
    want = _trainer_logprobs(model, prompt, tokens)
    assert lp == pytest.approx(want, abs=1e-4)
    # the step really changed what is served (so the parity above is about new weights)
    assert max(abs(a - b) for a, b in zip(_trainer_logprobs(model, prompt, before_tokens), before_lp,
                                          strict=True)) > 1e-2


def test_without_the_cache_reset_the_engine_would_answer_from_stale_kv(full, monkeypatch):
    """The parity check above can fail: skip the reset and the old weights' KV is reused."""
    from trainserve.model_api import state_of

    model, tok = full
    prompt = tok(LONG + " again").input_ids
    _engine(model, prompt)  # cache this prompt's first block
    llm_engine = state_of(model).engine.llm.llm_engine
    monkeypatch.setattr(llm_engine, "reset_prefix_cache", lambda *a, **k: True)
    _step(model, tok)
    tokens, lp = _engine(model, prompt)
    assert lp != pytest.approx(_trainer_logprobs(model, prompt, tokens), abs=1e-4)
    monkeypatch.undo()
    state_of(model).engine.loop.call(lambda: llm_engine.reset_prefix_cache())


def test_fused_optimizer_and_manual_edits_are_seen(full):
    model, tok = full
    prompt = tok(LONG + " once more").input_ids
    _engine(model, prompt)
    _step(model, tok, fused=True)  # fused AdamW does not bump tensor versions: the step hook counts it
    tokens, lp = _engine(model, prompt)
    assert lp == pytest.approx(_trainer_logprobs(model, prompt, tokens), abs=1e-4)
    with torch.no_grad():  # an edit outside any optimizer: caught by the version counters
        model.model.norm.weight.mul_(1.5)
    tokens, lp = _engine(model, prompt)
    assert lp == pytest.approx(_trainer_logprobs(model, prompt, tokens), abs=1e-4)


def test_requests_in_flight_continue_on_the_new_weights_after_a_step(full):
    """Background engine loop (as under ``model.serve``): a step during a generation runs between
    engine steps; the request's KV is recomputed, so every token after the step is the new weights'."""
    from trainserve.model_api import state_of

    model, tok = full
    loop = state_of(model).engine.loop
    prompt = tok(LONG + " in flight").input_ids
    n = 40
    old = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seen = threading.Event()

    def on_output(output) -> None:
        if not isinstance(output, BaseException) and len(output.outputs[0].token_ids) >= 3:
            seen.set()
            time.sleep(0.02)  # pace the rest of the generation so the step lands inside it, even on a busy CPU

    from vllm.inputs import TokensPrompt

    # Forward and backward first, so only the optimizer step itself races the generation (on a busy
    # CPU a whole training step could outlast the 40 tokens).
    ids = torch.tensor([tok("Paris is the capital of France. " * 4).input_ids])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    loop.start_background()
    try:
        stream = loop.submit(TokensPrompt(prompt_token_ids=prompt), _params(n, ignore_eos=True), on_output=on_output)
        assert seen.wait(60)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out = stream.result(120).outputs[0]
    finally:
        loop.stop_background()
    tokens = list(out.token_ids)
    assert len(tokens) == n
    lp = [d[t].logprob for t, d in zip(tokens, out.logprobs, strict=True)]
    new_lp = _trainer_logprobs(model, prompt, tokens)
    new = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.load_state_dict(old)
    old_lp = _trainer_logprobs(model, prompt, tokens)
    with torch.no_grad():
        model.load_state_dict(new)
    model.fast_generate("x", sampling_params=_params(1))  # the no_grad restore resets the cache again
    # one switch point s: tokens before it from the old weights, every token from it on from the new
    switch = next(i for i in range(n + 1) if i == n or abs(lp[i] - old_lp[i]) > 1e-4)
    assert 3 <= switch < n
    assert lp[switch:] == pytest.approx(new_lp[switch:], abs=1e-4)


def test_the_changed_engine_is_not_reused_by_a_later_load(full):
    model, tok = full
    _step(model, tok)
    with pytest.raises(RuntimeError, match="changed by full fine-tuning"):
        load_tiny_fast(full_finetuning=True, load_in_4bit=False)


class _FailingOptimizer(torch.optim.Optimizer):
    """Writes its update, then raises when ``fail`` is set (as a step failing half-way would)."""

    def __init__(self, params, fail: bool):
        super().__init__(params, {"lr": 1e-3})
        self.fail = fail

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(1 - group["lr"])
        if self.fail:
            raise RuntimeError("the step failed")


def test_a_step_that_raises_does_not_leave_the_engine_held(full):
    """A failing optimizer step (its first, or a later one through ``optimizer.step``) releases the
    engine loop: the background loop and generation from another thread go on, from new KV."""
    import sys
    import warnings

    from trainserve.model_api import state_of

    model, tok = full
    state = state_of(model)
    loop, live = state.engine.loop, state.live_base
    params = [model.model.norm.weight]

    def generate_in_another_thread() -> list:
        result: list = []
        worker = threading.Thread(target=lambda: result.append(model.fast_generate(["x"], sampling_params=_params(2))))
        worker.start()
        worker.join(60)
        return result

    loop.start_background()
    try:
        for first_step_fails in (True, False):
            opt = _FailingOptimizer(params, fail=first_step_fails)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # wraps opt.step before ours
            if not first_step_fails:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # no "optimizer.step() has been overridden" warning
                    opt.step()
                    sched.step()
                opt.fail = True
            resets = live.invalidations
            with pytest.raises(RuntimeError, match="the step failed"):
                opt.step()
            assert loop.call(lambda: "free", timeout=30) == "free"  # the engine loop thread is not blocked
            assert sys.getprofile() is None  # the first step's watch (LiveBase.guard) is gone
            assert live.invalidations == resets + 1  # the half-written step's KV is not reused
            assert len(generate_in_another_thread()) == 1
    finally:
        live._release()  # only does anything when the test failed: unblock the loop thread
        loop.stop_background()
    prompt = tok(LONG + " after a failed step").input_ids
    tokens, lp = _engine(model, prompt)
    assert lp == pytest.approx(_trainer_logprobs(model, prompt, tokens), abs=1e-4)


@pytest.mark.parametrize("kwargs", [dict(), dict(target_modules=["q_proj", "embed_tokens"])])
def test_get_peft_model_on_the_live_full_finetuning_model_is_refused(full, kwargs):
    """Full fine-tuning already trains every engine weight in place: a LoRA adapter (and its live
    engine slot) on top is refused, without telling the user to use full_finetuning=True."""
    from trainserve import FastLanguageModel
    from trainserve.model_api import state_of

    model, _ = full
    with pytest.raises(ValueError, match="full_finetuning=True and fast_inference=True.*cannot be added") as err:
        FastLanguageModel.get_peft_model(model, r=8, **kwargs)
    assert "use full_finetuning=True" not in str(err.value)
    assert not hasattr(model, "peft_config") and state_of(model).live is None


def test_the_cache_reset_goes_through_vllm_compat(full, monkeypatch):
    """Private vLLM access lives in trainserve/engine/vllm_compat.py only: the step's reset uses it."""
    from trainserve.engine import vllm_compat

    model, tok = full
    calls = []
    real = vllm_compat.reset_prefix_cache

    def recording(llm, running=False):
        calls.append(running)
        return real(llm, running=running)

    monkeypatch.setattr(vllm_compat, "reset_prefix_cache", recording)
    _step(model, tok)
    assert calls == [True]
