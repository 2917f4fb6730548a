"""Shared prefixes (trainserve.models.shared_prefix): a GRPO-shaped batch (each prompt several
times, left-padded, completions right-padded) computed with each common prefix once gives the
unpatched transformers model's log-probabilities and LoRA gradients, in every checkpointing mode;
and the plan groups rows only where they really share tokens."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import peft_with_nonzero_b

import trainserve
from trainserve.models import attention as attn
from trainserve.models import shared_prefix as sp
from trainserve.models.qwen2 import FastQwen2Model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return str(trainserve.tiny_model())


@pytest.fixture(autouse=True)
def _shared_prefix_on(monkeypatch) -> None:
    """On CUDA sharing is on by default; on this CPU it runs only when asked for (explicit mask)."""
    monkeypatch.setenv("TRAINSERVE_SHARED_PREFIX", "1")


def _grpo_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """3 prompts (20, 26, 31 tokens) x 4 samples, left-padded to 31; completions of 1-12 tokens,
    right-padded to 12. Two samples of the second prompt are identical; one extra row is alone."""
    g = torch.Generator().manual_seed(seed)
    prompt_len, comp_len = 31, 12
    rows, masks = [], []
    for plen in (20, 26, 31):
        prompt = torch.randint(3, 500, (plen,), generator=g)
        for k in range(4):
            n = int(torch.randint(1, comp_len + 1, (1,), generator=g))
            comp = torch.randint(3, 500, (n,), generator=g)
            if plen == 26 and k == 1:
                comp, n = rows[-1][prompt_len:][masks[-1][prompt_len:].bool()], int(masks[-1][prompt_len:].sum())
            rows.append(torch.cat([torch.zeros(prompt_len - plen, dtype=torch.long), prompt, comp,
                                   torch.zeros(comp_len - n, dtype=torch.long)]))
            masks.append(torch.cat([torch.zeros(prompt_len - plen), torch.ones(plen + n), torch.zeros(comp_len - n)]))
    alone = torch.randint(3, 500, (prompt_len + comp_len,), generator=g)
    rows.append(alone)
    masks.append(torch.ones(prompt_len + comp_len))
    return torch.stack(rows), torch.stack(masks).long(), comp_len


def _model(path: str, patch: bool, gc=False):
    m = transformers.AutoModelForCausalLM.from_pretrained(path)
    if patch:
        FastQwen2Model.patch_model(m, use_gradient_checkpointing=gc)
    pm = peft_with_nonzero_b(m, TARGETS, 0.0)
    pm.train()
    return pm


def _logps_and_grads(model, ids, mask, comp_len):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -comp_len - 1:-1]
    target = ids[:, -comp_len:]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, target[..., None])[..., 0]
    keep = mask[:, -comp_len:].bool()
    weights = torch.linspace(-1, 1, ids.shape[0])[:, None]  # advantages of both signs
    (-(logps * weights)[keep].sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach()[keep], grads


@pytest.mark.parametrize("gc", [False, True, "unsloth"])
def test_shared_prefix_forward_matches_unpatched(tiny_path: str, gc, monkeypatch) -> None:
    ids, mask, comp_len = _grpo_batch()
    ref_lp, ref_g = _logps_and_grads(_model(tiny_path, False), ids, mask, comp_len)
    before = sp.shared_prefix_stats()
    kinds = attn.attention_kind_counts().get("shared_prefix_masked", 0)
    lp, g = _logps_and_grads(_model(tiny_path, True, gc), ids, mask, comp_len)
    after = sp.shared_prefix_stats()
    assert after["forwards"] == before.get("forwards", 0) + 1  # the plan was used
    assert attn.attention_kind_counts()["shared_prefix_masked"] == kinds + 1
    computed = after["computed"] - before.get("computed", 0)
    real = after["tokens"] - before.get("tokens", 0)
    assert real == int(mask.sum()) and computed < real - 2 * 3 * 20  # >= 3 copies of each prompt saved
    assert torch.allclose(lp, ref_lp, atol=2e-4, rtol=0), (lp - ref_lp).abs().max()
    assert set(g) == set(ref_g) and len(g) == 2 * 7 * 2
    for n in ref_g:
        assert (g[n] - ref_g[n]).norm() <= 1e-3 * ref_g[n].norm(), n


def test_off_switch_and_unshared_batches_take_the_usual_path(tiny_path: str, monkeypatch) -> None:
    ids, mask, comp_len = _grpo_batch(seed=1)
    model = _model(tiny_path, True)
    lp_on, g_on = _logps_and_grads(model, ids, mask, comp_len)
    model.zero_grad(set_to_none=True)
    monkeypatch.setenv("TRAINSERVE_SHARED_PREFIX", "0")
    before = sp.shared_prefix_stats().get("forwards", 0)
    lp_off, g_off = _logps_and_grads(model, ids, mask, comp_len)
    assert sp.shared_prefix_stats().get("forwards", 0) == before
    assert torch.allclose(lp_on, lp_off, atol=2e-4, rtol=0)
    for n in g_off:
        assert (g_on[n] - g_off[n]).norm() <= 1e-3 * g_off[n].norm(), n
    monkeypatch.setenv("TRAINSERVE_SHARED_PREFIX", "1")
    distinct = torch.randint(3, 500, ids.shape, generator=torch.Generator().manual_seed(5))
    assert sp.plan_shared_prefix(distinct, mask)[0] is None  # nothing shared: no plan


def _plan(rows: list[list[int]], masks: list[str]):
    ids = torch.tensor(rows)
    mask = torch.tensor([[int(c) for c in m] for m in masks])
    return sp.plan_shared_prefix(ids, mask)


def test_plan_groups_rows_by_common_real_prefix(monkeypatch) -> None:
    monkeypatch.setattr(sp, "MIN_SHARED", 3)
    p = list(range(10, 14))
    plan, stats = _plan(
        [[0, *p, 7, 8, 0], [0, *p, 7, 9, 9], [0, *p, 5, 0, 0], [1, *p, 7, 8, 0], [*p, 6, 6, 6, 6]],
        ["01111110", "01111111", "01111100", "11111110", "11111111"],
    )
    assert plan is not None and stats[:2] == [0, 1]
    # row 0 leads; rows 1 and 2 share its 4 prompt tokens (row 1 also a 5th); row 3's pad differs
    # (a real token at column 0), row 4 is shifted: both alone
    assert plan.tokens == 6 + 7 + 5 + 7 + 8
    assert plan.computed == plan.tokens - 2 * 4
    dest = plan.dest.view(5, 8)
    assert torch.equal(dest[1, 1:5], dest[0, 1:5]) and torch.equal(dest[2, 1:5], dest[0, 1:5])
    assert (dest[0, 0] == plan.computed) and (dest[2, 6:] == plan.computed).all()  # padding: the zero row
    assert len(set(dest[mask_pos].item() for mask_pos in [(0, 5), (1, 5), (2, 5)])) == 3  # own tokens
    assert torch.equal(plan.positions[0], plan.src % 8)
    spec = plan.spec
    assert spec.kind == "shared_prefix_masked" and spec.kv_index is not None
    # the masked spec: a row's own tokens see the shared prefix and their own earlier tokens only
    keep = spec.mask[0, 0]
    assert keep.shape == (plan.computed, spec.kv_index.numel())


def test_plan_refuses_holes_and_small_savings(monkeypatch) -> None:
    assert _plan([[1, 2, 3, 4], [1, 2, 3, 4]], ["1011", "1111"])[0] is None  # a hole in a row
    monkeypatch.setattr(sp, "MIN_SHARED", 3)
    long_rows = [[*range(20), 5, 5, 5], [*range(20), 6, 6, 6]]
    assert _plan(long_rows, ["1" * 23, "1" * 23])[0] is not None
    monkeypatch.setattr(sp, "MIN_SAVED_SHARE", 0.5)  # 20 of 46 tokens saved: below half
    assert _plan(long_rows, ["1" * 23, "1" * 23])[0] is None


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefix_attention_equals_per_row_attention(seed: int) -> None:
    """The gathered-keys spec against plain causal attention over each row's real tokens."""
    torch.manual_seed(seed)
    ids, mask, _ = _grpo_batch(seed)
    plan, _ = sp.plan_shared_prefix(ids, mask)
    assert plan is not None
    b, s = ids.shape
    hq, hkv, d = 4, 2, 8
    q, k, v = torch.randn(b, s, hq, d), torch.randn(b, s, hkv, d), torch.randn(b, s, hkv, d)
    # identical inputs wherever the tokens are shared (as hidden states are)
    src = plan.src
    qp, kp, vp = (plan.pack(x) for x in (q, k, v))
    out = attn.attention(qp, kp, vp, plan.spec, d**-0.5)  # (1, T, hq*d)
    got = plan.unpack(out)
    for row in range(b):
        real = mask[row].bool()
        cols = real.nonzero().flatten()
        flat = plan.dest.view(b, s)[row, cols]
        # what the row's tokens compute from: the packed copies they read
        qr, kr, vr = (x[0, flat].transpose(0, 1)[None] for x in (qp, kp, vp))
        ref = torch.nn.functional.scaled_dot_product_attention(
            qr, kr, vr, is_causal=True, scale=d**-0.5, enable_gqa=True)[0].transpose(0, 1).reshape(len(cols), -1)
        assert torch.allclose(got[row, cols], ref, atol=1e-5), row
    assert src.numel() == plan.computed


