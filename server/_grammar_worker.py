"""The process that test-compiles structured-output constraints (see ``grammar_check.py``).

Run as a script, not imported from the ``trainserve`` package: it loads only xgrammar (the
compiler vLLM's default backend uses), reads the server's tokenizer description
(``xgrammar.TokenizerInfo.serialize_json``) from its first stdin line, then caps its own address
space, so a constraint whose compilation allocates without bound fails here instead of growing the
server. The server kills this process when a compilation runs too long. Protocol: one JSON job per
stdin line (``{"kind": "json" | "regex" | "ebnf" | "lark", "spec": ...}``), one JSON answer per
stdout line (``{"ok": true}`` or ``{"error": ...}``); the first line out is ``{"ready": true}``.
"""

from __future__ import annotations

import sys
from typing import Any

from worker_sandbox import serve_jobs  # a sibling script: the script's directory is on sys.path


def _compile(compiler: Any, job: dict[str, Any]) -> dict[str, Any]:
    kind, spec = job["kind"], job["spec"]
    try:
        if kind == "json":
            compiler.compile_json_schema(spec, any_whitespace=True)
        elif kind == "regex":
            compiler.compile_regex(spec)
        elif kind == "lark":
            compiler.compile_lark(spec)
        else:
            compiler.compile_grammar(spec)
    except MemoryError:
        return {"error": "compiling the constraint exceeded the memory limit", "memory": True}
    except Exception as exc:  # xgrammar cannot compile it: vLLM reports that (or uses another backend)
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True}


def main() -> None:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.deserialize_json(sys.stdin.readline())
    # one thread: the time limit then bounds CPU work, and thread stacks fit the address-space cap
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiler.compile_grammar('root ::= "x"')  # warm up before the cap and the first timed job
    serve_jobs(lambda job: _compile(compiler, job), int(sys.argv[1]),
               {"error": "compiling the constraint exceeded the memory limit", "memory": True})


if __name__ == "__main__":
    main()
