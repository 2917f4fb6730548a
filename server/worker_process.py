"""Talking to the server's sandbox worker processes (chat templates, structured-output checks).

Both workers run untrusted, unbounded work (a request's Jinja template, a request's grammar) that
cannot be interrupted inside the server process. The server reads their answers with a deadline
and kills a worker that misses it, so a hostile request costs the limit, never the engine.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

READY = b'{"ready": true}'


def start_worker(script: Path, memory: int, startup_timeout: float, first_line: bytes = b"") -> subprocess.Popen | None:
    """Start ``script`` (its address space capped at ``memory`` bytes beyond its imports), send it
    ``first_line`` if any, and wait for its ready line; None (and nothing left running) if it does
    not come within ``startup_timeout``."""
    proc = subprocess.Popen([sys.executable, str(script), str(memory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    line = exchange(proc, first_line, startup_timeout) if first_line else readline_within(proc, startup_timeout)
    if line != READY:
        kill_worker(proc)
        return None
    return proc


def exchange(proc: subprocess.Popen, payload: bytes, timeout: float) -> bytes | None:
    """Send one job line and read one answer line within ``timeout``; None if the worker overran or died."""
    try:
        assert proc.stdin is not None
        proc.stdin.write(payload)
        proc.stdin.flush()
        return readline_within(proc, timeout)
    except OSError:
        return None


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
