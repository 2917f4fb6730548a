"""Attention for the patched Llama/Qwen2 path, through ``scaled_dot_product_attention``.

The model forward describes the mask once per forward as an :class:`AttnSpec` and passes it down
in place of transformers' mask; the attention forward recognises it (any other mask means "called
by transformers": the original forward runs). Kinds:

* ``causal`` - no padding, no packing: SDPA with ``is_causal=True`` (the flash backend on CUDA),
  GQA through ``enable_gqa`` (key/value heads are expanded only if this torch's flash kernel
  refuses GQA).
* ``varlen`` - padding-free packing (position ids that restart, or transformers' flash kwargs
  ``cu_seq_lens_q``...): ``torch.nn.attention.varlen.varlen_attn`` on CUDA when it exists, with a
  sliding window when the layer has one; otherwise an equivalent block-diagonal mask.
* ``varlen`` also serves *padding* on CUDA when each row's real tokens are one contiguous run (left
  and/or right padding, as TRL's GRPO batches are: left-padded prompts, right-padded completions):
  every row is cut into its leading pads, its real tokens and its trailing pads, so real tokens
  attend exactly to the real tokens before them, as under the padding mask. Outputs at padding
  positions differ from the masked path's (pads attend to pads), and no loss reads them. Why not
  SDPA with the mask: with a boolean mask and grouped KV heads, SDPA has no fused kernel and runs
  its math backend, which upcasts to fp32 and keeps a ``(B, H, S, S)`` fp32 probability tensor
  per layer for the backward (7B, 16 rows of 386 tokens: 267 MB a layer, 7.5 GB a forward).
* ``masked`` - padding that is not one run per row, sliding windows without varlen, padding off
  CUDA, or a caller's 4-D mask: SDPA with an explicit boolean mask.
* ``shared_prefix`` (``shared_prefix_masked`` off CUDA) - rows that start with the same tokens (a
  GRPO group's prompt) computed once: queries are the packed tokens, keys are gathered per segment
  through ``kv_index`` (the shared prefix, then the row's own tokens), causal aligned bottom-right.
  :mod:`trainserve.models.shared_prefix` builds it.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

try:  # torch >= 2.9
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except Exception:  # noqa: BLE001
    _varlen_attn = None
    _VARLEN_PARAMS = set()

_FLASH_GQA: dict[str, bool] = {}
#: per device: whether causal varlen aligns a short query run at the bottom right (varlen_bottom_right)
_VARLEN_BOTTOM_RIGHT: dict[str, bool] = {}
#: how many forwards built each attention kind in this process (:func:`attention_kind_counts`)
_KIND_COUNTS: Counter = Counter()


@dataclass
class AttnSpec:
    """How one forward's attention is masked (shared by the layers of one type)."""

    kind: str  # "causal" | "varlen" | "masked"
    mask: torch.Tensor | None = None  # (B|1, 1, S, S) bool (True = attend) or additive float
    cu_seqlens: torch.Tensor | None = None  # int32 (n+1,) over the flattened B*S tokens
    max_len: int = 0
    window: int | None = None
    extra: dict = field(default_factory=dict)
    #: shared prefixes: key/value rows gathered for each query segment, and their own cu_seqlens
    kv_index: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_len_k: int = 0


