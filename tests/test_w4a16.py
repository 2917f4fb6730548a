"""The 4-bit Triton GEMM and dequantiser (``kernels/w4a16_gemm.py``, ``kernels/w4_dequant.py``) on the CPU:
the GPTQ word order round-trips, the launch heuristic only gives valid tilings, bad shapes raise,
and (under ``TRITON_INTERPRET=1``) the Triton code itself equals the torch references."""

from __future__ import annotations

import pytest
import torch
from trainserve.kernels.machete_layout import pack_rows_gptq, quantize_for_machete, unpack_rows_gptq
from trainserve.kernels.w4_dequant import W4Tensors, dequantize_w4
from trainserve.kernels.w4a16_gemm import (
    check_w4a16_shape,
    dequantize_w4_reference,
    pick_config,
    w4a16_linear,
    w4a16_matmul,
)
from triton_interpreter import run_under_interpreter


def test_gptq_words_round_trip_and_dequantise_to_the_quantised_weight() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (128, 192), dtype=torch.int32, generator=g)
    assert torch.equal(unpack_rows_gptq(pack_rows_gptq(q)), q)
    w = torch.randn(192, 256, generator=g) * 0.02  # (N, K)
    words, s, zf = quantize_for_machete(w, 64, torch.float32)
    dense = dequantize_w4_reference(words, s, zf, 64, torch.float32)  # (K, N)
    err = float((dense.t() - w).norm() / w.norm())
    assert 0 < err < 0.12  # 4-bit groups of 64: ~9% on Gaussian weights


@pytest.mark.parametrize("m", [1, 5, 16, 17, 33, 64, 100, 300])
def test_launch_heuristic_tiles_every_real_layer(m: int) -> None:
    layers = [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (2048, 1536), (1152, 896)]  # (N, K)
    for n, k in layers:
        for sms in (4, 132):
            cfg = pick_config(m, n, k, 64, sms)
            assert 64 % cfg.block_k == 0 and k % cfg.block_k == 0 and n % cfg.block_n == 0, (m, n, k, cfg)
            assert cfg.block_m >= 16 and 1 <= cfg.split_k <= 8 and k // cfg.block_k >= cfg.split_k, (m, n, k, cfg)


def test_bad_inputs_raise_before_any_kernel_runs() -> None:
    words, s, zf = quantize_for_machete(torch.randn(128, 256), 64, torch.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        w4a16_matmul(torch.randn(3, 192), words, s, zf, 64)
    with pytest.raises(ValueError, match="bias has shape"):
        w4a16_matmul(torch.randn(3, 256), words, s, zf, 64, torch.randn(64))
    with pytest.raises(ValueError, match="int32 words"):
        w4a16_matmul(torch.randn(3, 256), words.long(), s, zf, 64)
    w96, s96, z96 = words[:12], s[:1], zf[:1]  # 96 inputs: not whole groups of 64
    with pytest.raises(ValueError, match="whole groups"):
        w4a16_matmul(torch.randn(3, 96), w96, s96, z96, 64)
    with pytest.raises(ValueError, match="whole groups"):
        dequantize_w4(W4Tensors(w96, s96, z96, 64), torch.float32)
    with pytest.raises(ValueError, match="out_features % 64"):
        check_w4a16_shape(256, 100, 64)
    with pytest.raises(ValueError, match="of torch.bfloat16"):  # an out of another dtype is not ignored
        dequantize_w4(W4Tensors(words, s, zf, 64), torch.bfloat16, out=torch.empty(256, 128))


def test_custom_op_registration() -> None:
    """The op's fake (meta) function and schema agree with the real one (``torch.compile`` uses them)."""
    words, s, zf = quantize_for_machete(torch.randn(128, 256), 64, torch.float32)
    torch.library.opcheck(w4a16_linear, (torch.randn(2, 3, 256), words, s, zf, torch.randn(128), 64))
    torch.library.opcheck(w4a16_linear, (torch.randn(5, 256), words, s, zf, None, 64))


_INTERPRET = r"""
import torch
from trainserve.kernels.machete_layout import quantize_for_machete
from trainserve.kernels.w4_dequant import W4Tensors, dequantize_w4
from trainserve.kernels.w4a16_gemm import GemmConfig, dequantize_w4_reference, w4a16_linear_reference, w4a16_matmul

torch.manual_seed(0)
for n, k, m in ((192, 256, 5), (128, 128, 17), (256, 192, 40)):
    words, s, zf = quantize_for_machete(torch.randn(n, k) * 0.02, 64, torch.float32)
    x, b = torch.randn(m, k), torch.randn(n)
    want = w4a16_linear_reference(x, words, s, zf, 64, b)
    for cfg in (GemmConfig(64, 16, 64, 1, 4, 2, swap=True), GemmConfig(64, 32, 32, 3, 4, 2),
                GemmConfig(64, 16, 64, 2, 4, 2), GemmConfig(128, 64, 32, 2, 4, 2, swap=True)):
        if n % cfg.block_n:
            continue
        got = w4a16_matmul(x, words, s, zf, 64, b, config=cfg)
        err = float((got - want).norm() / want.norm())
        assert err < 1e-5, (n, k, m, cfg, err)
    got = w4a16_matmul(x, words, s, zf, 64, b)  # the heuristic's choice
    assert float((got - want).norm() / want.norm()) < 1e-5
    t = W4Tensors(words, s, zf, 64)
    v = t.columns(64, n)  # a column range: strided views, no copy
    assert torch.allclose(dequantize_w4(v, torch.float32),
                          dequantize_w4_reference(v.qweight, v.scales, v.zf, 64, torch.float32), atol=1e-6)
    got = w4a16_matmul(x, v.qweight, v.scales, v.zf, 64, config=GemmConfig(64, 16, 64, 1, 4, 2))
    want = w4a16_linear_reference(x, v.qweight, v.scales, v.zf, 64)
    assert float((got - want).norm() / want.norm()) < 1e-5
print("W4A16-INTERPRETER-OK")
"""


def test_triton_kernels_under_interpreter() -> None:
    run_under_interpreter(_INTERPRET, "W4A16-INTERPRETER-OK", timeout=600)
