"""Generation parameters and structured outputs that one client could use to stall the others, or
that vLLM checks without naming the field: each is a 400 naming its field, decided before anything
is queued, and the server keeps serving (the shared tiny-model server, ``--max-model-len 256``)."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
from server_support import complete

pytestmark = pytest.mark.engine

# a JSON schema that compiles for about a minute on 2 cores (even with the tiny model's 512 tokens),
# in under 45 KB: the cost of a constraint is not visible in its size
SLOW_SCHEMA = {
    "type": "object",
    "properties": {f"p{i}": {"type": "string", "pattern": "([a-z]{3,40}x){1,60}"} for i in range(600)},
    "required": [f"p{i}" for i in range(600)],
}


def _error(r, param: str | None) -> dict:
    assert r.status_code == 400, r.text[:500]
    err = r.json()["error"]
    assert err["param"] == param, err
    return err


def _body(server, **extra) -> dict:
    return {"model": server.model, "prompt": "Hi", "max_tokens": 4, "temperature": 0, **extra}


def test_prompt_logprobs_are_bounded_per_request(http, server):
    """256 prompts x 240 tokens x 21 entries stalled every client for 40 s; n multiplies them too."""
    prompts = [[3 + (i + j) % 7 for j in range(240)] for i in range(128)]
    r = http.post("/v1/completions", json=_body(server, prompt=prompts, prompt_logprobs=20))
    assert "645120 entries" in _error(r, "prompt_logprobs")["message"]
    echo = _body(server, prompt=prompts[:4], n=64, temperature=1.0, echo=True, logprobs=20, max_tokens=1)
    assert "n=64" in _error(http.post("/v1/completions", json=echo), "echo")["message"]
    # within the budget: several prompts, and one full-context prompt with the most alternatives
    ok = http.post("/v1/completions", json=_body(server, prompt=prompts[:16], prompt_logprobs=1, max_tokens=1))
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 16, ok.text[:500]
    longest = [3 + j % 7 for j in range(255)]
    full = http.post("/v1/completions", json=_body(server, prompt=longest, prompt_logprobs=20, max_tokens=1))
    assert full.status_code == 200 and len(full.json()["choices"][0]["prompt_logprobs"]) == 255


def test_generated_logprobs_are_bounded_per_request(http, server):
    """n=64 x 200 tokens x 21 entries (an 18 MB response) held every other client up for 5 s."""
    chat = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "n": 64, "temperature": 1.0,
            "logprobs": True, "top_logprobs": 20, "max_tokens": 200}
    assert "268800 entries" in _error(http.post("/v1/chat/completions", json=chat), "top_logprobs")["message"]
    completion = _body(server, n=64, temperature=1.0, logprobs=20, max_tokens=200)
    assert "more than the" in _error(http.post("/v1/completions", json=completion), "logprobs")["message"]
    # within the budget: every token of a full-length completion with the most alternatives
    ok = http.post("/v1/chat/completions", json={**chat, "n": 1, "max_tokens": 16, "ignore_eos": True})
    assert ok.status_code == 200, ok.text[:500]
    content = ok.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 16 and all(len(c["top_logprobs"]) == 20 for c in content)


@pytest.mark.parametrize("constraint, status", [("structured_outputs", 400), ("response_format", 400), (None, 500)])
def test_finish_reason_error_from_the_engine_becomes_an_error_response(constraint, status):
    """vLLM finishes a request with finish_reason "error" (not an OpenAI value; the openai client passes it
    through silently) when a structured-output constraint that passed its checks fails in the engine (seen
    with an empty grammar and a self-referencing schema): a 400 naming the constraint, else a 500."""
    from types import SimpleNamespace

    from trainserve.server.errors import APIError
    from trainserve.server.routes_openai import _Run

    body = SimpleNamespace(n=1, return_tokens_as_token_ids=False, return_token_ids=False, model="m")
    run = _Run(SimpleNamespace(token_text=None), body, False, SimpleNamespace(label="base"), [[1, 2]], None)
    run.constraint = constraint
    out = SimpleNamespace(index=0, text="", token_ids=[], logprobs=None, finish_reason="error")
    with pytest.raises(APIError) as err:
        run.absorb(0, SimpleNamespace(outputs=[out], prompt_logprobs=None))
    assert err.value.status == status and err.value.param == constraint
    ok = SimpleNamespace(index=0, text="", token_ids=[], logprobs=None, finish_reason="stop")
    assert run.absorb(0, SimpleNamespace(outputs=[ok], prompt_logprobs=None))[0][3] == "stop"


def test_slow_constraint_is_refused_and_others_keep_structured_output(http, server):
    """vLLM compiles constraints one at a time and cannot stop one: a slow one held every other
    client's structured output until it finished. It is now refused after the check's time limit."""
    others: dict[str, object] = {}

    def small_constraint() -> None:
        time.sleep(1.0)  # while the slow constraint is being checked
        start = time.monotonic()
        with server.client() as c:
            r = c.post("/v1/completions", json=_body(server, structured_outputs={"regex": "[0-9]{3}-ok"}, max_tokens=8))
        others.update(status=r.status_code, text=r.json()["choices"][0]["text"], seconds=time.monotonic() - start)

    thread = threading.Thread(target=small_constraint)
    thread.start()
    r = http.post("/v1/completions", json=_body(server, structured_outputs={"json": SLOW_SCHEMA}), timeout=300)
    thread.join(300)
    err = _error(r, "structured_outputs")
    assert err["code"] == "structured_output_limit" and "did not compile within" in err["message"], err
    assert others["status"] == 200 and re.fullmatch("[0-9]{3}-ok", str(others["text"])), others
    assert others["seconds"] < 40, others  # sanity bound: the slow schema alone compiles for about a minute
    assert complete(http, server.model, max_tokens=3)["usage"]["completion_tokens"] == 3
    assert http.get("/health").json()["status"] == "ok"


def test_constraint_errors_name_the_constraint_field(http, server):
    missing = {"$ref": "#/$defs/missing"}
    _error(http.post("/v1/completions", json=_body(server, structured_outputs={"json": missing})), "structured_outputs")
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": missing}}
    _error(http.post("/v1/completions", json=_body(server, response_format=fmt)), "response_format")


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"temperature": float("inf")}, "temperature"),
        ({"n": 4, "temperature": 0}, "n"),
        ({"min_tokens": 9}, "min_tokens"),
    ],
)
def test_vllm_sampling_errors_name_their_field(http, server, extra, param):
    body = json.dumps(_body(server, **extra))  # NaN / Infinity: what JSON parsers accept (and 1e309)
    r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    _error(r, param)


def test_stream_options_need_stream(http, server):
    r = http.post("/v1/completions", json=_body(server, stream_options={"include_usage": True}))
    assert "stream=true" in _error(r, "stream_options")["message"]
    assert http.post("/v1/completions", json=_body(server, stream_options={})).status_code == 200  # nothing asked


def test_long_engine_errors_are_cut(http, server):
    """vLLM repeats every out-of-vocabulary id in its message (a 1.6 MB body for 100k ids)."""
    r = http.post("/v1/completions", json=_body(server, stop_token_ids=list(range(100_000, 125_000))))
    err = _error(r, "stop_token_ids")
    assert len(r.content) < 4000 and "more characters" in err["message"], len(r.content)
    assert complete(http, server.model, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_more_tools_than_openai_allows_is_400(http, server):
    """30,000 tools (6.6 MB) held the event loop and the GIL for 2–3 s before the 400 they got."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    body = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    err = _error(http.post("/v1/chat/completions", json={**body, "tools": [tool] * 129}), "tools")
    assert err["code"] == "array_above_max_length" and "128" in err["message"], err
