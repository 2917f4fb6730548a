"""Running a test snippet under Triton's interpreter (``TRITON_INTERPRET=1``).

The variable must be set before Triton is imported, so the snippets cannot run in pytest's own
process; there the kernels' dispatch (``use_triton``) takes the Triton path for CPU tensors too.

Why one shared child: each fresh interpreter spends ~4 s importing torch, Triton and trainserve's
kernels before its snippet starts, and eight tests in six files ran one each (~30 s of a CI run
on two cores). The snippets are self-contained scripts (each starts with :data:`PRELUDE`, which
seeds torch again, and defines no Triton kernels of its own), so they run one after the other in
one child, each in a fresh global namespace. A snippet that fails reports its traceback; one that
hangs past its timeout has the child killed, and the next snippet starts a new one.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading

import pytest

#: The start of every snippet: torch, a fixed seed, and ``rel(a, b)`` (relative error; NaN/inf fail).
PRELUDE = """import torch
torch.manual_seed(0)


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()

"""

# The child: read one JSON request per line, run its code with print() captured, answer one JSON line
# (on a copy of the original stdout, so output written by C code cannot garble the answers).
_SERVER = r"""
import contextlib, io, json, os, sys, traceback
answer = os.fdopen(os.dup(1), "w")  # the protocol's own channel; fd 1 itself goes to the stderr file
os.dup2(2, 1)
sys.stdout = os.fdopen(1, "w", buffering=1)
for line in sys.stdin:
    code = json.loads(line)["code"]
    out, error = io.StringIO(), ""
    with contextlib.redirect_stdout(out):
        try:
            exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__"})
        except BaseException:  # SystemExit included: the snippet failed, the child goes on
            error = traceback.format_exc()
    answer.write(json.dumps({"stdout": out.getvalue(), "error": error}) + "\n")
    answer.flush()
"""

_child: subprocess.Popen | None = None
_child_stderr = None


def _stop_child() -> None:
    global _child
    if _child is not None:
        _child.kill()
        _child.wait()
        _child = None


atexit.register(_stop_child)


def _start_child() -> subprocess.Popen:
    global _child, _child_stderr
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("TRAINSERVE_DISABLE_TRITON", None)
    _child_stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty child cannot block
    _child = subprocess.Popen([sys.executable, "-c", _SERVER], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=_child_stderr, text=True)
    return _child


def _stderr_tail() -> str:
    if _child_stderr is None:
        return ""
    _child_stderr.seek(0)
    return _child_stderr.read()[-3000:]


def run_under_interpreter(code: str, marker: str, timeout: float = 300) -> None:
    """Run ``code`` with ``TRITON_INTERPRET=1``; it must finish without an exception and print ``marker``."""
    pytest.importorskip("triton")
    child = _child if _child is not None and _child.poll() is None else _start_child()
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(json.dumps({"code": code}) + "\n")
    child.stdin.flush()
    reply: list[str] = []
    reader = threading.Thread(target=lambda: reply.append(child.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not reply or not reply[0]:
        tail = _stderr_tail()
        _stop_child()
        pytest.fail(f"the interpreter child gave no answer within {timeout} s (or died):\n{tail}")
    answer = json.loads(reply[0])
    assert not answer["error"], answer["error"][-3000:] + "\n" + _stderr_tail()
    assert marker in answer["stdout"], answer["stdout"][-3000:] + "\n" + _stderr_tail()
