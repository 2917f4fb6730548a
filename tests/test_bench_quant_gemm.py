"""The 4-bit groups scripts/bench_quant_gemm.py hands to gemlite: codes 0-15, and the dense weight
it compares against is exactly (q - zero) * scale, within round-to-nearest error of the input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_quant_gemm  # noqa: E402


def test_int4_groups_round_trip() -> None:
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    q, scale, zero, dense = bench_quant_gemm.int4_groups(w, 64)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == zero.shape == (48, 4)
    rebuilt = ((q.float().view(48, 4, 64) - zero[..., None]) * scale[..., None]).view(48, 256)
    assert torch.allclose(dense.float(), rebuilt, rtol=1e-2, atol=1e-3)  # dense is that, in bf16
    step = scale.repeat_interleave(64, dim=1)
    assert ((rebuilt - w).abs() <= 0.5 * step + 1e-6).all()  # nearest level of each group


def test_layer_shapes_are_the_fused_engine_layers() -> None:
    """The per-layer GEMM scripts (this one and bench_fp8_train_gemms.py) time vLLM's fused layers:
    q|k|v and gate|up as one weight each, as (out, in)."""
    assert bench_quant_gemm.layer_shapes("7b") == {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584),
                                              "down": (3584, 18944)}


def test_fp8_training_gemm_script_refuses_a_machine_without_fp8_gemms() -> None:
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        pytest.skip("this GPU runs FP8 GEMMs: the script would run the benchmark")
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_fp8_train_gemms.py"
    proc = subprocess.run([sys.executable, str(script), "backward"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "compute capability 9.0" in proc.stderr
