"""Tuned LoRA kernel configurations (issue 11): set only where they were measured, and vLLM reads them
as intended — tuned entries at decode batch 64, vLLM's own defaults at every other batch."""

from __future__ import annotations

import json
import os

import pytest

from trainserve.engine import lora_kernel_configs as lkc


@pytest.fixture
def clean_env(monkeypatch):
    """No folder in the environment, none set by trainserve, and vLLM's caches left alone."""
    monkeypatch.setenv(lkc.ENV, "")  # records the original, so what apply() writes is undone afterwards
    monkeypatch.delenv(lkc.ENV)
    monkeypatch.delenv("TRAINSERVE_LORA_KERNEL_CONFIGS", raising=False)
    monkeypatch.setattr(lkc, "_SET_BY_US", None)
    forgets = []
    from trainserve.engine import vllm_compat

    monkeypatch.setattr(vllm_compat, "forget_lora_kernel_configs", lambda: forgets.append(1))
    return forgets


def test_folder_only_for_the_tuned_gpu_width_and_rank(clean_env, monkeypatch, tmp_path) -> None:
    assert lkc.tuned_folder("NVIDIA H200", 3584, 16) == str(lkc.FOLDER)
    assert lkc.tuned_folder("NVIDIA H100 80GB HBM3", 3584, 16) is None
    assert lkc.tuned_folder("NVIDIA H200", 1536, 16) is None  # 1.5B: not tuned
    assert lkc.tuned_folder("NVIDIA H200", 3584, 32) is None
    assert lkc.tuned_folder(None, 3584, 16) is None  # CPU
    monkeypatch.setenv(lkc.ENV, str(tmp_path))  # the user's folder: trainserve chooses none
    assert lkc.tuned_folder("NVIDIA H200", 3584, 16) is None
    monkeypatch.delenv(lkc.ENV)
    monkeypatch.setenv("TRAINSERVE_LORA_KERNEL_CONFIGS", "0")
    assert lkc.tuned_folder("NVIDIA H200", 3584, 16) is None
    monkeypatch.setenv("TRAINSERVE_LORA_KERNEL_CONFIGS", "off")
    assert lkc.tuned_folder("NVIDIA H200", 3584, 16) is None
    monkeypatch.setenv("TRAINSERVE_LORA_KERNEL_CONFIGS", "yes")
    assert lkc.tuned_folder("NVIDIA H200", 3584, 16) == str(lkc.FOLDER)
    monkeypatch.setenv("TRAINSERVE_LORA_KERNEL_CONFIGS", "maybe")
    with pytest.raises(ValueError, match="TRAINSERVE_LORA_KERNEL_CONFIGS.*'maybe'"):
        lkc.tuned_folder("NVIDIA H200", 3584, 16)
    for gpu in lkc.TUNED:  # every tuned GPU ships both files vLLM looks for
        assert (lkc.FOLDER / f"{gpu}_SHRINK.json").is_file() and (lkc.FOLDER / f"{gpu}_EXPAND_TRUE.json").is_file()


def test_apply_and_restore_never_leave_trainserves_folder_behind(clean_env, monkeypatch, tmp_path) -> None:
    folder = str(lkc.FOLDER)
    assert lkc.apply(folder) == folder and os.environ[lkc.ENV] == folder
    assert lkc.apply(None) is None and lkc.ENV not in os.environ  # a second engine, not tuned: defaults
    assert lkc.apply(folder) == folder
    lkc.restore()  # the engine stopped
    assert lkc.ENV not in os.environ
    assert len(clean_env) == 3  # vLLM was told to read the folder again before every engine


