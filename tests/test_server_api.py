"""The OpenAI routes of a real ``trainserve serve`` process, through the official ``openai`` client."""

from __future__ import annotations

import json

import openai
import pytest
from server_support import PROMPTS, VERSION, complete

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def client(server):
    return server.openai(timeout=120)


def test_models_lists_base_and_adapters(client, server):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == server.model
    assert {"a1", "a2"} <= set(ids)
    assert "live" not in ids  # no training in a standalone server
    card = next(m for m in models.data if m.id == "a1")
    assert card.model_extra["version"] == "a1@v1" and card.model_extra["parent"] == server.model
    assert card.model_extra["root"] == "a1"  # relative to --adapters-dir, not the server's absolute path


def test_completion_non_streaming(client, server):
    raw = client.completions.with_raw_response.create(
        model=server.model, prompt=PROMPTS[0], max_tokens=7, temperature=0
    )
    assert raw.headers[VERSION] == "base"
    r = raw.parse()
    assert r.object == "text_completion" and r.system_fingerprint == "base"
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    again = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=7, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_completion_streaming_matches_non_streaming(client, server):
    full = client.completions.create(model="a1", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    stream = client.completions.create(
        model="a1",
        prompt=PROMPTS[1],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert {c.system_fingerprint for c in chunks} == {"a1@v1"}
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_sse_wire_format_ends_with_done(http):
    body = {"model": "a2", "prompt": PROMPTS[2], "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers[VERSION] == "a2@v1"
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["system_fingerprint"] == "a2@v1" for e in events[:-1])


def test_two_adapters_give_their_own_outputs(http, server):
    texts = {m: complete(http, m, max_tokens=16)["choices"][0]["text"] for m in (server.model, "a1", "a2")}
    assert len(set(texts.values())) == 3, texts
    # interleaved and concurrent requests still give each adapter its own output
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(6) as pool:
        jobs = [(m, pool.submit(complete, http, m, max_tokens=16)) for m in ("a1", "a2", server.model) * 2]
        for m, job in jobs:
            assert job.result()["choices"][0]["text"] == texts[m]


def test_n_seed_temperature_top_p_stop(client, server):
    sample = dict(
        model=server.model,
        prompt=PROMPTS[0],
        max_tokens=8,
        n=3,
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        extra_body={"ignore_eos": True},
    )
    r = client.completions.create(**sample)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 3 * 8
    assert len({c.text for c in r.choices}) > 1  # sampled, not greedy
    same = client.completions.create(**sample)
    assert [c.text for c in same.choices] == [c.text for c in r.choices]  # seeded
    greedy = dict(
        model=server.model, prompt=PROMPTS[0], max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    text = client.completions.create(**greedy).choices[0].text
    start = next(
        i for i in range(2, len(text) - 3) if text[i : i + 3].strip() and "\ufffd" not in text[i : i + 3]
    )
    stop = text[start : start + 3]
    stopped = client.completions.create(**greedy, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_multiple_prompts_and_token_prompts(http, server):
    sample = {"model": "a1", "n": 2, "max_tokens": 5, "temperature": 0.8, "seed": 7, "ignore_eos": True}
    r = http.post("/v1/completions", json={**sample, "prompt": [PROMPTS[0], PROMPTS[1]]}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    for i, prompt in enumerate(PROMPTS[:2]):  # choices i*n .. i*n+n-1 belong to prompt i
        alone = http.post("/v1/completions", json={**sample, "prompt": prompt}).json()
        assert [c["text"] for c in alone["choices"]] == [c["text"] for c in r["choices"][2 * i : 2 * i + 2]]
    assert r["usage"]["completion_tokens"] == 4 * 5
    tokens = http.post(
        "/v1/completions", json={"model": "a1", "prompt": [5, 6, 7, 8], "max_tokens": 3}
    ).json()
    assert tokens["usage"]["prompt_tokens"] == 4


def test_completion_logprobs(client, server):
    r = client.completions.create(
        model=server.model, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and len(top) == 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-4)  # greedy picks the most likely token


def test_chat_completion(client, server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello there"}]
    raw = client.chat.completions.with_raw_response.create(
        model="a2", messages=messages, max_tokens=9, temperature=0, logprobs=True, top_logprobs=2
    )
    assert raw.headers[VERSION] == "a2@v1"
    r = raw.parse()
    assert r.object == "chat.completion" and r.system_fingerprint == "a2@v1"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    content = r.choices[0].logprobs.content
    assert len(content) == 9 and all(len(t.top_logprobs) == 2 for t in content)
    # the chat template of the tokenizer is applied: the same text sent as a raw completion prompt agrees
    prompt = (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    same = client.completions.create(model="a2", prompt=prompt, max_tokens=9, temperature=0)
    assert same.choices[0].text == msg.content
    assert r.usage.prompt_tokens == same.usage.prompt_tokens


def test_chat_streaming(client):
    messages = [{"role": "user", "content": "Once upon a time"}]
    sample = dict(
        model="a1",
        messages=messages,
        max_tokens=8,
        temperature=0.8,
        seed=3,
        n=2,
        extra_body={"ignore_eos": True},
    )
    full = client.chat.completions.create(**sample)
    stream = client.chat.completions.create(**sample, stream=True, stream_options={"include_usage": True})
    parts: dict[int, str] = {0: "", 1: ""}
    roles = set()
    usage = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.system_fingerprint == "a1@v1"
        for choice in chunk.choices:
            parts[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.add((choice.index, choice.delta.role))
        usage = chunk.usage or usage
    assert roles == {(0, "assistant"), (1, "assistant")}
    assert parts == {c.index: c.message.content for c in full.choices}
    assert usage.completion_tokens == 16


def test_ignore_eos_and_max_tokens_default(http, server):
    r = http.post(
        "/v1/completions",
        json={"model": server.model, "prompt": "Hi", "max_tokens": 40, "ignore_eos": True, "temperature": 0},
    ).json()
    assert r["usage"]["completion_tokens"] == 40
    chat = http.post(
        "/v1/chat/completions",
        json={
            "model": server.model,
            "ignore_eos": True,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}],
        },
    ).json()
    # no max_tokens: the rest of the context
    assert chat["usage"]["total_tokens"] == 256 and chat["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 250, "prompt": "Hello there Hello there"}, "max_tokens"),
        ({"prompt": "x " * 300}, "prompt"),
        ({"n": 0}, "n"),
        ({"max_tokens": "8"}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": 3}, "stop"),
        ({"prompt": {"text": "x"}}, "prompt"),
        ({"prompt": [100000]}, "prompt"),
        ({"prompt": [1, -1]}, "prompt.1"),
        ({"prompt": [[1], "x"]}, "prompt.1"),
        ({"logprobs": 50}, "logprobs"),
        ({"stream": "yes"}, "stream"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"model": 7}, "model"),
    ],
)
def test_bad_completion_parameters_are_400(http, server, body, param):
    payload = {"model": server.model, "prompt": "Hello", "max_tokens": 4, **body}
    r = http.post("/v1/completions", json=payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_bad_chat_parameters_are_400(client, http, server):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=server.model, messages=[{"role": "wizard", "content": "x"}])
    assert exc.value.body["param"].startswith("messages")
    for body in (
        {"messages": []},
        {"messages": "hi"},
        {"max_completion_tokens": 1000},
        {"top_logprobs": 2},
        {"logprobs": True, "top_logprobs": 21},
    ):
        payload = {"model": server.model, "messages": [{"role": "user", "content": "x"}], **body}
        r = http.post("/v1/chat/completions", json=payload)
        assert r.status_code == 400, (body, r.text)
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], stream=True)
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_health_and_metrics(http, server):
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    complete(http, "a1", max_tokens=3)
    text = http.get("/metrics").text
    for name in (
        "trainserve_requests_total",
        "trainserve_generation_tokens_total",
        "trainserve_adapter_swaps_total",
        "trainserve_engine_queue_length",
        "trainserve_time_to_first_token_seconds_bucket",
    ):
        assert name in text, name
    gen = [ln for ln in text.splitlines() if ln.startswith('trainserve_generation_tokens_total{model="a1"}')]
    assert gen and float(gen[0].split()[-1]) >= 3
    ok = [
        ln
        for ln in text.splitlines()
        if ln.startswith('trainserve_requests_total{route="/v1/completions",status="200"}')
    ]
    assert ok and float(ok[0].split()[-1]) >= 1


def _metric(http, prefix: str) -> float:
    lines = [ln for ln in http.get("/metrics").text.splitlines() if ln.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_client_disconnect_aborts_engine_work(http, server):
    import httpx
    from server_support import wait_for

    body = {
        "model": "a1",
        "prompt": PROMPTS[3],
        "max_tokens": 240,
        "n": 8,
        "temperature": 1.0,
        "ignore_eos": True,
    }
    aborted = _metric(http, "trainserve_requests_aborted_total")
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk: the connection closes
    wait_for(lambda: _metric(http, "trainserve_requests_aborted_total") == aborted + 1, what="stream abort")
    wait_for(lambda: _metric(http, "trainserve_engine_queue_length") == 0, what="empty engine queue")
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        http.post("/v1/completions", json=body, timeout=0.5)
    wait_for(lambda: _metric(http, "trainserve_requests_aborted_total") == aborted + 2, what="request abort")
    wait_for(lambda: _metric(http, "trainserve_engine_queue_length") == 0, what="empty engine queue")
    assert complete(http, "a1", max_tokens=3)["usage"]["completion_tokens"] == 3
