"""trainserve's integer engine formats end to end on CPU: vLLM runs the registered quantisation
method (its torch reference instead of Marlin, ``TRAINSERVE_EMULATE_QUANT=1``), the trainer views the
same packed bytes, and engine logprobs match the trainer's before and after LoRA training; the
int4 base exports (``save_pretrained_merged``) from its dequantised weights plus the LoRA delta.

The formats run in a child process (the suite's shared engine is a 16-bit one), both in the same
one, one after the other: each gets its own engine, the first shut down before the second starts.
One interpreter instead of one per format saves the slow vLLM import (and the int4 export check,
once a separate process in test_export.py, reuses the int4 run's trained adapter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.engine

FORMATS = {"int4": ({"load_in_4bit": True}, "trainserve_int4"),
           "int8": ({"load_in_8bit": True}, "trainserve_int8")}
EXPORTED = "int4"  # the format whose run also exports the merged model

_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile, traceback, warnings
    import torch
    sys.path.insert(0, {tests!r})
    from helpers import engine_tokens, hf_tokens, sft
    from transformers import AutoModelForCausalLM
    from trainserve import FastLanguageModel, shutdown_engine, tiny_model
    from trainserve.model_api import state_of
    from trainserve.weights import shared_storage_report
    from trainserve.weights.packed_linear import PackedLinear
    from vllm import SamplingParams

    def export(model, tok):
        # the merged export of a packed base: dequantised weights + the LoRA delta, generating as live
        prompts = ["The secret phrase is", "Where is the old bridge?"]
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        dense = layer.base_layer.weight.quant_state.dequantize_t(torch.float32).t() + layer.get_delta_weight("default")
        out = tempfile.mkdtemp()
        model.save_pretrained_merged(out, tok)
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        exported = merged.model.layers[0].self_attn.q_proj.weight
        return {{"packed": isinstance(layer.base_layer, PackedLinear),
                "weight_gap": (exported - dense).abs().max().item(),
                "live": [engine_tokens(model, p, n=12) for p in prompts],
                "merged": [hf_tokens(merged, tok, p, n=12) for p in prompts]}}

    def run(flags, exports):
        os.environ.pop("TRAINSERVE_RETURN_LOGITS", None)  # as for a fresh process: set after loading
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

        os.environ["TRAINSERVE_RETURN_LOGITS"] = "1"
        report["base_tokens"], report["base_gap"] = gap(model)
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
        sft(model, tok, prompt, " purple elephant", steps=25, lr=5e-3)
        report["lora_tokens"], report["lora_gap"] = gap(model)
        with model.disable_adapter():
            report["disabled_tokens"], _ = gap(model)
        if exports:
            report["export"] = export(model, tok)
        return report

    for name, flags in json.loads(sys.argv[1]).items():
        try:  # a format that fails leaves its traceback on stderr; the next one still runs
            print("RESULT " + json.dumps({{"format": name, **run(flags, name == {exported!r})}}), flush=True)
        except Exception:
            traceback.print_exc()
        finally:
            shutdown_engine()
""")


@pytest.fixture(scope="module")
def reports() -> tuple[dict[str, dict], str]:
    """Every format's report from the one child process, and its stderr (for failure messages)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRAINSERVE_EMULATE_QUANT="1", VLLM_LOGGING_LEVEL="WARNING")
    flags = {name: f for name, (f, _) in FORMATS.items()}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=tests, exported=EXPORTED), json.dumps(flags)],
                          env=env, capture_output=True, text=True, timeout=900)
    found = [json.loads(ln[len("RESULT "):]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return {r["format"]: r for r in found}, proc.stderr


@pytest.mark.parametrize("name", list(FORMATS))
def test_int_format_engine_matches_trainer(reports, name: str) -> None:
    found, stderr = reports
    assert name in found, stderr[-4000:]
    r = found[name]
    assert r["quantization"] == FORMATS[name][1]
    assert r["packed"] == "PackedLinear" and not r["engine_has_dense_weight"]
    assert r["storage"]["separate"] == 0 and r["storage"]["shared"] > 0
    assert r["base_gap"] < 1e-3, r
    assert r["lora_gap"] < 1e-3, r
    assert r["lora_tokens"] != r["base_tokens"], "training did not change what the engine generates"
    assert r["disabled_tokens"] == r["base_tokens"]


def test_quantized_base_merges_from_its_dequantized_weights(reports) -> None:
    """An int4 engine base (run on CPU through its torch reference) exports dequantised + LoRA."""
    found, stderr = reports
    assert EXPORTED in found and "export" in found[EXPORTED], stderr[-4000:]
    r = found[EXPORTED]["export"]
    assert r["packed"]
    assert r["weight_gap"] < 1e-6, r
    assert r["merged"] == r["live"], r
