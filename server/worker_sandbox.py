"""The worker side of the server's sandbox processes: the memory cap and the job loop.

Imported by ``_template_worker.py`` and ``_grammar_worker.py``, which run as scripts (their
directory is on ``sys.path``), so this module imports nothing from ``trainserve``. The cap comes
after the imports, which mapped what they need: a hostile template or grammar then fails with
``MemoryError`` in the worker instead of growing it without bound. The protocol (see
``worker_process.py`` for the server side): the worker prints ``{"ready": true}``, then answers
each JSON job line with one JSON line.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable
from typing import Any


def cap_memory(extra: int) -> None:
    """Allow ``extra`` bytes of address space beyond what the imports mapped."""
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        size = 0
    limit = size + extra if size else extra * 4
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def serve_jobs(handle: Callable[[dict[str, Any]], dict[str, Any]], memory: int, out_of_memory: dict[str, Any]) -> None:
    """Cap the address space, say ready, then answer every stdin job with ``handle(job)`` (or
    ``out_of_memory`` when the job hit the cap) until stdin closes."""
    cap_memory(memory)
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            payload = json.dumps(handle(json.loads(line)))
        except MemoryError:
            payload = json.dumps(out_of_memory)
        out.write(payload + "\n")
        out.flush()
