"""Issue 12, export: ``save_pretrained_merged`` writes a plain transformers checkpoint that generates
what the live adapter generates, merging into a copy (the engine's base stays bit-identical);
``push_to_hub_merged`` fails fast and clearly offline. (An int4 base's export is checked in
test_quant_engine.py, in that file's int4 child process.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import load_tiny_fast
from helpers import engine_tokens, hf_tokens, sft

from trainserve import FastLanguageModel, tiny_model
from trainserve.export import HubExportError
from trainserve.merge_guard import SharedBaseMergeError
from trainserve.model_api import state_of

PROMPTS = ["The secret phrase is", "Where is the old bridge?"]


def _plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _engine_base(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in state_of(model).engine.model.state_dict().items() if "lora" not in n}


_PLAIN_VLLM = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams  # plain vLLM: trainserve is not imported

    llm = LLM(sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=12, temperature=0))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
""")


def _plain_vllm_tokens(path, prompts) -> list[list[int]]:
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, "-c", _PLAIN_VLLM, str(path), json.dumps(prompts)],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.engine
def test_merged_export_generates_what_the_live_adapter_generates(tmp_path):
    model, tok = load_tiny_fast()
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    sft(model, tok, PROMPTS[0], " open sesame", steps=10)
    weights = _engine_base(model)
    live = [engine_tokens(model, p, n=12) for p in PROMPTS]
    with model.disable_adapter():
        base = [engine_tokens(model, p, n=12) for p in PROMPTS]
    assert live != base  # the adapter matters

    model.save_pretrained_merged(tmp_path / "merged", tok, save_method="merged_16bit")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    merged = _plain(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert [hf_tokens(merged, tok, p, n=12) for p in PROMPTS] == live
    assert _plain_vllm_tokens(tmp_path / "merged", PROMPTS) == live  # plain vLLM loads it too

    after = _engine_base(model)
    assert all(torch.equal(weights[k], after[k]) for k in weights)  # merged into a copy only
    assert [engine_tokens(model, p, n=12) for p in PROMPTS] == live  # still live, not merged

    model.save_pretrained_merged(tmp_path / "lora", tok, save_method="lora")
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    with pytest.raises(NotImplementedError, match="merged_16bit"):
        model.save_pretrained_merged(tmp_path / "q", tok, save_method="merged_4bit")
    with pytest.raises(ValueError, match="save_method"):
        model.save_pretrained_merged(tmp_path / "q", tok, save_method="gguf")
    with pytest.raises(SharedBaseMergeError, match="save_pretrained_merged"):
        model.merge_and_unload()


def test_merged_export_without_engine_matches_the_peft_model(tmp_path):
    model, tok = FastLanguageModel.from_pretrained(tiny_model(), max_seq_length=256, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0, use_rslora=True)
    sft(model, tok, PROMPTS[0], " open sesame", steps=10)
    want = [hf_tokens(model, tok, p, n=12) for p in PROMPTS]
    with model.disable_adapter():
        base = [hf_tokens(model, tok, p, n=12) for p in PROMPTS]
    assert want != base
    model.save_pretrained_merged(str(tmp_path / "merged"), tok)
    merged = _plain(tmp_path / "merged")
    assert [hf_tokens(merged, tok, p, n=12) for p in PROMPTS] == want
    assert [hf_tokens(model, tok, p, n=12) for p in PROMPTS] == want  # the source model is still unmerged


def test_push_to_hub_merged_fails_fast_offline(tmp_path, monkeypatch):
    import huggingface_hub

    model, tok = FastLanguageModel.from_pretrained(tiny_model(), max_seq_length=256, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubExportError, match="HF_HUB_OFFLINE"):
        model.push_to_hub_merged("someone/model", tok)
    with pytest.raises(HubExportError, match="HF_HUB_OFFLINE"):
        model.save_pretrained_merged("someone/model", tok, push_to_hub=True)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    with pytest.raises(HubExportError, match="creating the repository failed.*unreachable"):
        model.push_to_hub_merged("someone/model", tok)
