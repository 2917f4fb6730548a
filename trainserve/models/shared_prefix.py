"""Shared prefixes: rows of a batch that start with the same tokens are computed once there.

Why: a GRPO batch holds every prompt ``num_generations`` times (8 samples of each prompt), left-padded
the same way, and the training forward computes the prompt's tokens once per sample. With causal
attention a token's hidden states depend only on the tokens before it, so all copies of a prompt
token are identical: computing them once and letting the copies *read* that one result gives the
same outputs, and the backward of that read sums the copies' gradients into it, which is the
gradient of the unshared forward. For 7B with 130-token prompts and 256-token completions, two
groups of 8 per micro-batch, the layers see 30% fewer tokens.

How: :func:`plan_shared_prefix` compares the rows (one host sync, together with the padding
statistics the attention needs anyway) and groups each row with the first earlier row it shares at
least :data:`MIN_SHARED` real tokens with (same columns, same padding). The computed tokens are
packed into one row: each group's shared prefix once, then each member's own remaining tokens. Each
packed segment attends causally (aligned at the bottom right) to the keys gathered for it: the
group's prefix, then its own tokens (:func:`trainserve.models.attention.shared_prefix_spec`). The
position of a packed token is its column in the batch, so RoPE sees what the unshared forward gives
it. :meth:`SharedPrefixPlan.unpack` turns the packed hidden states back into ``(B, S, H)``, zeros at
padding (no loss reads those).

The plan is only made where it cannot change the result: a 2-D padding mask whose real tokens are
one run per row, no caller position ids, no sliding window shorter than the batch, no attention
dropout in training. ``TRAINSERVE_SHARED_PREFIX``: unset, it is used where varlen attention runs
(CUDA); off CUDA the packed attention needs an explicit (queries × gathered keys) mask and SDPA's
math kernel, slower than the unshared causal kernel in a CPU trial, so there it runs only with ``=1``
(the CPU tests use that); ``=0`` turns it off everywhere (for comparisons).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from trainserve.models.attention import (
    AttnSpec,
    padding_run_stats,
    shared_prefix_spec,
    varlen_available,
    varlen_bottom_right,
)

#: real tokens a row must share with its group's first row to join the group
MIN_SHARED = 16
#: the plan is used only if it computes at least this share of the batch's real tokens fewer
MIN_SAVED_SHARE = 0.05
#: the largest (B, B, S) row comparison made (elements); larger batches are not compared
MAX_COMPARED = 1 << 25
_STATS: Counter = Counter()


def shared_prefix_switch() -> str:
    """``TRAINSERVE_SHARED_PREFIX`` as ``"on"``, ``"off"`` or ``"auto"`` (unset); any other value
    raises, naming the variable (checked when a model is patched, before any work)."""
    value = os.environ.get("TRAINSERVE_SHARED_PREFIX", "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value:
        raise ValueError(f"TRAINSERVE_SHARED_PREFIX must be 0 or 1 (or unset), got {value!r}")
    return "auto"


def enabled(device: torch.device) -> bool:
    """``TRAINSERVE_SHARED_PREFIX``: ``0`` off, ``1`` on, unset on where varlen attention runs."""
    switch = shared_prefix_switch()
    if switch != "auto":
        return switch == "on"
    return varlen_available(device) and varlen_bottom_right(device)


def shared_prefix_stats() -> dict[str, int]:
    """Forwards that shared prefixes in this process, their real tokens and the tokens computed."""
    return dict(_STATS)


@dataclass
class SharedPrefixPlan:
    """Where each computed token comes from and where each batch position reads its result."""

    batch: int
    seq: int
    src: torch.Tensor  # (T,) long: flat ``row * seq + column`` of each computed token
    positions: torch.Tensor  # (1, T) long: its column
    dest: torch.Tensor  # (B * S,) long: the computed token each position reads; T at padding
    spec: AttnSpec
    tokens: int  # real tokens in the batch
    computed: int  # T

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, S, ...)`` to the computed tokens, ``(1, T, ...)``."""
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(0, self.src)[None]

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(1, T, H)`` to ``(B, S, H)``: shared positions read their one computed copy (their
        gradients add up in it), padding reads zeros."""
        flat = torch.cat([hidden[0], hidden.new_zeros(1, hidden.shape[-1])])
        return flat.index_select(0, self.dest).view(self.batch, self.seq, -1)


@dataclass
class _Group:
    leader: int
    cols: int  # columns [0, cols) are shared by every member (padding included)
    members: list[int]


def plan_shared_prefix(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[SharedPrefixPlan | None, list[int]]:
    """The plan for a ``(B, S)`` batch, or None where sharing saves too little; also
    :func:`~trainserve.models.attention.padding_run_stats` on the host (the same sync), so the
    caller's attention spec needs none of its own."""
    m = attention_mask.bool()
    batch, seq = m.shape
    stats = padding_run_stats(m)
    if batch < 2 or batch * batch * seq > MAX_COMPARED or not enabled(m.device):
        return None, stats.tolist()
    ids = input_ids.to(m.device)
    same = (ids[:, None, :] == ids[None, :, :]) & (m[:, None, :] == m[None, :, :])
    common = torch.where(same.all(-1), seq, (~same).int().argmax(-1))  # leading equal columns
    host = torch.cat([stats, common.flatten()]).cpu().numpy()
    run_stats = host[: 2 + 2 * batch].tolist()
    if not run_stats[1]:  # padding with holes: no runs to pack
        return None, run_stats
    first, count = host[2 : 2 + batch], host[2 + batch : 2 + 2 * batch]
    groups = _group_rows(host[2 + 2 * batch :].reshape(batch, batch), first, count)
    tokens = int(count.sum())
    saved = sum((len(g.members) - 1) * (g.cols - int(first[g.leader])) for g in groups)
    if tokens == 0 or saved < MIN_SAVED_SHARE * tokens:
        return None, run_stats
    plan = _build(groups, first.tolist(), count.tolist(), batch, seq, m.device, tokens)
    if plan is None:
        return None, run_stats
    _STATS["forwards"] += 1
    _STATS["tokens"] += tokens
    _STATS["computed"] += plan.computed
    return plan, run_stats


