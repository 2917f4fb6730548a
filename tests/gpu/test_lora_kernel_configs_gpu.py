"""Tuned LoRA kernel configs in a real engine (issue 11): on an H200, ``from_pretrained`` points vLLM at
the shipped folder, vLLM loads the files, and generation with a live adapter still matches the
trainer. The tiny model stands in for the tuned 7B width (``TUNED`` is patched to its width, so
vLLM's nearest-entry lookup gives it the 7B tiles: any tile computes the same sums)."""

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
    import json, os
    import torch
    from vllm import SamplingParams
    from trainserve import FastLanguageModel, tiny_model
    from trainserve.engine import lora_kernel_configs as lkc

    path = tiny_model()
    hidden = json.load(open(os.path.join(path, "config.json")))["hidden_size"]
    lkc.TUNED[lkc.vllm_gpu_name(torch.cuda.get_device_name())] = (hidden, 16)
    model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=256, load_in_16bit=True,
                                                   fast_inference=True, gpu_memory_utilization=0.3,
                                                   max_lora_rank=16)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, random_state=0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # a non-zero adapter, so the LoRA kernels change the output
    ids = tok("The old bridge over the river reads the map of stars").input_ids
    o = model.fast_generate([ids], sampling_params=SamplingParams(max_tokens=8, temperature=0.0, logprobs=0))[0]
    toks = list(o.outputs[0].token_ids)
    engine_lp = [lp[t].logprob for t, lp in zip(toks, o.outputs[0].logprobs)]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + toks[:-1]], device="cuda")).logits[0, len(ids) - 1:]
    lp = torch.log_softmax(logits.float(), -1)
    trainer_lp = [float(lp[i, t]) for i, t in enumerate(toks)]
    from vllm.lora.ops.triton_ops import utils as u
    print("RESULT " + json.dumps({
        "folder": os.environ.get(lkc.ENV), "shipped": str(lkc.FOLDER),
        "loaded": u.load_lora_op_config("shrink", None) is not None,
        "gap": max(abs(a - b) for a, b in zip(engine_lp, trainer_lp))}))
""")


def test_engine_reads_the_shipped_configs_and_still_agrees_with_the_trainer(tmp_path) -> None:
    if "H200" not in torch.cuda.get_device_name():
        pytest.skip("the shipped configs are for the H200")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_TUNED_CONFIG_FOLDER",
                                                              "TRAINSERVE_LORA_KERNEL_CONFIGS")}
    proc = subprocess.run([sys.executable, "-P", "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(line[7:])
    assert r["folder"] == r["shipped"] and r["loaded"], r
    assert r["gap"] < 0.1, r  # bf16 noise, as in test_quant_formats_gpu.py
