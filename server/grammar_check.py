"""Structured-output constraints are test-compiled, with a time limit, before the engine sees them.

vLLM compiles a request's constraint (JSON schema, regex, ``choice`` list, GBNF/Lark grammar) with
xgrammar in a pool of ``(CPU count + 1) // 2`` threads — one thread on a 2-core machine — and the
request waits for its grammar before its first token. A compilation cannot be interrupted, and its
cost is not visible in the constraint's size: a 6 KB JSON schema of 100 pattern-constrained
properties took 35 s with a 150k-token vocabulary, a 190 KB one 14 s with the embedded tiny
model's 512 tokens. So one client's slow constraint held every other client's structured output
(``response_format``, ``structured_outputs``, ``tool_choice`` ``"required"`` or named) until it
finished — and with the ``external_launcher`` executor (data parallel), where vLLM compiles on the
engine thread, every request.

Each constraint not yet seen to pass is therefore compiled first here, in a separate process (the
server's tokenizer as xgrammar sees it, one thread, a memory cap): one that does not compile within
:data:`TIMEOUT_S` is a 400 (``structured_output_limit``) before anything is queued, and the process
is killed and restarted. A constraint xgrammar rejects is passed on unchanged: vLLM answers it (a
400) or uses its guidance backend. The price is one extra compilation per new constraint;
constraints that passed are remembered (by digest), so a tool list sent every turn is checked once.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import json
import logging
import subprocess
import threading
from pathlib import Path
from typing import Any

from trainserve.server.errors import bad_request
from trainserve.server.worker_process import exchange, kill_worker, start_worker

logger = logging.getLogger("trainserve.server")

TIMEOUT_S = 5.0  # like vLLM's own regex limit (VLLM_REGEX_COMPILATION_TIMEOUT_S); real schemas take ms
MEMORY_BYTES = 1 << 30
STARTUP_TIMEOUT_S = 120.0
REMEMBERED = 1024  # digests of constraints that compiled in time
WORKER = Path(__file__).with_name("_grammar_worker.py")


def constraint_job(so: Any) -> dict[str, str] | None:
    """The worker's job for vLLM ``StructuredOutputsParams``, compiled as vLLM's xgrammar backend
    compiles it (``choice`` becomes vLLM's grammar of the choices); None for ``json_object``
    (vLLM's built-in JSON grammar, compiled once)."""
    from vllm.v1.structured_output.backend_xgrammar import choice_as_grammar
    from vllm.v1.structured_output.utils import grammar_is_likely_lark

    if so.json is not None:
        return {"kind": "json", "spec": so.json if isinstance(so.json, str) else json.dumps(so.json)}
    if so.regex is not None:
        return {"kind": "regex", "spec": so.regex}
    grammar = choice_as_grammar(so.choice) if so.choice else so.grammar
    if not grammar:
        return None
    return {"kind": "lark" if grammar_is_likely_lark(grammar) else "ebnf", "spec": grammar}


class GrammarChecker:
    """One worker process, one compilation at a time; killed and restarted when one overruns."""

    def __init__(self, tokenizer: Any, vocab_size: int, timeout: float = TIMEOUT_S, memory: int = MEMORY_BYTES):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.timeout = timeout
        self.memory = memory
        self._proc: subprocess.Popen | None = None
        self._info: bytes | None = None
        self._disabled = False
        self._passed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        atexit.register(self.close)

    def _tokenizer_info(self) -> bytes:
        if self._info is None:  # as vLLM's XgrammarBackend builds it
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
            self._info = info.serialize_json().encode() + b"\n"
        return self._info

    def _start(self) -> subprocess.Popen | None:
        """A ready worker, or None (the check is then skipped for good: vLLM still compiles as before)."""
        try:
            proc = start_worker(WORKER, self.memory, STARTUP_TIMEOUT_S, first_line=self._tokenizer_info())
        except Exception:  # a tokenizer xgrammar cannot describe, no xgrammar: nothing to test with
            logger.warning("structured-output constraints are not checked before compiling", exc_info=True)
            self._disabled = True
            return None
        if proc is None:
            logger.warning("the structured-output checker did not start; constraints are not checked")
            self._disabled = True
        return proc

    def _restart(self) -> None:
        with self._lock:
            if self._proc is None and not self._disabled:
                self._proc = self._start()

    def check(self, so: Any, param: str) -> None:
        """Return when ``so`` compiles in time (or xgrammar rejects it: vLLM answers that); a 400
        naming ``param`` when it does not compile within the limits. Blocks: call it from a thread."""
        job = constraint_job(so)
        if job is None:
            return
        digest = hashlib.sha256(f"{job['kind']}\0{job['spec']}".encode("utf-8", "surrogatepass")).hexdigest()
        payload = json.dumps(job).encode() + b"\n"
        with self._lock:
            if digest in self._passed:
                self._passed.move_to_end(digest)
                return
            if self._disabled:
                return
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
                if self._proc is None:
                    return
            proc = self._proc
            line = exchange(proc, payload, self.timeout)
            if line is None:  # overran the limit, or died: replace the worker (in the background)
                kill_worker(proc)
                self._proc = None
                threading.Thread(target=self._restart, name="trainserve-grammar-restart", daemon=True).start()
                answer: dict[str, Any] = {"limit": True}
            else:
                answer = json.loads(line)
            if "ok" in answer:
                self._passed[digest] = None
                if len(self._passed) > REMEMBERED:
                    self._passed.popitem(last=False)
                return
        if answer.get("limit") or answer.get("memory"):
            raise bad_request(
                f"{param}: the structured-output constraint did not compile within {self.timeout:g} s and "
                f"{self.memory >> 20} MiB (the engine compiles constraints one at a time, so a slower one "
                "would hold up every other client's structured output); simplify it",
                param=param,
                code="structured_output_limit",
            )

    def close(self) -> None:
        with self._lock:
            self._disabled = True  # no restart after this
            if self._proc is not None:
                kill_worker(self._proc)
                self._proc = None