def _group_rows(common: np.ndarray, first: np.ndarray, count: np.ndarray) -> list[_Group]:
    """Each row joins the group of the first earlier row it shares ``MIN_SHARED`` real tokens with
    (sharing a prefix is transitive, so it shares them with that group's leader too); a group's
    shared columns are the fewest any member shares with its leader. O(B) host work past numpy."""
    batch = len(first)
    end = first + count
    ok = (common - first[:, None] >= MIN_SHARED) & (first[:, None] == first[None, :])
    ok &= (count > 0)[:, None] & (count > 0)[None, :] & np.tri(batch, k=-1, dtype=bool)
    earlier = np.where(ok.any(1), ok.argmax(1), -1)
    leader = np.arange(batch)
    for row in range(batch):
        if earlier[row] >= 0:
            leader[row] = leader[earlier[row]]
    rows = np.arange(batch)
    shared = np.minimum(common[rows, leader], np.minimum(end, end[leader]))
    groups: dict[int, _Group] = {}
    for row in rows[count > 0].tolist():
        lead = int(leader[row])
        if lead not in groups:
            groups[lead] = _Group(lead, int(end[lead]), [])
        g = groups[lead]
        g.members.append(row)
        g.cols = min(g.cols, int(shared[row]))
    return list(groups.values())


def _build(groups: list[_Group], first: list[int], count: list[int], batch: int, seq: int,
           device: torch.device, tokens: int) -> SharedPrefixPlan | None:
    src: list[np.ndarray] = []
    kv: list[np.ndarray] = []
    q_lens: list[int] = []
    k_lens: list[int] = []
    dest = np.full(batch * seq, -1, dtype=np.int64)
    t = 0
    for g in groups:
        f, cols = first[g.leader], g.cols
        base = g.leader * seq
        src.append(np.arange(base + f, base + cols))
        prefix = np.arange(t, t + cols - f)
        t += cols - f
        q_lens.append(cols - f)
        k_lens.append(cols - f)
        kv.append(prefix)
        for row in g.members:
            base, end = row * seq, first[row] + count[row]
            dest[base + f: base + cols] = prefix
            if end > cols:
                own = np.arange(t, t + end - cols)
                t += end - cols
                src.append(np.arange(base + cols, base + end))
                dest[base + cols: base + end] = own
                q_lens.append(end - cols)
                k_lens.append(cols - f + end - cols)
                kv.extend((prefix, own))
    dest[dest < 0] = t  # padding reads the zero row after the computed tokens

    def dev(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)

    src_all = np.concatenate(src)
    spec = shared_prefix_spec(q_lens, k_lens, dev(np.concatenate(kv)), device, max_mask=max(batch * seq * seq, 1 << 22))
    if spec is None:  # no varlen here, and the mask would be large (and larger than the padding mask)
        return None
    return SharedPrefixPlan(
        batch=batch, seq=seq, src=dev(src_all), positions=dev(src_all % seq)[None], dest=dev(dest),
        spec=spec, tokens=tokens, computed=t,
    )
