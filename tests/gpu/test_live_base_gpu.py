"""Issue 12 on CUDA: the engine follows the trainer where the trainer changes what the engine reads.

* ``full_finetuning=True, fast_inference=True``: after optimizer steps on the shared bf16 weights,
  the engine's greedy tokens on a long prompt (many KV blocks, so a stale prefix-cache hit would
  show) carry the trainer's logprobs, and differ from what the engine said before the steps.
* Qwen2 with YaRN in ``config.json``: engine and trainer agree on a prompt longer than
  ``original_max_position_embeddings``, with a trained live adapter.
* Qwen3 (per-head q/k norms) and Mistral (a sliding window shorter than the prompt), 16-bit: engine
  and trainer agree with a trained live adapter.

One engine per process, so each case runs in its own interpreter. Tolerances are bf16 noise
(max 0.1, mean 0.03 nats), as in ``test_quant_formats_gpu.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("vllm")

_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from vllm import SamplingParams
    sys.path.insert(0, sys.argv[3])
    from model_variants import tiny_mistral, tiny_qwen2_with, tiny_qwen3
    from trainserve import FastLanguageModel, tiny_model

    case, out = sys.argv[1], sys.argv[2]
    DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a dry run of this script only
    LONG = "The old bridge over the river reads the map of stars and the small robot writes a secret phrase. " * 4
    ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def engine(model, ids, n=8):
        sp = SamplingParams(max_tokens=n, temperature=0.0, logprobs=0)
        o = model.fast_generate([ids], sampling_params=sp)[0].outputs[0]
        return list(o.token_ids), [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]

    def trainer(model, ids, toks):
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + toks[:-1]], device=DEV)).logits[0, len(ids) - 1:]
        lp = torch.log_softmax(logits.float(), -1)
        return [float(lp[i, t]) for i, t in enumerate(toks)]

    def train(model, ids, steps, lr):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        x = torch.tensor([ids], device=DEV)
        model.train()
        for _ in range(steps):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()

    if case == "full":
        model, tok = FastLanguageModel.from_pretrained(tiny_model(), max_seq_length=512, full_finetuning=True,
                                                       fast_inference=True, gpu_memory_utilization=0.3)
        ids = tok(LONG).input_ids
        toks0, before = engine(model, ids)
        train(model, ids, steps=3, lr=1e-3)
    elif case in ("qwen3", "mistral"):
        # the newer architectures on the GPU engine: Qwen3's q/k norms, Mistral's sliding window (a
        # window shorter than the prompt, so the engine's windowed attention must match the trainer's)
        path = tiny_qwen3(out) if case == "qwen3" else tiny_mistral(out, sliding_window=16)
        model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=256, load_in_16bit=True,
                                                       fast_inference=True, gpu_memory_utilization=0.3,
                                                       max_lora_rank=16)
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=ALL7, random_state=0)
        ids = tok(LONG).input_ids
        toks0, before = engine(model, ids)
        train(model, ids, steps=20, lr=3e-3)
    else:
        rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
        path = tiny_qwen2_with(out, rope_parameters=rope, max_position_embeddings=128)
        model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=128, load_in_16bit=True,
                                                       fast_inference=True, gpu_memory_utilization=0.3,
                                                       max_lora_rank=16)
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=ALL7, random_state=0)
        ids = tok(LONG).input_ids
        assert 32 < len(ids) <= 120, len(ids)
        toks0, before = engine(model, ids)
        train(model, ids, steps=20, lr=3e-3)
    toks, after = engine(model, ids)
    ref = trainer(model, ids, toks)
    gap = [abs(a - b) for a, b in zip(after, ref)]
    moved = trainer(model, ids, toks0)
    print("RESULT " + json.dumps({"gap_max": max(gap), "gap_mean": sum(gap) / len(gap),
                                  "moved": max(abs(a - b) for a, b in zip(before, moved)),
                                  "prompt_tokens": len(ids)}), flush=True)
""")


@pytest.mark.parametrize("case", ["full", "yarn", "qwen3", "mistral"])
def test_engine_follows_the_trainer(tmp_path, case: str) -> None:
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-P", "-c", _SCRIPT, case, str(tmp_path / "model"), tests_dir],
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-4000:]
    r = json.loads(lines[-1][len("RESULT "):])
    print(case, r)
    assert r["moved"] > 0.1, r  # training changed the logprobs: the comparison can fail
    assert r["gap_max"] < 0.1 and r["gap_mean"] < 0.03, r
