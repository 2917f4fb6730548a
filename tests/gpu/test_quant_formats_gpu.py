"""trainserve's engine weight formats on the GPU: the layout against vLLM's own CUDA repack, the Triton
dequantiser against its reference, vLLM's Marlin GEMM against the dequantised weight (the contract
of ``vllm_compat.MarlinRunner``), and engine-vs-trainer logprob parity with the live adapter for
int4, int8 and FP8 (per-channel and block scales) (random-weight Qwen2-0.5B shape, trained until the target
is learnt), and the trainer's FP8 activation rounding against vLLM's own CUDA quantisers.

Skipped without CUDA or vLLM. ``TRAINSERVE_GPU_TEST_EAGER=1`` runs the engines without CUDA graphs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("vllm")

from trainserve.kernels.marlin_dequant import dequantize_marlin, dequantize_marlin_triton  # noqa: E402
from trainserve.kernels.marlin_layout import (  # noqa: E402
    IntFormat,
    column_slice,
    dequantize_marlin_reference,
    pack_weight,
    quantize_to_marlin,
)

FORMATS = [IntFormat(4, 64, True), IntFormat(8, 128, False), IntFormat(4, 128, False)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def _gptq_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's layout: ``32 // bits`` consecutive K values per int32, shape ``(K // pf, N)``."""
    pf = 32 // bits
    k, n = q.shape
    v = q.to(torch.int64).view(k // pf, pf, n)
    words = (v << (torch.arange(pf, device=q.device) * bits).view(1, pf, 1)).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("bits", [4, 8])
def test_layout_matches_vllm_cuda_repack(bits: int) -> None:
    from vllm import _custom_ops as ops

    k, n = 512, 768
    q = torch.randint(0, 2**bits, (k, n), device="cuda", dtype=torch.int32)
    ref = ops.gptq_marlin_repack(_gptq_pack(q, bits), torch.empty(0, dtype=torch.int32, device="cuda"), k, n, bits)
    assert torch.equal(pack_weight(q, bits), ref)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_triton_dequant_matches_reference(fmt: IntFormat) -> None:
    w = torch.randn(1536, 1024, device="cuda", dtype=torch.bfloat16)
    t = quantize_to_marlin(w, fmt, torch.bfloat16)
    ref = dequantize_marlin_reference(t, fmt, torch.float32)
    assert torch.equal(dequantize_marlin_triton(t, fmt, torch.float32), ref)
    out = torch.full((1024, 2048), float("nan"), device="cuda", dtype=torch.bfloat16)
    dequantize_marlin_triton(column_slice(t, fmt, 256, 1280), fmt, torch.bfloat16, out=out[:, 64:1088])
    assert torch.equal(out[:, 64:1088], ref[:, 256:1280].bfloat16())
    assert out[:, :64].isnan().all() and out[:, 1088:].isnan().all()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("m", [1, 7, 64, 300])
def test_marlin_gemm_is_x_times_the_dequantised_weight(fmt: IntFormat, m: int) -> None:
    from trainserve.engine.vllm_compat import MarlinRunner

    n, k = 1536, 2048
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    t = quantize_to_marlin(w, fmt, torch.bfloat16)
    zeros = t.zeros if t.zeros is not None else torch.empty(0, dtype=torch.int32, device="cuda")
    runner = MarlinRunner(SimpleNamespace(qweight=t.qweight, trainserve_shape=(n, k)), fmt)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    out = runner(x, t.qweight, t.scales, zeros, bias)
    ref = x.float() @ dequantize_marlin(t, fmt, torch.float32) + bias.float()
    assert rel(out, ref) < 1e-2


@pytest.mark.parametrize("kind", ["token", "group"])
def test_fp8_activation_rounding_is_vllms(kind: str) -> None:
    """The trainer rounds GEMM inputs as vLLM's W8A8 FP8 methods do: same scales, same FP8 bytes."""
    from trainserve.kernels.fp8_activations import quantize_activations, quantize_activations_reference
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils.fp8_utils import per_token_group_quant_fp8

    x = torch.randn(300, 3584, device="cuda", dtype=torch.bfloat16)
    x[7] *= 500.0
    x[11] = 0.0
    q, scale = quantize_activations(x, kind)  # the Triton kernel
    rq, rs = quantize_activations_reference(x, kind)
    assert torch.equal(scale, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    if kind == "token":
        vq, vs = ops.scaled_fp8_quant(x, use_per_token_if_dynamic=True)
    else:
        vq, vs = per_token_group_quant_fp8(x, 128)
    assert torch.allclose(scale, vs.float().reshape(scale.shape), rtol=1e-6, atol=0)
    differ = (q.view(torch.uint8) != vq.view(torch.uint8)).float().mean().item()
    assert differ < 5e-3, differ  # x * (1/s) against x / s can round a tie the other way


@pytest.mark.parametrize("m", [1, 64, 2320])
def test_fp8_rowwise_gemm_matches_its_reference(m: int) -> None:
    from trainserve.kernels.fp8_activations import (
        fp8_rowwise_matmul,
        fp8_rowwise_matmul_reference,
        rowwise_supported,
    )
    from trainserve.kernels.fp8_dequant import quantize_fp8_reference

    wq, ws = quantize_fp8_reference(torch.randn(4608, 3584, device="cuda") * 0.02, "channel")
    x = torch.randn(m, 3584, device="cuda", dtype=torch.bfloat16)
    if torch.cuda.get_device_capability() >= (9, 0):
        assert rowwise_supported(x, wq)
    assert rel(fp8_rowwise_matmul(x, wq, ws), fp8_rowwise_matmul_reference(x, wq, ws)) < 5e-3


@pytest.mark.parametrize("kind", ["channel", "block", "tensor"])
def test_fp8_dequant_kernel_is_its_reference(kind: str) -> None:
    """The Triton FP8 dequantiser (the trainer's backward weight) equals the torch reference bit for
    bit at a real gate|up shape, bf16 and fp32, also on a row slice of the fused tensor."""
    from trainserve.kernels.fp8_dequant import (
        _dequantize_triton,
        dequantize_fp8,
        dequantize_fp8_reference,
        quantize_fp8_reference,
    )

    q, s = quantize_fp8_reference(torch.randn(2 * 18944, 3584, device="cuda") * 0.02, kind)
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(_dequantize_triton(q, s, kind, dtype, 128), dequantize_fp8_reference(q, s, kind, dtype))
    rows, ss = q[18944:], (s[18944:] if kind == "channel" else s[18944 // 128:] if kind == "block" else s)
    assert torch.equal(dequantize_fp8(rows, ss, kind, torch.bfloat16),
                       dequantize_fp8_reference(rows, ss, kind, torch.bfloat16))


_PARITY = textwrap.dedent("""
    import json, os, sys
    import torch
    from vllm import SamplingParams
    from trainserve import FastLanguageModel
    from trainserve.model_api import state_of
    from trainserve.weights import shared_storage_report
    from trainserve.weights.packed_linear import PackedLinear

    path, flags = sys.argv[1], json.loads(sys.argv[2])
    PROMPT, TARGET = "The secret phrase is", " open the blue door slowly."
    ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=512, fast_inference=True,
                                                   gpu_memory_utilization=0.3, max_lora_rank=16, **flags)
    engine = state_of(model).engine
    r = {"engine_quantization": engine.spec.quantization,
         "machete_layers": sum(getattr(m, "trainserve_machete", None) is not None for m in engine.model.modules()),
         "packed": isinstance(model.model.layers[0].self_attn.q_proj, PackedLinear),
         "storage": shared_storage_report(model, engine.model)}
    with torch.no_grad():  # real Qwen2 q/k/v biases are large; these views write the engine's biases too
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.mul_(50.0)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, target_modules=ALL7,
                                             use_gradient_checkpointing="unsloth", random_state=0)
    p_ids = tok(PROMPT).input_ids
    t_ids = tok(TARGET).input_ids + [tok.eos_token_id]
    ids = torch.tensor([p_ids + t_ids], device="cuda")
    labels = torch.tensor([[-100] * len(p_ids) + t_ids], device="cuda")
    # lr 1e-3 (was 2e-3): at 2e-3 this one-phrase recipe spiked for bf16 and FP8 alike (scripts/fp8_parity.py)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(150):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.02:
            break
    model.eval()
    greedy = SamplingParams(max_tokens=len(t_ids), temperature=0, logprobs=0)
    out = model.fast_generate([PROMPT], sampling_params=greedy)[0].outputs[0]
    os.environ["TRAINSERVE_RETURN_LOGITS"] = "1"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p_ids + list(out.token_ids)], device="cuda")).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    trainer = torch.tensor([lp[len(p_ids) - 1 + i, t].item() for i, t in enumerate(out.token_ids)])
    engine_lp = torch.tensor([d[t].logprob for d, t in zip(out.logprobs, out.token_ids)])
    gap = (trainer - engine_lp).abs()
    with model.disable_adapter():
        base = model.fast_generate([PROMPT], sampling_params=SamplingParams(max_tokens=8, temperature=0))
    r.update(learnt=list(out.token_ids)[: len(t_ids) - 1] == t_ids[:-1], gap_max=gap.max().item(),
             gap_mean=gap.mean().item(), base_differs=list(base[0].outputs[0].token_ids)[:7] != t_ids[:7],
             loss=loss.item())
    print("RESULT " + json.dumps(r), flush=True)
""")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    from trainserve.random_model import random_qwen2

    return random_qwen2("0.5b", tmp_path_factory.mktemp("qwen2-0.5b"))


@pytest.mark.parametrize("flags,quantization,kernel", [
    ({"load_in_4bit": True}, "trainserve_int4", "auto"), ({"load_in_4bit": True}, "trainserve_int4", "marlin"),
    ({"load_in_8bit": True}, "trainserve_int8", "auto"), ({"load_in_fp8": True}, "fp8_per_channel", "auto"),
    ({"load_in_fp8": "block"}, "fp8_per_block", "auto"),
], ids=["int4", "int4-marlin", "int8", "fp8", "fp8-block"])
def test_engine_and_trainer_agree_on_the_same_quantised_weights(path, flags: dict, quantization: str,
                                                                kernel: str) -> None:
    """One process per format (one engine per process); ``TRAINSERVE_GPU_TEST_EAGER=1`` skips CUDA graphs.
    On Hopper, int4 runs Machete by default (``kernel="auto"``); ``int4-marlin`` keeps Marlin covered."""
    env = dict(os.environ, TRAINSERVE_INT4_KERNEL=kernel)
    if env.get("TRAINSERVE_GPU_TEST_EAGER") == "1":
        env["TRAINSERVE_ENFORCE_EAGER"] = "1"
    proc = subprocess.run([sys.executable, "-P", "-c", _PARITY, str(path), json.dumps(flags)], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-4000:]
    r = json.loads(lines[-1][len("RESULT "):])
    print(f"{flags}: {r}")
    assert r["engine_quantization"] == quantization and r["packed"]
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert (r["machete_layers"] > 0) == (hopper and kernel == "auto" and flags.get("load_in_4bit", False)), r
    assert r["storage"]["separate"] == 0 and r["storage"]["shared"] > 0, r
    assert r["learnt"] and r["base_differs"], r
    assert r["gap_max"] < 0.1 and r["gap_mean"] < 0.03, r
