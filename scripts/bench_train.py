#!/usr/bin/env python3
"""QLoRA training throughput and peak memory: HF+peft+bnb vs Unsloth vs trainserve.

One arm per process (``--arm hf|unsloth|trainserve``); ``--all`` runs each arm in its own
subprocess, writes a combined JSON and prints a markdown table. The model is a random-weight
Qwen2 of the real shape (built on the GPU, saved once under ``--model-dir``), LoRA r on all seven
projections, random token batches; tokens/s is the median over the timed steps (each step
synchronised), peak memory is ``torch.cuda.max_memory_allocated`` over the training steps.

``--quant``: ``bnb`` (bitsandbytes NF4, the benchmark setting), ``none`` (bf16 base weights) or
``nf4-ts`` (trainserve arm only: the same NF4 layout packed by trainserve's own quantiser, to
measure the 4-bit path where bitsandbytes is not installed), ``int4-ts`` / ``int8-ts`` (trainserve arm
only: the engine's Marlin-layout integer formats, as the trainer sees them with ``load_in_4bit`` /
``load_in_8bit`` and ``fast_inference=True``, here without an engine).

Examples::

    python scripts/bench_train.py --all --shape 1.5b --out benchmarks/results/qwen2-1.5b.json
    python scripts/bench_train.py --arm trainserve --quant none --shape 0.5b --steps 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from trainserve.random_model import QWEN2_SHAPES as SHAPES

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARMS = ("hf", "unsloth", "trainserve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", choices=ARMS)
    ap.add_argument("--all", action="store_true", help="run every arm of --arms, each in its own process")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--shape", choices=[*sorted(SHAPES), "tiny"], default="1.5b",
                    help="tiny = trainserve's embedded test model (runs on CPU too: a smoke test)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps first (allocator, clocks)")
    ap.add_argument("--quant", choices=("bnb", "none", "nf4-ts", "int4-ts", "int8-ts"), default="bnb")
    ap.add_argument("--no-double-quant", action="store_true", help="bnb without nested absmax")
    ap.add_argument("--gc", default="unsloth",
                    help='checkpointing in the unsloth/trainserve arms: "unsloth", true, false')
    ap.add_argument("--ts-gc", default="unsloth,false",
                    help="--all: checkpointing modes to run the trainserve arm with (comma list)")
    ap.add_argument("--hf-gc", action="store_true",
                    help="gradient checkpointing in the HF arm (off by default)")
    ap.add_argument("--model-dir", default="/tmp/trainserve_bench")
    ap.add_argument("--out", default=None, help="JSON output file")
    ap.add_argument("--profile", action="store_true",
                    help="profile one extra step: GPU-busy fraction and the top kernels")
    ap.add_argument("--cprofile", default=None, help="cProfile two extra steps; write the stats here")
    ap.add_argument("--timeout", type=int, default=900, help="per-arm subprocess timeout (--all)")
    return ap.parse_args(argv)


def gc_value(s: str):
    low = s.lower()
    return "unsloth" if low == "unsloth" else low in ("1", "true", "yes")


def ensure_model(shape: str, root: str) -> Path:
    """Random-weight Qwen2 of the given shape saved as bf16 safetensors (built once, on the GPU)."""
    import torch
    import transformers

    import trainserve

    if shape == "tiny":
        return Path(trainserve.tiny_model())
    path = Path(root) / f"qwen2-{shape}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "config.json").exists() and any(path.glob("*.safetensors")):
            return path
        cfg = transformers.Qwen2Config(
            **SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
            hidden_act="silu", use_sliding_window=False, bos_token_id=0, eos_token_id=2, pad_token_id=0,
        )
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        tmp = Path(str(path) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tiny = Path(trainserve.tiny_model())  # a tokenizer, for loaders that insist on one
        for f in tiny.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, tmp / f.name)
        del model
        torch.cuda.empty_cache()
        tmp.rename(path)
    return path


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype():
    import torch

    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bnb_config(args: argparse.Namespace):
    import torch
    import transformers

    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=not args.no_double_quant,
    )


def lora_config(args: argparse.Namespace):
    from peft import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, bias="none",
                      target_modules=TARGETS, task_type="CAUSAL_LM")


def load_hf(args: argparse.Namespace, path: Path):
    import transformers
    from peft import get_peft_model, prepare_model_for_kbit_training

    if args.quant.endswith("-ts"):
        raise SystemExit(f"--quant {args.quant} is for the trainserve arm only")
    kw = {"quantization_config": bnb_config(args)} if args.quant == "bnb" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype(), device_map={"": device()}, attn_implementation="sdpa", **kw
    )
    if args.quant == "bnb":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.hf_gc)
    elif args.hf_gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return get_peft_model(model, lora_config(args))


def load_unsloth(args: argparse.Namespace, path: Path):
    import torch
    from unsloth import FastLanguageModel  # must come before transformers' import in this process

    if args.quant != "bnb":
        raise SystemExit("the unsloth arm runs with --quant bnb only")
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(path), max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=True,
    )
    return FastLanguageModel.get_peft_model(
        model, r=args.rank, lora_alpha=args.rank, lora_dropout=0, bias="none", target_modules=TARGETS,
        use_gradient_checkpointing=gc_value(args.gc), random_state=3407, max_seq_length=args.seq,
    )


def load_trainserve(args: argparse.Namespace, path: Path):
    import torch
    import transformers
    from peft import get_peft_model
    from trainserve.kernels.nf4 import quantize_linear_nf4_

    from trainserve.models import get_fast_model_class

    kw = {"quantization_config": bnb_config(args)} if args.quant == "bnb" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype(), device_map={"": device()}, **kw
    )
    if args.quant == "nf4-ts":
        for name, mod in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                quantize_linear_nf4_(mod, 64, compress_statistics=not args.no_double_quant)
        torch.cuda.empty_cache()
    if args.quant in ("int4-ts", "int8-ts"):
        _pack_marlin(model, args.quant)
    model.config.use_cache = False
    get_fast_model_class("qwen2").patch_model(model, use_gradient_checkpointing=gc_value(args.gc))
    return get_peft_model(model, lora_config(args))


def _pack_marlin(model, quant: str) -> None:
    """Replace every target projection by trainserve's packed view of its Marlin-quantised weight."""
    import torch
    from trainserve.kernels.marlin_dequant import MarlinQuantState
    from trainserve.kernels.marlin_layout import IntFormat, quantize_to_marlin

    from trainserve.weights.packed_linear import PackedLinear

    fmt = IntFormat(4, 64, True) if quant == "int4-ts" else IntFormat(8, 128, False)
    for name, mod in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        n, k = mod.weight.shape
        t = quantize_to_marlin(mod.weight.data, fmt, mod.weight.dtype)
        state = MarlinQuantState(t, fmt, 0, n, k, mod.weight.dtype)
        bias = None if mod.bias is None else mod.bias.data
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, PackedLinear(state, t.qweight, bias))
    torch.cuda.empty_cache()


