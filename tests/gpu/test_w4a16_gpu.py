"""trainserve's 4-bit Triton GEMM and dequantiser on the GPU (issue 11) against their torch references.

Fresh random weights and activations at real Qwen2 layer shapes, every decode batch class
(1-16, 17-32, 33-64, above), K splits, bias, a column range of a fused layer (a strided view), and
CUDA-graph capture (how vLLM runs it). Needs a CUDA GPU and Triton; no vLLM.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from trainserve.kernels.machete_layout import quantize_for_machete  # noqa: E402
from trainserve.kernels.w4_dequant import W4Tensors, dequantize_w4  # noqa: E402
from trainserve.kernels.w4a16_gemm import (  # noqa: E402
    GemmConfig,
    dequantize_w4_reference,
    w4a16_linear,
    w4a16_linear_reference,
    w4a16_matmul,
)

SHAPES = [(896, 1152), (3584, 4608), (18944, 3584), (3584, 37888), (1536, 2048)]  # (K, N)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def quantized(k: int, n: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    return quantize_for_machete(w, 64, torch.bfloat16)


@pytest.mark.parametrize("k,n", SHAPES)
def test_dequant_equals_reference(k: int, n: int) -> None:
    words, s, zf = quantized(k, n, k + n)
    t = W4Tensors(words, s, zf, 64)
    got = dequantize_w4(t, torch.bfloat16)
    want = dequantize_w4_reference(words, s, zf, 64, torch.bfloat16)
    assert rel(got, want) < 1e-3
    part = t.columns(64, n - 128)  # a shard that does not start on a 128-block
    want32 = dequantize_w4_reference(words, s, zf, 64, torch.float32)
    assert rel(dequantize_w4(part, torch.float32), want32[:, 64:n - 128]) < 1e-6


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 7, 16, 33, 64, 100, 300])
def test_gemm_equals_reference(k: int, n: int, m: int) -> None:
    words, s, zf = quantized(k, n, 7 * m + k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    want = w4a16_linear_reference(x, words, s, zf, 64, bias)
    got = w4a16_matmul(x, words, s, zf, 64, bias)
    assert rel(got, want) < 5e-3, (m, k, n)


@pytest.mark.parametrize("cfg", [GemmConfig(64, 16, 32, 1, 4, 3, swap=True),
                                 GemmConfig(128, 64, 64, 8, 8, 5, swap=True),
                                 GemmConfig(64, 32, 64, 3, 4, 4, swap=True), GemmConfig(64, 16, 64, 1, 4, 3),
                                 GemmConfig(128, 64, 32, 4, 8, 4)])
def test_every_config_computes_the_same(cfg: GemmConfig) -> None:
    k, n, m = 3584, 4608, 40
    words, s, zf = quantized(k, n, 3)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    want = w4a16_linear_reference(x, words, s, zf, 64, bias)
    assert rel(w4a16_matmul(x, words, s, zf, 64, bias, config=cfg), want) < 5e-3


def test_column_view_of_a_fused_layer() -> None:
    k, n = 3584, 4608
    words, s, zf = quantized(k, n, 11)
    parent = W4Tensors(words, s, zf, 64)
    x = torch.randn(24, k, device="cuda", dtype=torch.bfloat16)
    for n0, n1 in ((0, 3584), (3584, 4096), (4096, 4608)):
        v = parent.columns(n0, n1)
        want = w4a16_linear_reference(x, v.qweight, v.scales, v.zf, 64)
        assert rel(w4a16_matmul(x, v.qweight, v.scales, v.zf, 64), want) < 5e-3
        assert rel(x @ dequantize_w4(v, torch.bfloat16), want) < 5e-3
        assert v.qweight.data_ptr() == words[:, n0:].data_ptr()  # a view, no copy


def test_custom_op_captures_in_a_cuda_graph() -> None:
    k, n = 3584, 4608
    words, s, zf = quantized(k, n, 5)
    x = torch.randn(2, 32, k, device="cuda", dtype=torch.bfloat16)
    out = w4a16_linear(x, words, s, zf, None, 64)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = w4a16_linear(x, words, s, zf, None, 64)
    x.copy_(torch.randn_like(x))
    g.replay()
    want = w4a16_linear_reference(x.view(-1, k), words, s, zf, 64).view(2, 32, n)
    assert rel(out, want) < 5e-3
