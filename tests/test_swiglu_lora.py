"""SwiGLU with in-kernel LoRA terms (kernels/swiglu_lora.py) on CPU.

* The torch reference against plain autograd through ``silu(g) * u`` with the LoRA terms added by
  matmuls (float64).
* Under Triton's interpreter: the kernels against the reference for several tiles, reading gate's and up's blocks of a
  block-diagonal ``B`` or all its columns, with ranks that need padding, one projection without
  LoRA, row and column counts that are not tile multiples, without ``h``, and above the fused
  rank limit (the unfused in-place path); then the fused LoRA MLP through those kernels against
  the MLP reference, forward and backward, with and without recomputation.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from trainserve.kernels.swiglu_lora import swiglu_lora_backward_reference, swiglu_lora_forward_reference
from triton_interpreter import PRELUDE, run_under_interpreter


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_reference_is_the_autograd_of_the_unfused_mlp_middle() -> None:
    g = torch.Generator().manual_seed(0)
    m, inter, r, rd = 9, 20, 6, 4
    gu = torch.randn(m, 2 * inter, generator=g, dtype=torch.float64, requires_grad=True)
    xa = torch.randn(m, r, generator=g, dtype=torch.float64)
    b = torch.randn(2 * inter, r, generator=g, dtype=torch.float64)
    dxa_d = torch.randn(m, rd, generator=g, dtype=torch.float64)
    a_d = torch.randn(rd, inter, generator=g, dtype=torch.float64)
    dh = torch.randn(m, inter, generator=g, dtype=torch.float64)
    full = gu + xa @ b.t()
    want_h = torch.nn.functional.silu(full[:, :inter]) * full[:, inter:]
    assert rel(swiglu_lora_forward_reference(gu.detach(), inter, xa, b), want_h) < 1e-12
    d = dh + dxa_d @ a_d
    (want_dgu,) = torch.autograd.grad(want_h, gu, d)
    h, dg, du = swiglu_lora_backward_reference(dh, gu.detach(), inter, xa, b, dxa_d, a_d)
    assert rel(h, want_h) < 1e-12 and rel(torch.cat([dg, du], 1), want_dgu) < 1e-12


_INTERPRET_SCRIPT = PRELUDE + textwrap.dedent(
    """
    from trainserve.kernels import swiglu_lora as S
    from trainserve.kernels.lora_fused import LoraWeights, lora_mlp, lora_mlp_reference

    m, inter = 37, 150
    configs = [S.DEFAULT_CONFIG, S.LaunchConfig(bm=32, bn=64, warps=2), S.LaunchConfig(bm=64, bn=32, warps=4)]
    cases = [((12, 12), 8), ((0, 16), 16), ((16, 0), 0), (None, 0), ((130, 2), 8), ((3, 5), 24)]
    for i, (ranks, rd) in enumerate(cases):
        r = 0 if ranks is None else sum(ranks)
        gu = torch.randn(m, 2 * inter)
        xa, b = None, None
        if r:
            xa = torch.randn(m, r)
            b = torch.block_diag(torch.randn(inter, ranks[0]), torch.randn(inter, ranks[1])) / r ** 0.5
        dxa_d, a_d = (torch.randn(m, rd), torch.randn(rd, inter)) if rd else (None, None)
        dh = torch.randn(m, inter)
        ref_h = S.swiglu_lora_forward_reference(gu, inter, xa, b)
        rh, rdg, rdu = S.swiglu_lora_backward_reference(dh, gu, inter, xa, b, dxa_d, a_d)
        for cfg in (configs if i == 0 else configs[:1]):
            for rk in ((ranks, None) if r else (None,)):  # block split, or all columns for both halves
                h = S.swiglu_lora_forward(gu, inter, xa, b, ranks=rk, config=cfg)
                assert rel(h, ref_h) < 1e-5, (ranks, rd, cfg, rk)
                for write_h in (True, False):
                    hh, dgu = S.swiglu_lora_backward(dh.clone(), gu.clone(), inter, xa, b, dxa_d, a_d,
                                                     write_h=write_h, ranks=rk, config=cfg)
                    assert (hh is None) != write_h
                    if write_h:
                        assert rel(hh, rh) < 1e-5, (ranks, rd, cfg, rk)
                    assert rel(dgu, torch.cat([rdg, rdu], 1)) < 1e-5, (ranks, rd, cfg, rk)
        gu2 = torch.randn(m, 2 * inter)
        _, dgu2 = S.swiglu_lora_backward(dh.clone(), gu2, inter, xa, b, dxa_d, a_d, ranks=ranks if r else None)
        if max(ranks or (0,)) <= S.MAX_FUSED_RANK:
            assert dgu2.data_ptr() == gu2.data_ptr()  # written over the consumed buffer
    try:
        S.swiglu_lora_forward(gu, inter, torch.randn(m, 6), torch.randn(2 * inter, 6), ranks=(3, 4))
        raise AssertionError("ranks that do not split R were accepted")
    except ValueError as e:
        assert "ranks" in str(e)

    def proj(out_f, in_f, rank):
        w = torch.randn(out_f, in_f) / in_f ** 0.5
        a = (0.1 * torch.randn(rank, in_f)).requires_grad_()
        bb = (0.1 * torch.randn(out_f, rank)).requires_grad_()
        return LoraWeights(w, None, None, a, bb, 2.0)

    hid, inter = 48, 160
    for recompute in (False, True):
        ps = [proj(inter, hid, 4), proj(inter, hid, 8), proj(hid, inter, 4)]
        x = torch.randn(2, 19, hid, requires_grad=True)
        out = lora_mlp(x, *ps, recompute=recompute)
        ref = lora_mlp_reference(x, *ps)
        assert rel(out, ref) < 1e-5
        leaves = [x] + [t for p in ps for t in (p.lora_a, p.lora_b)]
        d = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, leaves, d), torch.autograd.grad(ref, leaves, d), strict=True):
            assert rel(a, b) < 1e-5
    print("SWIGLU-LORA-OK")
    """
)


def test_triton_kernels_under_interpreter() -> None:
    run_under_interpreter(_INTERPRET_SCRIPT, "SWIGLU-LORA-OK")


def test_bench_script_refuses_a_machine_without_a_gpu() -> None:
    """scripts/bench_swiglu_lora.py imports (its kernel API) and says why it cannot run here."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run the benchmark")
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_swiglu_lora.py"
    proc = subprocess.run([sys.executable, "-P", str(script), "--shape", "7b"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]