def run_arm(args: argparse.Namespace) -> dict:
    if args.arm == "unsloth":
        import unsloth  # noqa: F401  (patches transformers on import: first)
    import torch

    path = ensure_model(args.shape, args.model_dir)
    loader = {"hf": load_hf, "unsloth": load_unsloth, "trainserve": load_trainserve}[args.arm]
    cuda = torch.cuda.is_available()
    mem = torch.cuda.max_memory_allocated if cuda else (lambda: 0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = loader(args, path)
    model.train()
    load_peak = mem()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    vocab = model.config.vocab_size
    g = torch.Generator(device=device()).manual_seed(1234)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), device=device(), generator=g)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt_s = time.perf_counter() - t0
        losses.append(float(out.loss.detach()))
        if step >= args.warmup:
            times.append(dt_s)
    prof = profile_step(model, opt, args, vocab, g) if (args.profile and cuda) else None
    if args.cprofile:
        cprofile_steps(model, opt, args, vocab, g)
    tokens = args.batch * args.seq
    tps = [tokens / t for t in times]
    return {
        "arm": args.arm, "shape": args.shape, "seq": args.seq, "batch": args.batch, "rank": args.rank,
        "quant": args.quant, "double_quant": not args.no_double_quant,
        "gradient_checkpointing": (args.hf_gc if args.arm == "hf" else gc_value(args.gc)),
        "tokens_per_s": statistics.median(tps), "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
        "step_s": times, "peak_gb": mem() / 1e9, "peak_gib": mem() / 2**30,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else 0.0,
        "load_peak_gb": load_peak / 1e9, "trainable_params": sum(p.numel() for p in params),
        "loss_first": losses[0], "loss_last": losses[-1], **environment(), "command": command_line(),
        **({"profile": prof} if prof else {}),
    }


