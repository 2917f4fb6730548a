"""The lean per-step output path on the GPU's vLLM (its internals differ from the CPU build's):
the same mixed batch gives the same outputs with and without it, and it handles most outputs.

Skipped without CUDA or vLLM. Random-weight Qwen2-0.5B shape, trainserve int4 (the GRPO format).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("vllm")


def test_lean_path_returns_what_vllm_returns(tmp_path_factory):
    from lean_outputs_check import check_lean_matches_vllm

    from trainserve import FastLanguageModel
    from trainserve.engine.launch import current_engine
    from trainserve.random_model import random_qwen2

    path = random_qwen2("0.5b", tmp_path_factory.mktemp("qwen2-0.5b"))
    FastLanguageModel.from_pretrained(path, max_seq_length=512, load_in_4bit=True, fast_inference=True,
                                      gpu_memory_utilization=0.3, max_lora_rank=16)
    assert check_lean_matches_vllm(current_engine(), max_tokens=40) >= 150
