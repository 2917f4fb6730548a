"""The LoRA MLP's middle on the GPU: the LoRA terms added by cuBLAS ``addmm_`` before the SwiGLU
kernels (the path before ``kernels/swiglu_lora.py``) against the kernels that add them inside.

Per layer and micro-batch, with gate|up recomputed in the backward (the GRPO benchmark's setting),
the path before ran ``addmm_`` (gate|up) + the SwiGLU forward in the forward, and ``addmm_``
(recomputed gate|up) + ``addmm_`` (``dh``) + the SwiGLU backward in the backward; the fused path
runs one kernel in each. The plain SwiGLU kernels (no LoRA) are timed too: they move the same
activation bytes, so they are the floor the fused kernels aim at. ``--sweep`` times the fused
kernels for a grid of launch configurations (:class:`trainserve.kernels.swiglu_lora.LaunchConfig`)
and checks each against the default's result.
Kernel timings only: the GRPO benchmark measures what a step gains.

    python3 -P scripts/bench_swiglu_lora.py --shape 7b --tokens 6176 --sweep --out swiglu_lora.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from trainserve.kernels.swiglu import swiglu_backward, swiglu_forward_triton
from trainserve.kernels.swiglu_lora import DEFAULT_CONFIG, LaunchConfig, swiglu_lora_backward, swiglu_lora_forward

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python3 -P` does not add it
from bench_fp8_train_gemms import cuda_time_ms  # noqa: E402
from bench_grpo_gpu_launch import host  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main() -> None:
    from trainserve.random_model import QWEN2_SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="7b", choices=sorted(QWEN2_SHAPES))
    ap.add_argument("--tokens", type=int, default=6176, help="rows of one micro-batch (16 × 386 in the GRPO bench)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of each of gate, up, down")
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--sweep", action="store_true", help="time the fused kernels for a grid of launch configurations")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    s = QWEN2_SHAPES[a.shape]
    m, inter, layers, r = a.tokens, s["intermediate_size"], s["num_hidden_layers"], a.rank
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16()

    gu0, xa, dh0 = rnd(m, 2 * inter), rnd(m, 2 * r), rnd(m, inter)
    b = torch.block_diag(rnd(inter, r, scale=0.05), rnd(inter, r, scale=0.05))
    dxa_d, a_d = rnd(m, r), rnd(r, inter, scale=0.05)
    gu, dh = gu0.clone(), dh0.clone()

    def reset() -> None:
        gu.copy_(gu0)
        dh.copy_(dh0)

    def unfused_fwd():
        full = gu.addmm_(xa, b.t())
        return swiglu_forward_triton(full[:, :inter], full[:, inter:])

    def unfused_bwd():
        full = gu.addmm_(xa, b.t())
        d = dh.addmm_(dxa_d, a_d)
        return swiglu_backward(d, full[:, :inter], full[:, inter:], write_h=True, inplace=True)

    ranks = (r, r)

    def fused_fwd(cfg: LaunchConfig = DEFAULT_CONFIG):
        return swiglu_lora_forward(gu, inter, xa, b, ranks=ranks, config=cfg)

    def fused_bwd(cfg: LaunchConfig = DEFAULT_CONFIG):
        return swiglu_lora_backward(dh, gu, inter, xa, b, dxa_d, a_d, write_h=True, ranks=ranks, config=cfg)

    def plain_fwd():
        return swiglu_forward_triton(gu[:, :inter], gu[:, inter:])

    def plain_bwd():
        return swiglu_backward(dh, gu[:, :inter], gu[:, inter:], write_h=True, inplace=True)

    # Agreement (once, on fresh copies): the two paths compute the same thing.
    reset()
    h_u = unfused_fwd().clone()
    reset()
    h_f = fused_fwd().clone()
    reset()
    hu, dgu_u, duu = (t.clone() for t in unfused_bwd())
    reset()
    hf, dgu_f = (t.clone() for t in fused_bwd())
    err = {"h_forward": _rel(h_f, h_u), "h_backward": _rel(hf, hu),
           "dgate": _rel(dgu_f[:, :inter], dgu_u), "dup": _rel(dgu_f[:, inter:], duu)}
    # Both against float64 (the LoRA-completed gate|up, then SwiGLU, all in float64).
    full = torch.addmm(gu0.double(), xa.double(), b.double().t())
    h64 = torch.nn.functional.silu(full[:, :inter]) * full[:, inter:]
    del full
    err_fp64 = {"unfused_h": _rel(h_u, h64), "fused_h": _rel(h_f, h64)}
    del h64
    # Timings: the in-place paths rewrite gu/dh each call; the values stay finite (tiny LoRA terms,
    # SwiGLU gradients of bounded size), and the time of a memory-bound pass does not depend on them.
    ms = {}
    for name, fn in (("unfused_forward", unfused_fwd), ("fused_forward", fused_fwd),
                     ("plain_swiglu_forward", plain_fwd), ("unfused_backward", unfused_bwd),
                     ("fused_backward", fused_bwd), ("plain_swiglu_backward", plain_bwd)):
        reset()
        ms[name] = round(cuda_time_ms(fn, a.reps), 4)
    per_step = layers * a.micro_batches
    step = {k: round(v * per_step, 2) for k, v in ms.items()}
    saved = (step["unfused_forward"] + step["unfused_backward"]) - (step["fused_forward"] + step["fused_backward"])
    sweep = []
    if a.sweep:
        for bm, bn, warps in ((16, 128, 4), (32, 128, 4), (64, 128, 8), (32, 256, 8), (16, 256, 4), (64, 64, 4),
                              (128, 64, 8), (32, 64, 2)):
            cfg = LaunchConfig(bm=bm, bn=bn, warps=warps)
            row = {"bm": bm, "bn": bn, "warps": warps}
            for kind, fn, want in (("forward", fused_fwd, h_f), ("backward", lambda c: fused_bwd(c)[1], dgu_f)):
                reset()
                try:
                    row[f"{kind}_rel_error_vs_default"] = _rel(fn(cfg), want)  # on fresh inputs
                    reset()
                    row[f"{kind}_ms"] = round(cuda_time_ms(lambda fn=fn, cfg=cfg: fn(cfg), a.reps), 4)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
                    row[f"{kind}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            sweep.append(row)
            print(json.dumps(row), flush=True)
    rec = {"what": "LoRA MLP middle: addmm_ + SwiGLU kernels vs SwiGLU kernels with the LoRA terms inside",
           "shape": a.shape, "tokens": m, "intermediate": inter, "rank": r,
           "default_config": DEFAULT_CONFIG.__dict__, "ms_per_call": ms,
           "ms_per_step": step, "step_is": f"{layers} layers x {a.micro_batches} micro-batches, gate|up recomputed",
           "saved_ms_per_step": round(saved, 2), "rel_error_vs_unfused": err,
           "rel_error_vs_fp64": err_fp64, "sweep": sweep,
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "host": host(),
           "command": " ".join(["python3 -P scripts/bench_swiglu_lora.py", *sys.argv[1:]])}
    print(json.dumps(rec))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
