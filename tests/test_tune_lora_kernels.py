"""The LoRA kernel tuner's pure parts: the shapes it tunes and vLLM's config-file layout.

The tuning itself needs CUDA (vLLM's Triton LoRA kernels); this checks that what it writes is what
vLLM 0.26's ``get_lora_op_configs`` looks up: ``config[max_loras][num_slices][m][k][n]`` in
``<GPU>_SHRINK.json`` / ``<GPU>_EXPAND_TRUE.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "scripts"))

import tune_lora_kernels as tune  # noqa: E402

from trainserve.random_model import QWEN2_SHAPES  # noqa: E402


def test_projections_are_the_lora_wrapped_layers_of_a_qwen2_shape():
    p = tune.projections(QWEN2_SHAPES["7b"])
    assert p == {"qkv": (3584, [3584, 512, 512]), "o": (3584, [3584]), "gate_up": (3584, [18944, 18944]),
                 "down": (18944, [3584])}
    p = tune.projections(QWEN2_SHAPES["1.5b"])
    assert p["qkv"] == (1536, [1536, 256, 256]) and p["down"] == (8960, [1536])


def test_config_files_use_vllms_names_and_nesting():
    assert tune.gpu_file_name("NVIDIA H200", "SHRINK") == "NVIDIA_H200_SHRINK.json"
    assert tune.gpu_file_name("NVIDIA H100 80GB HBM3", "EXPAND_TRUE") == "NVIDIA_H100_80GB_HBM3_EXPAND_TRUE.json"
    a, b = {"block_m": 16}, {"block_m": 64}
    data = tune.nest([(4, 3, 64, 3584, 16, a), (4, 1, 64, 18944, 16, b), (4, 3, 16, 3584, 16, b)])
    assert data["4"]["3"]["64"]["3584"]["16"] is a
    assert data["4"]["1"]["64"]["18944"]["16"] is b and data["4"]["3"]["16"]["3584"]["16"] is b


def test_search_spaces_have_every_key_vllms_kernels_read():
    shrink_keys = {"block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages", "num_ctas"}
    expand_keys = {"block_m", "block_n", "block_k", "num_warps", "num_stages", "num_ctas"}
    assert all(set(c) == shrink_keys for c in tune.grid(tune.SHRINK_SPACE))
    assert all(set(c) == expand_keys for c in tune.grid(tune.EXPAND_SPACE))
    n = 1
    for values in tune.SHRINK_SPACE.values():
        n *= len(values)
    assert len(tune.grid(tune.SHRINK_SPACE)) == n


def test_refuses_bad_values_and_a_machine_without_cuda(tmp_path, monkeypatch):
    import torch

    with pytest.raises(SystemExit):
        tune.main(["--m", "0", "--out", str(tmp_path)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        tune.main(["--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing written
