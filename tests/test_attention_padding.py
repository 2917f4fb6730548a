"""Padded batches through varlen attention: the segments a padding mask is cut into, and that
attention over those segments equals attention under the padding mask at every real token."""

from __future__ import annotations

import pytest
import torch

from trainserve.models import attention as attn


def _mask(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[int(c) for c in r] for r in rows])


@pytest.mark.parametrize(
    ("rows", "cu"),
    [
        (["001111", "111100"], [0, 2, 6, 10, 12]),  # left-padded row, right-padded row
        (["011100", "000000", "111111"], [0, 1, 4, 6, 12, 18]),  # both sides; an all-padding row
    ],
)
def test_padding_segments_cut_rows_at_their_real_tokens(rows: list[str], cu: list[int]) -> None:
    got = attn.padding_segments(_mask(rows))
    assert got is not None
    assert got[0].dtype == torch.int32 and got[0].tolist() == cu
    assert got[1] == max(b - a for a, b in zip(cu, cu[1:], strict=False))


def test_padding_with_a_hole_and_no_padding_are_not_cut() -> None:
    assert attn.padding_segments(_mask(["110111", "111111"])) is None
    assert attn.padding_segments(_mask(["111111", "111111"])) is None


def _block_mask(cu: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    seg = torch.zeros(batch * seq, dtype=torch.long)
    seg[cu[1:-1].long()] = 1
    seg = seg.cumsum(0).view(batch, seq)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return (causal[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_attention_equals_masked_attention_on_real_tokens(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    batch, seq, hq, hkv, dim = 4, 12, 4, 2, 8
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):  # random left and right padding per row, as a GRPO batch has
        left, right = torch.randint(0, 4, (2,), generator=g).tolist()
        mask[b, :left] = 0
        if right:
            mask[b, seq - right:] = 0
    q = torch.randn(batch, seq, hq, dim, generator=g)
    k = torch.randn(batch, seq, hkv, dim, generator=g)
    v = torch.randn(batch, seq, hkv, dim, generator=g)
    spec = attn.build_attn_spec(mask, None, batch, seq, torch.device("cpu"))
    assert spec.kind == "masked"  # no varlen kernel on the CPU: the padding mask itself
    ref = attn.attention(q, k, v, spec, dim**-0.5)
    cu, _ = attn.padding_segments(mask)
    seg = attn.AttnSpec("masked", mask=_block_mask(cu, batch, seq))
    got = attn.attention(q, k, v, seg, dim**-0.5)
    real = mask.bool()
    assert torch.allclose(got[real], ref[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_padded_batches_take_varlen_where_it_runs(monkeypatch) -> None:
    monkeypatch.setattr(attn, "varlen_available", lambda device, window=None: True)
    before = attn.attention_kind_counts().get("varlen", 0)
    spec = attn.build_attn_spec(_mask(["001111", "111100"]), None, 2, 6, torch.device("cpu"))
    assert spec.kind == "varlen" and spec.cu_seqlens.tolist() == [0, 2, 6, 10, 12] and spec.max_len == 4
    assert attn.attention_kind_counts()["varlen"] == before + 1
    holed = attn.build_attn_spec(_mask(["101111", "111100"]), None, 2, 6, torch.device("cpu"))
    assert holed.kind == "masked"