def _segments_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment index per token: a new segment wherever the position does not go up by one."""
    first = position_ids[:, :1] - 1
    diff = torch.diff(position_ids, prepend=first, dim=-1)
    return (diff != 1).cumsum(-1)


def _window_mask(s: int, window: int | None, device: torch.device) -> torch.Tensor:
    i = torch.arange(s, device=device)
    keep = i[None, :] <= i[:, None]
    if window is not None:
        keep &= (i[:, None] - i[None, :]) < window
    return keep


def varlen_available(device: torch.device, window: int | None = None) -> bool:
    """varlen_attn exists here, runs on this device and (if needed) takes a window size."""
    if _varlen_attn is None or device.type != "cuda":
        return False
    return window is None or "window_size" in _VARLEN_PARAMS


def _counted(build: Callable[..., AttnSpec | None]) -> Callable[..., AttnSpec | None]:
    """Count the kinds ``build`` returns (see :func:`attention_kind_counts`)."""

    @functools.wraps(build)
    def counted(*args: Any, **kwargs: Any) -> AttnSpec | None:
        spec = build(*args, **kwargs)
        if spec is not None:
            _KIND_COUNTS[spec.kind] += 1
        return spec

    return counted


def attention_kind_counts() -> dict[str, int]:
    """Forwards per attention kind so far in this process (``causal``/``varlen``/``masked``): a
    benchmark reports it, because a ``masked`` forward is far slower and larger than the others."""
    return dict(_KIND_COUNTS)


@_counted
def build_attn_spec(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    batch: int,
    seq: int,
    device: torch.device,
    window: int | None = None,
    flash_kwargs: dict | None = None,
    run_stats: list[int] | None = None,
) -> AttnSpec:
    """Decide the attention kind for one forward (host syncs at most twice, before any layer).
    ``run_stats``: :func:`padding_run_stats` of ``attention_mask`` already on the host."""
    if window is not None and window >= seq:
        window = None
    if flash_kwargs and flash_kwargs.get("cu_seq_lens_q") is not None and attention_mask is None:
        cu = flash_kwargs["cu_seq_lens_q"].to(device=device, dtype=torch.int32)
        max_len = int(flash_kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
        return _varlen_or_mask(cu, max_len, batch, seq, device, window)
    if attention_mask is not None and attention_mask.dim() == 4:
        return AttnSpec("masked", mask=attention_mask.to(device), window=window)
    padded, runs = False, None
    if attention_mask is not None:
        m = attention_mask.to(device)
        padded, runs = _runs_from_host(padding_run_stats(m).tolist() if run_stats is None else run_stats, m)
    packed = False
    seg = None
    if position_ids is not None and seq > 1 and attention_mask is None:  # as transformers decides
        seg = _segments_from_positions(position_ids.expand(batch, seq))
        packed = bool((seg[:, -1] != seg[:, 0]).any())
    if not padded and not packed:
        if window is None:
            return AttnSpec("causal")
        if varlen_available(device, window):
            cu = torch.arange(0, (batch + 1) * seq, seq, device=device, dtype=torch.int32)
            return AttnSpec("varlen", cu_seqlens=cu, max_len=seq, window=window)
        return AttnSpec("masked", mask=_window_mask(seq, window, device)[None, None], window=window)
    if packed and not padded:
        starts = torch.ones(batch, seq, dtype=torch.bool, device=device)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        idx = torch.nonzero(starts.reshape(-1)).flatten().to(torch.int32)
        cu = torch.cat([idx, torch.tensor([batch * seq], dtype=torch.int32, device=device)])
        max_len = int((cu[1:] - cu[:-1]).max())
        return _varlen_or_mask(cu, max_len, batch, seq, device, window)
    if runs is not None and varlen_available(device, window):
        return AttnSpec("varlen", cu_seqlens=runs[0], max_len=runs[1], window=window)
    keep = _window_mask(seq, window, device)[None]  # (1, S, S)
    keep = keep & attention_mask.bool()[:, None, :]  # keys that are not padding
    keep = keep | torch.eye(seq, dtype=torch.bool, device=device)[None]  # no empty rows (padding)
    return AttnSpec("masked", mask=keep[:, None], window=window)


@_counted
def shared_prefix_spec(
    q_lens: list[int], k_lens: list[int], kv_index: torch.Tensor, device: torch.device, max_mask: int
) -> AttnSpec | None:
    """Attention over packed query segments (lengths ``q_lens``) whose keys are the rows
    ``kv_index`` gathers (``k_lens`` per segment, the segment's own tokens last), causal aligned
    bottom-right: varlen on CUDA, an explicit mask elsewhere; None where that mask would have more
    than ``max_mask`` elements (all queries by all gathered keys: it outgrows the padding mask)."""
    if varlen_available(device) and varlen_bottom_right(device):
        return AttnSpec(
            "shared_prefix", cu_seqlens=to_device_int32([0, *itertools.accumulate(q_lens)], device),
            max_len=max(q_lens), kv_index=kv_index,
            cu_seqlens_k=to_device_int32([0, *itertools.accumulate(k_lens)], device), max_len_k=max(k_lens),
        )
    if sum(q_lens) * sum(k_lens) > max_mask:
        return None
    ql, kl = torch.tensor(q_lens, device=device), torch.tensor(k_lens, device=device)
    seg_q = torch.repeat_interleave(torch.arange(len(q_lens), device=device), ql)
    seg_k = torch.repeat_interleave(torch.arange(len(k_lens), device=device), kl)
    off_q = torch.arange(seg_q.numel(), device=device) - (ql.cumsum(0) - ql)[seg_q]
    off_k = torch.arange(seg_k.numel(), device=device) - (kl.cumsum(0) - kl)[seg_k]
    keep = (seg_q[:, None] == seg_k[None, :]) & (off_k[None, :] <= (off_q + (kl - ql)[seg_q])[:, None])
    return AttnSpec("shared_prefix_masked", mask=keep[None, None], kv_index=kv_index)


def padding_segments(attention_mask: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``(cu_seqlens, max_len)`` cutting each row of a ``(B, S)`` padding mask into its leading
    pads, its real tokens and its trailing pads (empty pieces dropped), over the flattened ``B*S``
    tokens; None when the mask has no padding or some row's real tokens are not one run."""
    return _padding_runs(attention_mask)[1]


def padding_run_stats(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[all real, one run per row, first real column per row..., real count per row...]`` of a
    ``(B, S)`` mask, on its device: what the host needs to cut it (one sync, shared by callers that
    need more from the same forward, see :mod:`trainserve.models.shared_prefix`)."""
    m = attention_mask.bool()
    seq = m.shape[1]
    count = m.sum(1)
    first = torch.where(count > 0, m.int().argmax(1), torch.zeros_like(count))
    pos = torch.arange(seq, device=m.device)[None, :]
    one_run = ((pos >= first[:, None]) & (pos < (first + count)[:, None])) == m
    return torch.cat([torch.stack([m.all(), one_run.all()]).long(), first, count])


def _padding_runs(attention_mask: torch.Tensor) -> tuple[bool, tuple[torch.Tensor, int] | None]:
    """``(padded, runs)`` for a ``(B, S)`` mask with one host sync (the mask usually lives on the
    GPU, and a sync at the start of a forward stalls the launch queue): whether any position is
    padding, and :func:`padding_segments`' answer."""
    return _runs_from_host(padding_run_stats(attention_mask).tolist(), attention_mask)


def _runs_from_host(host: list[int], m: torch.Tensor) -> tuple[bool, tuple[torch.Tensor, int] | None]:
    """The cuts, made on the host from :func:`padding_run_stats` and copied back without a sync."""
    batch, seq = m.shape
    if host[0]:
        return False, None
    if not host[1]:
        return True, None
    cuts: list[int] = []
    for row, (start, real) in enumerate(zip(host[2 : 2 + batch], host[2 + batch : 2 + 2 * batch], strict=True)):
        for cut in (row * seq, row * seq + start, row * seq + start + real):
            if not cuts or cut != cuts[-1]:
                cuts.append(cut)
    if cuts[-1] != batch * seq:
        cuts.append(batch * seq)
    max_len = max(b - a for a, b in zip(cuts, cuts[1:], strict=False))
    return True, (to_device_int32(cuts, m.device), max_len)


def to_device_int32(values: list[int], device: torch.device) -> torch.Tensor:
    """Host integers as an int32 tensor on ``device`` (pinned and non-blocking on CUDA: no sync)."""
    t = torch.tensor(values, dtype=torch.int32)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _varlen_or_mask(
    cu: torch.Tensor, max_len: int, batch: int, seq: int, device: torch.device, window: int | None
) -> AttnSpec:
    if varlen_available(device, window):
        return AttnSpec("varlen", cu_seqlens=cu, max_len=max_len, window=window)
    seg = torch.zeros(batch * seq, dtype=torch.long, device=device)
    seg[cu[1:-1].long()] = 1
    seg = seg.cumsum(0).view(batch, seq)
    keep = _window_mask(seq, window, device)[None] & (seg[:, :, None] == seg[:, None, :])
    return AttnSpec("masked", mask=keep[:, None], window=window)


def _flash_gqa_ok(device: torch.device) -> bool:
    """Whether SDPA's flash kernel takes GQA inputs in this torch (checked once per device type)."""
    key = str(device)
    if key not in _FLASH_GQA:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(1, 4, 16, 64, device=device, dtype=torch.bfloat16)
        kv = torch.randn(1, 2, 16, 64, device=device, dtype=torch.bfloat16)
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
            _FLASH_GQA[key] = True
        except RuntimeError:
            _FLASH_GQA[key] = False
    return _FLASH_GQA[key]


def _expand_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def varlen_bottom_right(device: torch.device) -> bool:
    """Whether causal varlen attention with fewer queries than keys aligns the diagonal at the
    bottom right (query ``i`` of ``m`` sees keys up to ``i + n - m``: flash-attention 2's rule, which
    shared prefixes rely on). Checked once per device against a masked reference."""
    key = str(device)
    if key not in _VARLEN_BOTTOM_RIGHT:
        ok = False
        if varlen_available(device):
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k, v = (torch.randn(n, 2, 64, generator=g).to(device, torch.bfloat16) for n in (3, 7, 7))
            cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=device) for c in ([0, 3], [0, 7]))
            kw = {"is_causal": True} if "is_causal" in _VARLEN_PARAMS else {"window_size": (-1, 0)}
            try:
                got = _varlen_attn(q, k, v, cu_q, cu_k, 3, 7, **kw)
            except RuntimeError:
                got = None
            keep = torch.ones(3, 7, dtype=torch.bool, device=device).tril(4)
            ref = F.scaled_dot_product_attention(
                q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(), attn_mask=keep
            ).transpose(0, 1)
            ok = got is not None and bool(((got.float() - ref).abs().max() < 2e-2).item())
        _VARLEN_BOTTOM_RIGHT[key] = ok
    return _VARLEN_BOTTOM_RIGHT[key]


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """``(B, S, Hq, D)`` q and ``(B, S, Hkv, D)`` k/v to ``(B, S, Hq*D)`` attention output. With
    ``spec.kv_index`` the keys/values of each query segment are gathered first (their gradients sum
    back into the shared rows)."""
    bsz, seq, hq, dim = q.shape
    hkv = k.shape[2]
    groups = hq // hkv
    if spec.kv_index is not None:
        k = k.reshape(-1, hkv, dim).index_select(0, spec.kv_index)[None]
        v = v.reshape(-1, hkv, dim).index_select(0, spec.kv_index)[None]
    if spec.mask is None and spec.cu_seqlens is not None:
        kw = {"scale": scale}
        if spec.window is not None:
            kw["window_size"] = (spec.window - 1, 0)
        qf, kf, vf = q.reshape(-1, hq, dim), k.reshape(-1, hkv, dim), v.reshape(-1, hkv, dim)
        if groups > 1:
            if "enable_gqa" in _VARLEN_PARAMS:
                kw["enable_gqa"] = True
            else:
                kf, vf = _expand_kv(kf, groups, 1), _expand_kv(vf, groups, 1)
        if "is_causal" in _VARLEN_PARAMS:
            kw["is_causal"] = True
        if "window_size" in _VARLEN_PARAMS and "window_size" not in kw:
            kw["window_size"] = (-1, 0)  # left unbounded, right 0: causal
        cu_k = spec.cu_seqlens if spec.cu_seqlens_k is None else spec.cu_seqlens_k
        max_k = spec.max_len if spec.cu_seqlens_k is None else spec.max_len_k
        out = _varlen_attn(qf, kf, vf, spec.cu_seqlens, cu_k, spec.max_len, max_k, **kw)
        return out.reshape(bsz, seq, hq * dim)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kw = {}
    if groups > 1:
        if q.device.type == "cuda" and spec.kind == "causal" and not _flash_gqa_ok(q.device):
            kt, vt = _expand_kv(kt, groups, 1), _expand_kv(vt, groups, 1)
        else:
            kw["enable_gqa"] = True
    if spec.kind == "causal":
        out = F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, dropout_p=dropout_p, scale=scale, **kw
        )
    else:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=spec.mask, dropout_p=dropout_p, scale=scale, **kw
        )
    return out.transpose(1, 2).reshape(bsz, seq, hq * dim)
