"""Machete (issue 11, Hopper): the layout learnt from vLLM's packer holds at real layer shapes and is
the bit permutation the word kernel reads, both Triton dequantisers equal the reference, and vLLM's
``machete_mm`` on the prepacked bytes equals ``x @ W`` with the weight the trainer dequantises (the
contract of ``vllm_compat.MacheteRunner``).

Skipped without a Hopper GPU or vLLM's Machete ops.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs a Hopper GPU", allow_module_level=True)
pytest.importorskip("vllm")

from trainserve.kernels.machete_dequant import (  # noqa: E402
    MacheteTensors,
    dequantize_machete,
    dequantize_machete_reference,
)
from trainserve.kernels.machete_layout import check_prepacked, quantize_for_machete  # noqa: E402

from trainserve.engine import vllm_compat  # noqa: E402

SHAPES = [(896, 1152), (3584, 4608), (18944, 3584), (3584, 37888)]  # (K, N): 0.5B qkv, 7B qkv/down/gate_up


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def runner():
    if vllm_compat.machete_unsupported(4096, 4096, 64, torch.bfloat16, torch.device("cuda")):
        pytest.skip("Machete unavailable in this vLLM build")
    return vllm_compat.MacheteRunner(torch.bfloat16)


@pytest.mark.parametrize("k,n", SHAPES)
def test_learnt_layout_dequant_and_gemm(runner, k: int, n: int) -> None:
    layout = vllm_compat.machete_layout(runner, torch.device("cuda"))
    torch.manual_seed(k + n)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    words, scales, zf = quantize_for_machete(w, 64, torch.bfloat16)
    packed = runner.prepack(words)
    check_prepacked(packed, words, layout)
    t = MacheteTensors(packed, scales, zf, layout, 64)
    assert layout.prepack_bits, "vLLM's packer no longer gives PREPACK_BITS: the word kernel is off"
    dense = dequantize_machete(t, 0, n, torch.bfloat16)  # the word kernel
    if k * n <= 3584 * 4608:  # the reference holds an int64 offset per value
        assert torch.equal(dense, dequantize_machete_reference(t, 0, n, torch.bfloat16))
    assert torch.equal(dense, dequantize_machete(t, 0, n, torch.bfloat16, kernel="table"))
    assert rel(dense.t(), w) < 0.12
    shard = dequantize_machete(t, n - 256, n, torch.bfloat16)
    assert torch.equal(shard, dense[:, n - 256:])
    for m in (1, 16, 64, 256):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        got = runner(x, packed, scales, zf, 64, bias)
        want = (x.float() @ dense.float() + bias.float())
        assert rel(got, want) < 1e-2, (m, rel(got, want))
