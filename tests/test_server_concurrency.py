"""32 concurrent streaming clients while an adapter is reloaded 10 times: no request fails, and every
response comes, whole, from exactly one version (its text is that version's greedy output)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from server_support import PROMPTS, complete, make_adapter, wait_for

pytestmark = pytest.mark.engine

CLIENTS = 32
RELOADS = 10
MAX_TOKENS = 24


def _content(label: str) -> str:
    """swap@v1 holds A, v2 B, v3 A, ... (the reloads alternate)."""
    return "A" if int(label.rsplit("@v", 1)[1]) % 2 else "B"


async def _client_loop(client: openai.AsyncOpenAI, worker: int, stop: asyncio.Event, results: list) -> None:
    for i in range(12):  # bounded: at most 12 requests per client
        if stop.is_set() and i >= 2:
            return
        prompt = PROMPTS[(worker + i) % len(PROMPTS)]
        raw = await client.completions.with_raw_response.create(
            model="swap",
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        header = raw.headers["x-trainserve-adapter-version"]
        fingerprints, text = set(), []
        async for chunk in raw.parse():
            fingerprints.add(chunk.system_fingerprint)
            text.extend(c.text for c in chunk.choices)
        results.append((prompt, header, fingerprints, "".join(text)))


async def _reloader(url: str, stop: asyncio.Event, versions: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.sleep(0.5)
        for k in range(RELOADS):
            path = "pool/conc_b" if k % 2 == 0 else "pool/conc_a"
            r = await http.post(
                "/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": path, "load_inplace": True}
            )
            assert r.status_code == 200, r.text
            versions.append(r.json()["version"])
            await asyncio.sleep(0.3)
    stop.set()


def test_concurrent_streams_during_reloads(server):
    pool = server.adapters_dir / "pool"
    pool.mkdir(exist_ok=True)
    make_adapter(pool / "conc_a", seed=61)
    make_adapter(pool / "conc_b", seed=62)
    with server.client() as http:
        for name, path in (("refA", "pool/conc_a"), ("refB", "pool/conc_b"), ("swap", "pool/conc_a")):
            r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
            assert r.status_code == 200, r.text
        refs = {
            (c, p): complete(http, f"ref{c}", p, MAX_TOKENS, ignore_eos=True)["choices"][0]["text"]
            for c in "AB"
            for p in PROMPTS
        }
        for p in PROMPTS:
            assert refs[("A", p)] != refs[("B", p)]

    async def run() -> tuple[list, list, float]:
        client = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1",
            api_key="unused",
            max_retries=0,
            timeout=180,
            http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64)),
        )
        stop, results, versions = asyncio.Event(), [], []
        started = time.perf_counter()
        await asyncio.gather(
            _reloader(server.url, stop, versions),
            *(_client_loop(client, w, stop, results) for w in range(CLIENTS)),
        )
        await client.close()
        return results, versions, time.perf_counter() - started

    results, versions, seconds = asyncio.run(run())
    assert versions == [f"swap@v{k}" for k in range(2, RELOADS + 2)]
    assert len(results) >= 2 * CLIENTS
    seen = set()
    for prompt, header, fingerprints, text in results:
        assert fingerprints == {header}, (header, fingerprints)  # one version per response
        assert text == refs[(_content(header), prompt)], (header, prompt)  # whole, from that version
        seen.add(header)
    assert len(seen) >= 4, seen  # requests really ran across several reloads
    with server.client() as http:
        # retired versions leave the engine once their requests are done
        wait_for(
            lambda: http.get("/health").json()["adapter_versions_retiring"] == 0, what="retired versions"
        )
        for name in ("refA", "refB", "swap"):
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    print(
        f"\n{len(results)} streamed requests by {CLIENTS} clients in {seconds:.1f} s, versions seen: "
        f"{sorted(seen, key=lambda v: int(v.split('@v')[1]))}"
    )
