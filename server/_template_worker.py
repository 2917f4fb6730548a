"""The process that renders chat templates supplied by requests (see ``chat_template.py``).

Run as a script, not imported from the ``trainserve`` package: it loads only jinja2 and
transformers' chat-template renderer (jinja2's ``ImmutableSandboxedEnvironment``, the template
globals transformers provides), then caps its own address space, so a template that allocates
without bound fails here with ``MemoryError`` instead of growing the server. The server kills this
process when a template runs too long. Protocol: one JSON job per stdin line, one JSON answer per
stdout line (``{"text": ...}`` or ``{"error": ...}``); the first line out is ``{"ready": true}``.
"""

from __future__ import annotations

import sys
from typing import Any

from worker_sandbox import serve_jobs  # a sibling script: the script's directory is on sys.path


def _render(render: Any, job: dict[str, Any]) -> dict[str, Any]:
    try:
        rendered, _ = render(
            conversations=[job["messages"]],
            chat_template=job["template"],
            add_generation_prompt=job["add_generation_prompt"],
            continue_final_message=job["continue_final_message"],
            **job["kwargs"],
        )
    except MemoryError:
        return {"error": "rendering the chat template exceeded the memory limit"}
    except Exception as exc:  # the template's own error, a jinja syntax error, a sandbox violation
        return {"error": f"{type(exc).__name__}: {exc}"}
    text = rendered[0]
    if len(text) > job["max_chars"]:
        return {"error": f"the rendered prompt is longer than {job['max_chars']} characters", "too_long": True}
    return {"text": text}


def main() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    serve_jobs(lambda job: _render(render_jinja_template, job), int(sys.argv[1]),
               {"error": "rendering the chat template exceeded the memory limit"})


if __name__ == "__main__":
    main()
