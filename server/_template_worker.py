"""The process that renders chat templates supplied by requests (see ``chat_template.py``).

Run as a script, not imported from the ``trainserve`` package: it loads only jinja2 and
transformers' chat-template renderer (jinja2's ``ImmutableSandboxedEnvironment``, the template
globals transformers provides), then caps its own address space, so a template that allocates
without bound fails here with ``MemoryError`` instead of growing the server. The server kills this
process when a template runs too long. Protocol: one JSON job per stdin line, one JSON answer per
stdout line (``{"text": ...}`` or ``{"error": ...}``); the first line out is ``{"ready": true}``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from worker_memory import cap_memory  # a sibling script: the script's directory is on sys.path


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

    cap_memory(int(sys.argv[1]))
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            answer = _render(render_jinja_template, json.loads(line))
            payload = json.dumps(answer)
        except MemoryError:
            payload = json.dumps({"error": "rendering the chat template exceeded the memory limit"})
        out.write(payload + "\n")
        out.flush()


if __name__ == "__main__":
    main()
