"""Talking to the server's sandbox worker processes (chat templates, structured-output checks).

Both workers run untrusted, unbounded work (a request's Jinja template, a request's grammar) that
cannot be interrupted inside the server process. The server reads their answers with a deadline
and kills a worker that misses it, so a hostile request costs the limit, never the engine.
"""

from __future__ import annotations

import os
import select
import subprocess
import time


def readline_within(proc: subprocess.Popen, timeout: float) -> bytes | None:
    """One line from the worker, or None when it does not come within ``timeout`` or the worker died."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        buf += chunk
        if b"\n" in buf:
            return bytes(buf.split(b"\n", 1)[0])


def kill_worker(proc: subprocess.Popen) -> None:
    """Kill the worker and close its pipes (a worker that overran its limit is never reused)."""
    proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()