def test_a_folder_the_user_set_wins_and_stays(clean_env, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(lkc.ENV, str(tmp_path))
    assert lkc.apply(str(lkc.FOLDER)) == str(tmp_path)
    assert lkc.apply(None) == str(tmp_path)
    lkc.restore()
    assert os.environ[lkc.ENV] == str(tmp_path)


def _lookups(u) -> dict:
    out = {}
    for op, add in (("shrink", None), ("expand", True)):
        for slices, width in ((1, 3584), (2, 18944), (3, 3584)):
            hidden = width if op == "expand" else 3584
            for m in (1, 8, 32, 50, 64, 70, 100, 127, 256, 4096):
                out[f"{op}/{slices}/{m}"] = dict(u.get_lora_op_configs(op, 4, m, hidden, 16, slices, add))
    return out


def test_vllm_reads_tuned_entries_at_batch_64_and_its_defaults_elsewhere(monkeypatch) -> None:
    """vLLM's own lookup, without and then with the shipped folder, each after
    ``vllm_compat.forget_lora_kernel_configs`` (what ``start_engine`` does through ``apply``): also the
    contract test of that helper, since without it the second lookup would return the first's."""
    u = pytest.importorskip("vllm.lora.ops.triton_ops.utils")
    import torch

    from trainserve.engine.vllm_compat import forget_lora_kernel_configs

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H200")
    monkeypatch.setenv(lkc.ENV, "")
    monkeypatch.delenv(lkc.ENV)
    try:
        forget_lora_kernel_configs()
        default = _lookups(u)
        monkeypatch.setenv(lkc.ENV, str(lkc.FOLDER))
        forget_lora_kernel_configs()
        shipped = _lookups(u)
    finally:
        monkeypatch.undo()
        forget_lora_kernel_configs()  # no later test sees these lookups
    files = {op: json.loads((lkc.FOLDER / f"NVIDIA_H200_{name}.json").read_text())
             for op, name in (("shrink", "SHRINK"), ("expand", "EXPAND_TRUE"))}
    for key, cfg in shipped.items():
        op, slices, m = key.split("/")
        if m in ("64", "70"):  # 57-80 are nearest to 64
            by_k = files[op]["4"][slices]["64"]
            (tuned,) = [n for by_n in by_k.values() for n in by_n.values()]
            assert cfg == tuned, key
            assert cfg != default[key], key  # the tuning changed something
        else:
            assert cfg == default[key], key


@pytest.mark.parametrize("gpu,hidden,folder", [("NVIDIA H200", 3584, True), ("NVIDIA H200", 1536, False),
                                               ("NVIDIA A100-SXM4-80GB", 3584, False)])
def test_loader_asks_for_the_tuned_folder_only_where_it_applies(clean_env, monkeypatch, gpu, hidden,
                                                                folder) -> None:
    """The loader derives the folder from the GPU and the model's width and puts it in the engine spec
    (which ``start_engine`` applies before vLLM starts)."""
    from types import SimpleNamespace

    import torch

    from trainserve import loader
    from trainserve.engine import launch

    class Started(Exception):
        pass

    seen = {}

    def fake_start(spec):
        seen["spec"] = spec
        raise Started

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(launch, "start_engine", fake_start)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: gpu)
    config = SimpleNamespace(model_type="qwen2", hidden_size=hidden)
    with pytest.raises(Started):
        loader._load_colocated("some/model", config, torch.bfloat16, 512, 16, 2, 0.5, 0, False, None)
    assert seen["spec"].lora_kernel_configs == (str(lkc.FOLDER) if folder else None)


def test_under_a_launcher_the_local_ranks_gpu_is_asked(clean_env, monkeypatch) -> None:
    """Under torchrun the device is selected only when the process group starts, after the spec is
    built: the name must come from ``LOCAL_RANK``'s GPU, not from the current device (GPU 0)."""
    import torch

    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: asked.append(index) or "NVIDIA H200")
    assert lkc.folder_for(3584, 16) == str(lkc.FOLDER) and asked == [1]


def test_describe_names_the_folder_and_its_files(clean_env, monkeypatch, tmp_path) -> None:
    assert lkc.describe() is None  # vLLM's defaults
    lkc.apply(str(lkc.FOLDER))
    shipped = lkc.describe()
    assert shipped["folder"] == str(lkc.FOLDER) and len(shipped["sha256"]) == 16
    (tmp_path / "NVIDIA_H200_SHRINK.json").write_text("{}")
    monkeypatch.setenv(lkc.ENV, str(tmp_path))
    assert lkc.describe()["sha256"] != shipped["sha256"]  # other files, another hash


def test_a_failed_engine_start_leaves_no_folder_behind(clean_env, monkeypatch) -> None:
    pytest.importorskip("vllm")
    import vllm

    from trainserve.engine import launch

    class Failed(RuntimeError):
        pass

    def failing_llm(**kwargs):
        assert os.environ[lkc.ENV] == str(lkc.FOLDER)  # set for the engine that is starting
        raise Failed

    monkeypatch.setattr(vllm, "LLM", failing_llm)
    monkeypatch.setattr(launch, "_CURRENT", None)  # as in a process with no engine yet
    spec = launch.EngineSpec(model_path="m", architecture="Qwen2ForCausalLM", dtype="float32", max_model_len=64,
                             max_lora_rank=16, max_loras=1, gpu_memory_utilization=0.5, quantization=None, seed=0,
                             lora_kernel_configs=str(lkc.FOLDER))
    with pytest.raises(Failed):
        launch.start_engine(spec)
    assert lkc.ENV not in os.environ and launch.current_engine() is None
