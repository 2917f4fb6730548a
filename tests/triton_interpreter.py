"""Running a test snippet under Triton's interpreter (``TRITON_INTERPRET=1``).

The variable must be set before Triton is imported, so each snippet runs in a fresh interpreter;
there the kernels' dispatch (``use_triton``) takes the Triton path for CPU tensors too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

#: The start of every snippet: torch, a fixed seed, and ``rel(a, b)`` (relative error; NaN/inf fail).
PRELUDE = """import torch
torch.manual_seed(0)


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()

"""


def run_under_interpreter(code: str, marker: str, timeout: float = 300) -> None:
    """Run ``code`` with ``TRITON_INTERPRET=1``; it must exit cleanly and print ``marker``."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("TRAINSERVE_DISABLE_TRITON", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and marker in proc.stdout, proc.stderr[-3000:]
