"""A training process serving its live adapter: ``model.serve`` in-process, answers follow optimizer steps."""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import load_tiny_fast
from server_support import VERSION

pytestmark = pytest.mark.engine

PROMPT = "Once upon a time"
TARGET = " the little robot learned to sing"


def test_training_process_serves_live_adapter():
    import openai
    from vllm import SamplingParams

    from trainserve import FastLanguageModel
    from trainserve.model_api import state_of

    model, tokenizer = load_tiny_fast()
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    engine = state_of(model).engine
    handle = model.serve(port=0, background=True)
    try:
        assert handle.url.startswith("http://127.0.0.1:") and engine.loop.background
        client = openai.OpenAI(base_url=f"{handle.url}/v1", api_key="unused", max_retries=0, timeout=60)
        base_name = engine.spec.model_path
        assert {base_name, "live"} <= {m.id for m in client.models.list().data}

        def ask() -> tuple[str, str]:
            raw = client.completions.with_raw_response.create(
                model="live", prompt=PROMPT, max_tokens=8, temperature=0
            )
            r = raw.parse()
            assert r.system_fingerprint == raw.headers[VERSION]
            return raw.headers[VERSION], r.choices[0].text

        v0, text0 = ask()
        live = engine.live_owner
        assert v0 == f"live@v{live.version}"
        base = client.completions.create(model=base_name, prompt=PROMPT, max_tokens=8, temperature=0)
        assert text0 == base.choices[0].text  # LoRA B starts at zero: live == base before training

        ids = tokenizer(PROMPT + TARGET, return_tensors="pt").input_ids
        labels = ids.clone()
        labels[:, : len(tokenizer(PROMPT).input_ids)] = -100
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        seen = [v0]
        for step in range(20):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step in (0, 9):
                version, text = ask()
                assert version == f"live@v{live.version}"  # the latest optimizer step
                seen.append(version)
        version, text = ask()
        seen.append(version)
        assert version == f"live@v{live.version}" and len(set(seen)) == len(seen)  # a new version each time
        assert text != text0
        expected = tokenizer.decode(tokenizer(TARGET).input_ids[:8])
        assert text == expected, (text, expected)  # the served live adapter has learned the target
        # the trainer's own fast_generate (synchronous path) agrees with what the server serves
        own = model.fast_generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
        assert own == text
        # an optimizer that does not hold the live adapter's parameters publishes nothing
        other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        before = live.version
        other.step()
        assert ask()[0] == f"live@v{before}"
        metrics = httpx.get(f"{handle.url}/metrics").text
        swaps = [
            ln for ln in metrics.splitlines() if ln.startswith('trainserve_adapter_swaps_total{kind="live"}')
        ]
        assert float(swaps[0].split()[-1]) >= 3
    finally:
        handle.stop()
    assert not engine.loop.background and not handle.running
    publishes = handle.publisher.publishes
    optimizer.step()  # after stop the hook is gone
    assert handle.publisher.publishes == publishes