def cprofile_steps(model, opt, args: argparse.Namespace, vocab: int, g) -> None:
    """Python-level profile of two steps (where the host time goes), printed and saved."""
    import cProfile
    import io
    import pstats

    import torch

    dev = device()
    prof = cProfile.Profile()
    for _ in range(2):
        ids = torch.randint(0, vocab, (args.batch, args.seq), device=dev, generator=g)
        prof.enable()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        prof.disable()
    prof.dump_stats(args.cprofile)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(28)
    print("\n".join(line[:150] for line in buf.getvalue().splitlines()[6:40]))


def profile_step(model, opt, args: argparse.Namespace, vocab: int, g) -> dict:
    """One step under torch.profiler: wall time, summed GPU kernel time, top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, vocab, (args.batch, args.seq), device="cuda", generator=g)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kern = [e for e in p.key_averages() if str(e.device_type).endswith("CUDA")]
    kern.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in kern) / 1e6
    launches = sum(e.count for e in kern)
    top = [{"name": e.key[:90], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in kern[:15]]
    print(f"profile: wall {wall * 1e3:.1f} ms (profiled), GPU kernels {total * 1e3:.1f} ms "
          f"({100 * total / wall:.0f}% busy), {launches} kernel launches")
    for t in top:
        print(f"  {t['ms']:8.2f} ms {t['calls']:6d}x  {t['name']}")
    return {"wall_ms": wall * 1e3, "gpu_kernel_ms": total * 1e3, "launches": launches, "top": top}


def environment() -> dict:
    import importlib.metadata as md

    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    env = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    for pkg in ("transformers", "peft", "bitsandbytes", "unsloth", "triton"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])


def table(rows: list[dict]) -> str:
    lines = ["| arm | quant | gc | tokens/s (median) | min-max | peak GB | loss first->last |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            last = (r["error"].strip().splitlines() or ["?"])[-1].replace("|", "/")[:100]
            lines.append(f"| {r['arm']} | {r.get('quant', '')} | | failed: {last} | | | |")
            continue
        lines.append(
            f"| {r['arm']} | {r['quant']} | {r['gradient_checkpointing']} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f} | {r['peak_gb']:.2f} | "
            f"{r['loss_first']:.3f}->{r['loss_last']:.3f} |"
        )
    return "\n".join(lines)


def arm_command(args: argparse.Namespace, arm: str, out: Path, gc: str | None = None) -> list[str]:
    """The command line of one arm's own process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--shape", args.shape,
           "--seq", str(args.seq), "--batch", str(args.batch), "--rank", str(args.rank),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--quant", args.quant,
           "--gc", gc or args.gc, "--model-dir", args.model_dir, "--out", str(out)]
    if args.no_double_quant:
        cmd.append("--no-double-quant")
    if args.hf_gc:
        cmd.append("--hf-gc")
    return cmd


def run_all(args: argparse.Namespace) -> dict:
    rows = []
    prep = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
         f"import bench_train as b; b.ensure_model({args.shape!r}, {args.model_dir!r})"],
        timeout=args.timeout,
    )
    if prep.returncode:
        raise SystemExit("could not build the benchmark model")
    runs = []
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        if arm == "trainserve":
            runs += [(arm, gc.strip()) for gc in args.ts_gc.split(",") if gc.strip()]
        else:
            runs.append((arm, None))
    for arm, gc in runs:
        out = Path(args.model_dir) / f"result-{arm}-{gc or args.gc}-{os.getpid()}.json"
        cmd = arm_command(args, arm, out, gc)
        print("running:", " ".join(shlex.quote(c) for c in cmd), flush=True)
        try:
            proc = subprocess.run(cmd, timeout=args.timeout, capture_output=True, text=True)
            sys.stderr.write(proc.stderr[-4000:])
            if proc.returncode == 0 and out.exists():
                rows.append(json.loads(out.read_text()))
            else:
                rows.append({"arm": arm, "quant": args.quant, "error": (proc.stderr or proc.stdout)[-2000:]})
        except subprocess.TimeoutExpired:
            rows.append({"arm": arm, "quant": args.quant, "error": f"timeout after {args.timeout}s"})
    return {"runs": rows, "table": table(rows), "command": command_line(), **environment()}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.all:
        result = run_all(args)
        print(result["table"])
    elif args.arm:
        result = run_arm(args)
        print(table([result]))
    else:
        raise SystemExit("give --arm ARM or --all")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
