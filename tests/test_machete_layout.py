"""Machete layout (issue 11) on CPU: learning a layout from a packer, packing, dequantising, and
the trainer's projection over Machete tensors against plain autograd; the Triton dequantiser under
the interpreter. The real packer is CUDA-only: ``tests/gpu/test_machete_gpu.py`` checks the
learnt layout against it. Here synthetic layouts (random block tables, both block orders) stand
in, which is what makes the learner's checks testable at all; the word kernel runs on the bit
permutation vLLM's packer was measured to give (``PREPACK_BITS``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from trainserve.kernels.machete_dequant import (
    MacheteQuantState,
    MacheteTensors,
    dequantize_machete,
    dequantize_machete_reference,
)
from trainserve.kernels.machete_layout import (
    BLOCK,
    BLOCK_K,
    BLOCK_N,
    PREPACK_BITS,
    MacheteLayout,
    bit_permutation_table,
    check_prepacked,
    learn_layout,
    pack_reference,
    pack_rows_gptq,
    quantize_for_machete,
    unpack_reference,
)
from trainserve.kernels.marlin_layout import IntFormat, quantize_groups
from trainserve.kernels.packed_state import packed_linear, packed_linear_reference
from triton_interpreter import run_under_interpreter


def _synthetic(k_fastest: bool, seed: int = 0) -> MacheteLayout:
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(BLOCK, generator=g).reshape(BLOCK_K, BLOCK_N).to(torch.int32)
    return MacheteLayout(table=table, k_fastest=k_fastest)


def _packer(layout: MacheteLayout):
    """A stand-in for machete_prepack_B that follows ``layout``."""
    def prepack(words: torch.Tensor) -> torch.Tensor:
        k, n = words.shape[0] * 8, words.shape[1]
        shifts = (torch.arange(8, dtype=torch.int32) * 4)[None, :, None]
        q = ((words[:, None, :] >> shifts) & 15).reshape(k, n)
        return pack_reference(q, layout)
    return prepack


@pytest.mark.parametrize("k_fastest", [True, False])
def test_learn_layout_recovers_a_block_layout(k_fastest: bool) -> None:
    truth = _synthetic(k_fastest, seed=int(k_fastest))
    got = learn_layout(_packer(truth), "cpu")
    assert got.k_fastest == k_fastest
    assert torch.equal(got.table, truth.table)


def test_learn_layout_refuses_what_it_cannot_describe() -> None:
    def global_shuffle(words: torch.Tensor) -> torch.Tensor:  # a permutation that is not block-local
        flat = words.reshape(-1)
        shifts = torch.arange(8, dtype=torch.int32) * 4
        nib = ((flat[:, None] >> shifts) & 15).reshape(-1)
        nib = nib[torch.randperm(nib.numel(), generator=torch.Generator().manual_seed(3))]
        return (nib.reshape(-1, 8).to(torch.int64) << shifts.to(torch.int64)).sum(1).to(torch.int32)

    with pytest.raises(RuntimeError, match="not block-local"):
        learn_layout(global_shuffle, "cpu")

    def transforms_values(words: torch.Tensor) -> torch.Tensor:  # e.g. a signed-offset conversion
        return words ^ 0x88888888 - 2**32

    with pytest.raises(RuntimeError, match="pure permutation"):
        learn_layout(transforms_values, "cpu")


@pytest.mark.parametrize("k_fastest", [True, False])
def test_pack_unpack_and_check(k_fastest: bool) -> None:
    layout = _synthetic(k_fastest, seed=5)
    q = torch.randint(0, 16, (3 * BLOCK_K, 4 * BLOCK_N), dtype=torch.int32)
    packed = pack_reference(q, layout)
    assert packed.shape == (q.shape[0] // 8, q.shape[1]) and packed.dtype == torch.int32
    assert torch.equal(unpack_reference(packed, layout, *q.shape), q)
    check_prepacked(packed, pack_rows_gptq(q), layout)
    other = MacheteLayout(layout.table, not k_fastest)
    with pytest.raises(RuntimeError, match="not the learnt one"):
        check_prepacked(packed, pack_rows_gptq(q), other)


def test_quantiser_matches_the_marlin_rounding() -> None:
    torch.manual_seed(0)
    w = torch.randn(2 * BLOCK_N, 3 * BLOCK_K) * 0.02  # (N, K)
    words, scales, zf = quantize_for_machete(w, 64, torch.bfloat16, chunk=BLOCK_N)
    q, s, z = quantize_groups(w.t(), IntFormat(bits=4, group_size=64, zero_point=True), torch.bfloat16)
    assert torch.equal(words, pack_rows_gptq(q)) and torch.equal(scales, s)
    layout = _synthetic(True)
    t = MacheteTensors(pack_reference(q, layout), scales, zf, layout, 64)
    exact = (q.float() - z.float().repeat_interleave(64, 0)) * s.float().repeat_interleave(64, 0)
    got = dequantize_machete_reference(t, 0, t.n, torch.float32)
    # zf = -s * z is rounded to bf16: at most half a bf16 ulp of s * z (<= 15 s) apart
    bound = (15 * s.float()).repeat_interleave(64, 0) * 2**-8
    assert ((got - exact).abs() <= bound + 1e-9).all()
    rel = ((got - w.t()).norm() / w.norm()).item()
    assert rel < 0.12, rel  # int4 g64 round-to-nearest on Gaussian weights: ~0.09


@pytest.mark.parametrize("k_fastest", [True, False])
def test_shards_are_views_and_match_autograd(k_fastest: bool) -> None:
    torch.manual_seed(1)
    layout = _synthetic(k_fastest, seed=7)
    k, n = 2 * BLOCK_K, 5 * BLOCK_N
    w = torch.randn(n, k)
    words, scales, zf = quantize_for_machete(w, 64, torch.float32)
    q = unpack_reference(pack_reference(torch.zeros(k, n, dtype=torch.int32), layout), layout, k, n)
    assert not q.any()
    shifts = (torch.arange(8, dtype=torch.int32) * 4)[None, :, None]
    qv = ((words[:, None, :] >> shifts) & 15).reshape(k, n)
    parent = MacheteTensors(pack_reference(qv, layout), scales, zf, layout, 64)
    full = dequantize_machete_reference(parent, 0, n, torch.float32)
    states = [MacheteQuantState(parent, a, b, torch.float32) for a, b in ((0, 256), (256, 384), (384, 640))]
    for st in states:
        assert torch.equal(st.dequantize_t(torch.float32), full[:, st.n0:st.n1])
        assert st.storage().untyped_storage().data_ptr() == parent.qweight.untyped_storage().data_ptr()
        if k_fastest:  # one block column = one run of words: the shard's words are its own slice
            assert st.storage().numel() * 8 == k * (st.n1 - st.n0)
    merged = states[0].merge(states[1:])
    assert merged is not None and torch.equal(merged.dequantize_t(torch.float32), full)
    assert states[0].merge([states[2]]) is None
    x = torch.randn(3, 4, k, requires_grad=True)
    d = torch.randn(3, 4, 128)
    y = packed_linear(x, states[1])
    y_ref = packed_linear_reference(x, states[1])
    assert torch.allclose(y, y_ref, atol=1e-5)
    gx, = torch.autograd.grad(y, x, d)
    gr, = torch.autograd.grad(y_ref, x, d)
    assert torch.allclose(gx, gr, atol=1e-5)
    out = torch.full((k, n), float("nan"))
    dequantize_machete(parent, 128, 384, torch.float32, out=out[:, 128:384])
    assert torch.equal(out[:, 128:384], full[:, 128:384])
    with pytest.raises(ValueError, match="multiples of 128"):
        dequantize_machete(parent, 64, 384, torch.float32)


_INTERPRET = textwrap.dedent("""
    import torch
    from trainserve.kernels.machete_dequant import MacheteTensors, dequantize_machete, dequantize_machete_reference
    from trainserve.kernels.machete_layout import MacheteLayout, pack_reference
    for k_fastest in (True, False):
        g = torch.Generator().manual_seed(int(k_fastest))
        layout = MacheteLayout(torch.randperm(8192, generator=g).reshape(64, 128).to(torch.int32), k_fastest)
        k, n = 128, 384
        q = torch.randint(0, 16, (k, n), dtype=torch.int32, generator=g)
        s = torch.rand(k // 64, n, generator=g) + 0.5
        zf = -s * torch.randint(0, 16, (k // 64, n), generator=g)
        t = MacheteTensors(pack_reference(q, layout), s, zf, layout, 64)
        for a, b in ((0, n), (128, 384), (0, 128)):
            got = dequantize_machete(t, a, b, torch.float32)
            assert torch.equal(got, dequantize_machete_reference(t, a, b, torch.float32)), (k_fastest, a, b)
    print("MACHETE-INTERPRETER-OK")
""")


def test_machete_triton_kernel_under_interpreter() -> None:
    run_under_interpreter(_INTERPRET, "MACHETE-INTERPRETER-OK")


def test_prepack_bits_is_a_block_permutation_and_only_it_takes_the_word_kernel() -> None:
    table = bit_permutation_table(PREPACK_BITS)
    assert torch.equal(torch.sort(table.reshape(-1).long()).values, torch.arange(BLOCK))
    # each word holds rows k, k+1, k+8, k+9 of columns n, n+8 (value t = n3 + 2 k3 + 4 k0)
    word = {(k, n): int(table[k, n]) // 8 for k in range(BLOCK_K) for n in range(BLOCK_N)}
    assert {word[(k, n)] for k in (0, 1, 8, 9) for n in (0, 8)} == {0}
    assert int(table[9, 8]) == 7 and int(table[16, 0]) == 8 and int(table[0, 1]) == 128
    assert MacheteLayout(table, True).prepack_bits and MacheteLayout(table, False).prepack_bits
    other = _synthetic(False)
    assert not other.prepack_bits
    swapped = bit_permutation_table(PREPACK_BITS[1:2] + PREPACK_BITS[:1] + PREPACK_BITS[2:])
    assert not MacheteLayout(swapped, False).prepack_bits
    t = MacheteTensors(pack_reference(torch.zeros(BLOCK_K, BLOCK_N, dtype=torch.int32), other),
                       torch.ones(1, BLOCK_N), torch.zeros(1, BLOCK_N), other, 64)
    with pytest.raises(ValueError, match="PREPACK_BITS"):
        dequantize_machete(t, 0, BLOCK_N, torch.float32, kernel="words")
    with pytest.raises(ValueError, match="kernel must be"):
        dequantize_machete(t, 0, BLOCK_N, torch.float32, kernel="fast")


_INTERPRET_WORDS = textwrap.dedent("""
    import torch
    from trainserve.kernels.machete_dequant import MacheteTensors, dequantize_machete, dequantize_machete_reference
    from trainserve.kernels.machete_layout import PREPACK_BITS, MacheteLayout, bit_permutation_table, pack_reference
    g = torch.Generator().manual_seed(0)
    for k_fastest in (True, False):
        layout = MacheteLayout(bit_permutation_table(PREPACK_BITS), k_fastest)
        for group in (64, 128, 32):
            k, n = 256, 384
            q = torch.randint(0, 16, (k, n), dtype=torch.int32, generator=g)
            s = torch.rand(k // group, n, generator=g) + 0.5
            zf = -s * torch.randint(0, 16, (k // group, n), generator=g)
            t = MacheteTensors(pack_reference(q, layout), s, zf, layout, group)
            for a, b in ((0, n), (128, 384), (0, 128)):
                want = dequantize_machete_reference(t, a, b, torch.float32)
                assert torch.equal(dequantize_machete(t, a, b, torch.float32), want), (k_fastest, group, a, b)
                assert torch.equal(dequantize_machete(t, a, b, torch.float32, kernel="table"), want)
            out = torch.full((k, n + 128), float("nan"), dtype=torch.bfloat16)
            dequantize_machete(t, 128, 384, torch.bfloat16, out=out[:, 64:320])
            want = dequantize_machete_reference(t, 128, 384, torch.float32)
            # the interpreter's float32 -> bf16 cast truncates; the GPU's rounds to nearest
            assert ((out[:, 64:320].float() - want).abs() <= want.abs() * 2**-7).all()
            assert out[:, :64].isnan().all() and out[:, 320:].isnan().all()
    print("MACHETE-WORDS-OK")
""")


def test_machete_word_kernel_under_interpreter() -> None:
    """The word kernel against the reference: both block orders, groups of 32, 64 and 128 rows,
    column shards, and a bf16 output into a column slice of a wider buffer."""
    run_under_interpreter(_INTERPRET_WORDS, "MACHETE-WORDS-OK")


def test_bench_script_refuses_a_machine_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run the benchmark")
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_machete_dequant.py"
    proc = subprocess.run([sys.executable, "-P", str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]



@pytest.mark.parametrize("bad, named", [(["--group", "100"], "--group 100"), (["--gemms", "-1"], "--gemms"),
                                        (["--reps", "0"], "--reps"),
                                        (["--layout", "a.pt", "--dump-layout", "b.pt"], "--dump-layout")])
def test_bench_script_names_a_bad_argument_before_anything_runs(bad, named, monkeypatch, capsys) -> None:
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    monkeypatch.syspath_prepend(str(scripts))
    import bench_machete_dequant

    monkeypatch.setattr(sys, "argv", ["bench_machete_dequant.py", *bad])
    with pytest.raises(SystemExit) as exc:
        bench_machete_dequant.main()
    assert exc.value.code == 2 and named in capsys.readouterr().err


def test_forcing_machete_checks_the_model_before_the_engine_starts(monkeypatch) -> None:
    from types import SimpleNamespace

    from trainserve.precision import Precision, check_model_dims

    int4 = Precision("int4", engine_quantization="trainserve_int4")
    cfg = dict(hidden_size=256, intermediate_size=640, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    monkeypatch.setenv("TRAINSERVE_INT4_KERNEL", "machete")
    check_model_dims(int4, SimpleNamespace(**cfg))  # every projection tiles 64 x 128
    one_kv_head = SimpleNamespace(**{**cfg, "num_key_value_heads": 1})  # k/v: 64 outputs, not a 128-block
    with pytest.raises(ValueError, match="k_proj.*cannot use Machete"):
        check_model_dims(int4, one_kv_head)
    monkeypatch.setenv("TRAINSERVE_INT4_KERNEL", "auto")
    check_model_dims(int4, one_kv_head)  # Marlin takes it
    monkeypatch.setenv("TRAINSERVE_INT4_KERNEL", "fastest")
    with pytest.raises(ValueError, match="TRAINSERVE_INT4_KERNEL must be"):
        check_model_dims(int4, SimpleNamespace(**cfg))