def test_without_varlen_a_large_batch_is_not_packed() -> None:
    """Off CUDA the packed attention is an explicit (queries x gathered keys) mask; for 256 rows in
    32 groups it would be 600M elements, so the batch takes the usual path instead."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 500, (32, 64), generator=g)
    ids = torch.cat([prompts.repeat_interleave(8, 0), torch.randint(3, 500, (256, 64), generator=g)], 1)
    assert sp.plan_shared_prefix(ids, torch.ones_like(ids))[0] is None
    assert sp.plan_shared_prefix(ids[:16], torch.ones_like(ids[:16]))[0] is not None  # 2 groups: small


def test_default_is_on_only_where_varlen_runs_and_a_bad_switch_is_named(monkeypatch) -> None:
    ids = torch.tensor([[*range(3, 23), 5], [*range(3, 23), 6]])
    assert sp.plan_shared_prefix(ids, torch.ones_like(ids))[0] is not None  # "1"
    monkeypatch.delenv("TRAINSERVE_SHARED_PREFIX")
    assert not attn.varlen_available(torch.device("cpu"))
    assert sp.plan_shared_prefix(ids, torch.ones_like(ids))[0] is None  # unset: CPU has no varlen
    monkeypatch.setenv("TRAINSERVE_SHARED_PREFIX", "sometimes")
    with pytest.raises(ValueError, match="TRAINSERVE_SHARED_PREFIX"):
        sp.plan_shared_prefix(ids, torch.ones_like(ids))


def test_a_bad_switch_is_refused_when_the_model_is_patched(tiny_path: str, monkeypatch) -> None:
    monkeypatch.setenv("TRAINSERVE_SHARED_PREFIX", "sometimes")
    m = transformers.AutoModelForCausalLM.from_pretrained(tiny_path)
    with pytest.raises(ValueError, match="TRAINSERVE_SHARED_PREFIX"):
        FastQwen2Model.patch_model(m)
