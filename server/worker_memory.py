"""The address-space cap the sandbox worker scripts put on themselves.

Imported by ``_template_worker.py`` and ``_grammar_worker.py``, which run as scripts (their
directory is on ``sys.path``), so this module imports nothing from ``trainserve``. The cap comes
after the imports, which mapped what they need: a hostile template or grammar then fails with
``MemoryError`` in the worker instead of growing it without bound.
"""

from __future__ import annotations

import resource


def cap_memory(extra: int) -> None:
    """Allow ``extra`` bytes of address space beyond what the imports mapped."""
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        size = 0
    limit = size + extra if size else extra * 4
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
