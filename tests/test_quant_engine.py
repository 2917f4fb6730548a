"""trainserve's integer engine formats end to end on CPU: vLLM runs the registered quantisation
method (its torch reference instead of Marlin, ``TRAINSERVE_EMULATE_QUANT=1``), the trainer views the
same packed bytes, and engine logprobs match the trainer's before and after LoRA training.

Each format runs in its own process: the suite's shared engine is a 16-bit one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.engine

_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    import torch
    sys.path.insert(0, {tests!r})
    from helpers import sft
    from trainserve import FastLanguageModel, tiny_model
    from trainserve.model_api import state_of
    from trainserve.weights import shared_storage_report
    from trainserve.weights.packed_linear import PackedLinear
    from vllm import SamplingParams

    flags = json.loads(sys.argv[1])
    model, tok = FastLanguageModel.from_pretrained(tiny_model(), max_seq_length=256, fast_inference=True,
                                                   gpu_memory_utilization=0.3, max_lora_rank=16, **flags)
    engine = state_of(model).engine
    layer = engine.model.model.layers[0].self_attn.qkv_proj.base_layer
    report = {{"quantization": engine.spec.quantization,
              "packed": type(model.model.layers[0].mlp.up_proj).__name__,
              "engine_has_dense_weight": hasattr(layer, "weight"),
              "storage": shared_storage_report(model, engine.model)}}
    prompt = "The secret phrase is"
    greedy = SamplingParams(max_tokens=8, temperature=0, logprobs=0)

    def gap(m):
        # engine logprobs of its greedy tokens vs the trainer's, same tokens
        out = m.fast_generate([prompt], sampling_params=greedy)[0].outputs[0]
        ids = tok(prompt).input_ids + list(out.token_ids)
        with torch.no_grad():
            logits = m(input_ids=torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        n = len(tok(prompt).input_ids)
        trainer = [lp[n - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
        engine_lp = [d[t].logprob for d, t in zip(out.logprobs, out.token_ids)]
        return list(out.token_ids), max(abs(a - b) for a, b in zip(trainer, engine_lp))

    import os
    os.environ["TRAINSERVE_RETURN_LOGITS"] = "1"
    report["base_tokens"], report["base_gap"] = gap(model)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    sft(model, tok, prompt, " purple elephant", steps=25, lr=5e-3)
    report["lora_tokens"], report["lora_gap"] = gap(model)
    with model.disable_adapter():
        report["disabled_tokens"], _ = gap(model)
    print("RESULT " + json.dumps(report))
""")


@pytest.mark.parametrize("flags,quantization", [
    ({"load_in_4bit": True}, "trainserve_int4"),
    ({"load_in_8bit": True}, "trainserve_int8"),
], ids=["int4", "int8"])
def test_int_format_engine_matches_trainer(flags: dict, quantization: str) -> None:
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRAINSERVE_EMULATE_QUANT="1", VLLM_LOGGING_LEVEL="WARNING")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=tests), json.dumps(flags)],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-4000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["quantization"] == quantization
    assert r["packed"] == "PackedLinear" and not r["engine_has_dense_weight"]
    assert r["storage"]["separate"] == 0 and r["storage"]["shared"] > 0
    assert r["base_gap"] < 1e-3, r
    assert r["lora_gap"] < 1e-3, r
    assert r["lora_tokens"] != r["base_tokens"], "training did not change what the engine generates"
    assert r["disabled_tokens"] == r["base_tokens"]
