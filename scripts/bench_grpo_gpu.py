#!/usr/bin/env python3
"""GRPO on the GPU (issue 11): trainserve's colocated engine in five weight formats vs TRL's
colocate mode vs Unsloth, each arm in its own process, on one random-weight Qwen2 shape.

Arms (``--arms``): ``trainserve_int4`` (the default 4-bit path), ``trainserve_bnb`` (4-bit through
bitsandbytes), ``trainserve_fp8``, ``trainserve_int8``, ``trainserve_bf16`` — all
``FastLanguageModel.from_pretrained(fast_inference=True)`` + ``trainserve.GRPOTrainer`` —,
``trl_colocate`` (``trl.GRPOTrainer(use_vllm=True, vllm_mode="colocate")``, bf16 model, peft
LoRA) and ``unsloth`` (``FastLanguageModel(load_in_4bit=True, fast_inference=True)`` + TRL's
GRPOTrainer as Unsloth patches it). Same model, plain-text prompts (~128 tokens), reward, LoRA
(r=16, alpha=32, 7 modules), 8 prompts x 8 generations per optimizer step, 256-token completions,
lr 5e-6, seed, ``gpu_memory_utilization`` and max model length for every engine.

Per arm: start-up (process start → trainer constructed), steps/min after ``--warmup`` (overall
and from the median step), rollout tok/s and ms/step (time in the generation hook, sync included),
train ms/step (step − rollout), device memory sampled every 20 ms by NVML (peak over the measured
steps, per step and over the whole run; ``torch.cuda.max_memory_allocated`` for reference),
mean completion length, first/last reward. A failing arm records its exact error; the others run.
Results are merged into ``benchmarks/results/grpo_<gpu>_<shape>_<date>.json`` (arms run in
separate invocations accumulate there) and a table of every arm in it is printed.

One arm per device call (each must finish within 10 minutes), after ``source /root/gpu-env.sh``::

    python3 -P scripts/bench_grpo_gpu.py --prepare-only --shape 7b          # build the checkpoint once
    python3 -P scripts/bench_grpo_gpu.py --arms trainserve_int4 --shape 1.5b
    python3 -P scripts/bench_grpo_gpu.py --arms trl_colocate --shape 1.5b    # ... one call per arm
    python3 -P scripts/bench_grpo_gpu.py --table benchmarks/results/grpo_h200_1.5b_<date>.json

Several GPUs (issue 13, data parallel): ``--nproc N`` starts each arm under ``torchrun --standalone
--nproc_per_node N``, one rank per GPU, each with the 1-GPU run's batch (8 prompts x 8 generations per
rank and step: the global batch is N x 64); recorded as ``<arm>@<N>gpu`` beside the 1-GPU run of the
same arm, with its steps/min per GPU and the per-GPU scaling (``bench_grpo_gpu_launch.py``)::

    python3 -P scripts/bench_grpo_gpu.py --shape 7b --arms trainserve_int4 --nproc 2 \\
        --gpu-memory-utilization 0.1 --micro-batch 16                                     # 2 GPUs
    python3 -P scripts/bench_grpo_gpu.py --shape 7b --arms trainserve_int4 \\
        --gpu-memory-utilization 0.1 --micro-batch 16                                     # 1 GPU, same file

CPU smoke test (tiny model, no NVML): ``--shape tiny --arms trainserve_bf16 --steps 2 --warmup 1
--completion-length 8 --prompt-length 16`` (with ``--nproc 2``: two gloo ranks, if torch has gloo).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent))  # the helper modules; `python3 -P` does not add it

import bench_grpo_gpu_launch as launch  # noqa: E402
from bench_grpo_gpu_arms import ARMS  # noqa: E402  (stdlib-only imports: no torch here)
from bench_grpo_gpu_launch import versions  # noqa: E402
from bench_grpo_gpu_memory import device_name, visible_gpu_count, wall  # noqa: E402
from bench_grpo_gpu_report import load, merge, slug, summarise, table  # noqa: E402

SHAPES = ("0.5b", "1.5b", "7b", "tiny")
PY = [sys.executable, *(["-P"] if sys.flags.safe_path else [])]
NOTES = [
    "steps/min: optimizer steps (8 prompts x 8 generations each) after the warm-up steps; 'median step' is "
    "60 / the median step time, 'overall' is measured steps / their total time.",
    "rollout: time inside TRL's generation hook _generate_single_turn (trainserve: adapter copy + engine; TRL: "
    "merge + weight load into its vLLM + generate; Unsloth: its vLLM with the shared weights); tok/s = "
    "completion tokens / that time. train ms = step time - rollout time (logprob forwards, loss, backward, "
    "optimizer, rewards).",
    "memory: NVML device 'used' sampled every --mem-interval-ms by a thread, peak over the measured steps and "
    "over the whole run (start-up included); mem_baseline_gib is the device use before the arm started. torch's "
    "max_memory_allocated (reset after warm-up) misses vLLM's own allocations.",
    "start-up: from the arm's process start (python launch, imports) until its trainer is constructed: "
    "includes vLLM's torch.compile and CUDA-graph capture unless its caches were warm "
    "(vllm_compile_cache_entries_at_start: 0 = cold).",
    "gradient checkpointing: each framework's own recommended mode ('unsloth' = offloaded, for trainserve and "
    "Unsloth; True for TRL).",
    "vllm_importance_sampling_correction is off for every arm by default (--is-correction off), so each step does "
    "the same work: trainserve cannot apply it (it leaves use_vllm off), Unsloth's GRPOConfig defaults it off, "
    "TRL's defaults it on, which costs one more logprob forward per step (--is-correction default measures that). "
    "The resolved GRPOConfig fields of each arm are in its trainer_args.",
    "*_overlap arms (--overlap): the same trainserve arm with GRPOTrainer(overlap=True), one-step-off: the engine "
    "generates the next batch on its own thread and CUDA stream while this one trains; TRL's IS correction is on "
    "(token_truncate) for them. Their rollout time is what the trainer waited in the generation hook (its batch "
    "plus submitting the next); the engine's own generation time per batch is logged as rollout/seconds.",
    "<arm>@<N>gpu (--nproc N): the arm under torchrun, one rank per GPU, each rank generating and training the "
    "1-GPU step's 8 prompts x 8 generations (global batch N x 64, DDP-averaged LoRA gradients); times are rank "
    "0's; memory is every GPU's (the maximum, then each GPU's). steps/min per GPU = per-GPU completions per "
    "minute / 64 (= steps/min for these runs); per-GPU scaling = that / the same arm's 1-GPU steps/min.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=[a for a in ARMS if not ARMS[a].get("overlap")],
                    help=f"any of {', '.join(ARMS)}")
    ap.add_argument("--overlap", action="store_true",
                    help="run each trainserve arm of --arms as its one-step-off variant <arm>_overlap "
                         "(GRPOTrainer(overlap=True); recorded under that name)")
    ap.add_argument("--shape", choices=SHAPES, default="1.5b", help="tiny = trainserve.tiny_model() (CPU smoke)")
    ap.add_argument("--model-dir", help="random-weight checkpoint (default /tmp/bench_models/<shape>)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps in all, warm-up included")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the rates")
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--completion-length", type=int, default=256)
    ap.add_argument("--prompt-length", type=int, default=128, help="prompt tokens (about)")
    ap.add_argument("--max-seq-length", type=int, default=512, help="every engine's max model length")
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="per_device_train_batch_size (0: the whole step's 64 completions, no accumulation)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--ts-checkpointing", choices=("default", "unsloth", "true", "false"), default="default",
                    help="trainserve arms' use_gradient_checkpointing (default: 'unsloth', its recommended mode)")
    ap.add_argument("--learning-rate", type=float, default=5e-6)
    ap.add_argument("--is-correction", choices=("default", "off"), default="off",
                    help="vllm_importance_sampling_correction: off for every arm (equal work per step), or each "
                         "framework's default (TRL: on, one more logprob forward per step; Unsloth: off)")
    ap.add_argument("--profile-step", type=int, default=0,
                    help="profile the training part of this optimizer step (torch.profiler; its time is "
                         "inflated, so leave it out of the measured steps: e.g. a warm-up step)")
    ap.add_argument("--mem-interval-ms", type=float, default=20.0)
    ap.add_argument("--ts-load-kwargs", type=json.loads, default={},
                    help='extra from_pretrained kwargs for the trainserve arms, JSON (e.g. \'{"standby": false}\')')
    ap.add_argument("--out", default="benchmarks/results", help="results directory")
    ap.add_argument("--results-file", help="results JSON to merge into (default: grpo_<gpu>_<shape>_<date>.json)")
    ap.add_argument("--copy-to", default=os.environ.get("OUT"),
                    help="also copy the results JSON and arm logs here (default: $OUT when set)")
    ap.add_argument("--nproc", type=int, default=1,
                    help="processes (GPUs) per arm: N > 1 runs each arm under torchrun --standalone "
                         "--nproc_per_node N, the 1-GPU batch on each rank; recorded as <arm>@<N>gpu")
    ap.add_argument("--dist-timeout", type=float, default=300,
                    help="--nproc > 1: seconds a collective waits for a silent rank before the job fails")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per arm")
    ap.add_argument("--budget-s", type=float, default=570,
                    help="seconds for this whole invocation: an arm is stopped in time to still write the JSON")
    ap.add_argument("--prepare-only", action="store_true", help="build the checkpoint and exit")
    ap.add_argument("--table", metavar="JSON", help="print the table of an existing results file and exit")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="merge the runs of these results files into --results-file (no GPU needed) and exit")
    ap.add_argument("--worker", choices=list(ARMS), help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.arms = [a for item in args.arms for a in item.split(",") if a]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    if args.overlap:
        args.arms = [f"{a}_overlap" if f"{a}_overlap" in ARMS else a for a in args.arms]
    if not 0 <= args.warmup < args.steps:
        ap.error("--warmup must be >= 0 and less than --steps")
    if args.nproc < 1:
        ap.error(f"--nproc {args.nproc}: must be at least 1")
    if args.dist_timeout <= 0:
        ap.error("--dist-timeout must be positive")
    return args


def say(msg: str) -> None:
    print(f"[bench {wall()}] {msg}", flush=True)


def _complete(path: Path) -> bool:
    return (path / "config.json").exists() and (path / "tokenizer.json").exists() and any(path.glob("*.safetensors"))


def prepare_model(shape: str, model_dir: str | None, timeout: float) -> str:
    """The checkpoint's path, built once (in a child process: trainserve's import sets vLLM
    environment defaults that must not leak into the TRL and Unsloth arms)."""
    if shape == "tiny":
        code = "from trainserve import tiny_model; print(tiny_model())"
        out = subprocess.run([*PY, "-c", code], capture_output=True, text=True, timeout=timeout)
        if out.returncode:
            raise SystemExit(f"could not build the tiny model:\n{out.stderr[-3000:]}")
        return out.stdout.strip().splitlines()[-1]
    final = Path(model_dir or f"/tmp/bench_models/{shape}")
    if _complete(final):
        say(f"model: reusing {final}")
        return str(final)
    if model_dir and final.exists() and any(final.iterdir()):
        raise SystemExit(f"--model-dir {final} exists but holds no complete checkpoint "
                         "(config.json, tokenizer.json, *.safetensors); give an empty or new directory")
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"model: writing a random-weight Qwen2-{shape} to {final} (trainserve/random_model.py)")
    t = time.time()
    code = (f"import sys; sys.path.append({str(Path(__file__).resolve().parent)!r}); import bench_grpo_gpu as b; "
            "print(b.build_checkpoint(sys.argv[1], sys.argv[2]))")
    out = subprocess.run([*PY, "-c", code, shape, str(tmp)], capture_output=True, text=True, timeout=timeout)
    say(f"model: {out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]}")
    if out.returncode or not _complete(tmp):
        raise SystemExit(f"could not build the {shape} model:\n{out.stderr[-3000:]}")
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    say(f"model: written in {time.time() - t:.0f} s")
    return str(final)


def build_checkpoint(shape: str, path: str, device: str | None = None) -> str:
    """(In the preparing child process.) trainserve's ``random_qwen2``, with its ``torch.randn`` calls
    drawn on ``device`` (CUDA when present): the CPU's normal generator is serial and takes minutes
    for the 7B shape. Values differ from a CPU-built checkpoint; speed does not depend on them. Any
    failure falls back to the plain CPU build."""
    import torch

    from trainserve.random_model import random_qwen2

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return f"{random_qwen2(shape, path)} (CPU init)"
    plain = torch.randn
    gen: list[Any] = []

    def randn(*size: Any, generator: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("device", None)
        return plain(*size, generator=gen[0], device=device, **kwargs).cpu()

    try:
        gen.append(torch.Generator(device=device).manual_seed(0))
        torch.randn = randn
        return f"{random_qwen2(shape, path)} ({device} init)"
    except Exception as exc:
        print(f"init on {device} failed ({type(exc).__name__}: {exc}); building on the CPU", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)
    finally:
        torch.randn = plain
    return f"{random_qwen2(shape, path)} (CPU init after a failed {device} init)"


def run_arm(arm: str, settings: dict[str, Any], timeout: float, work: Path, command: str,
            nproc: int = 1, name: str | None = None, gpus: int = 0) -> dict[str, Any]:
    """Run one arm in its own process group (under torchrun with ``nproc`` > 1, recorded as ``name``;
    one process on a host with ``gpus`` > 1 sees only the first GPU);
    its output goes to ``work/<name>.log`` (progress lines are echoed); returns its result, partial if
    it was stopped at ``timeout``."""
    name = name or arm
    stem = launch.file_stem(name)
    result_path, log_path = work / f"{stem}.result.json", work / f"{stem}.log"
    result_path.unlink(missing_ok=True)
    launch.clear_pid_files(work, stem)
    settings_path = work / f"{stem}.settings.json"
    settings_path.write_text(json.dumps(settings))
    t0 = time.time()
    cmd = launch.worker_command(PY, str(Path(__file__).resolve()), ["--worker", arm, "--settings", str(settings_path),
                                "--result", str(result_path), "--t0", repr(t0)], nproc)
    env = launch.launch_env(nproc, settings.get("dist_timeout", 300), bool(sys.flags.safe_path), gpus=gpus)
    say(f"{name}: starting (timeout {timeout:.0f} s, log {log_path})")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True, env=env)

        def pump() -> None:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if line.startswith("[bench"):
                    print(line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            say(f"{name}: stopping it after {timeout:.0f} s")
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(proc, signal.SIGKILL)  # leftovers of the arm's process group (compile workers, ...)
        if nproc > 1:
            launch.kill_ranks(work, stem)  # torchrun's ranks each have their own session
        proc.wait()
        reader.join(timeout=5)
    res: dict[str, Any] = {"arm": arm, "ok": False}
    if result_path.exists():
        try:
            res = json.loads(result_path.read_text())
        except json.JSONDecodeError as exc:
            res["error"] = f"unreadable result file: {exc}"
    if timed_out:
        res.update(ok=False, error=f"timed out after {timeout:.0f} s (at step {len(res.get('steps', []))}); "
                   + (res.get("error") or ""))
        try:
            res.update(summarise(res, settings))  # the measured steps it did finish still count
        except Exception as exc:
            res["summary_error"] = repr(exc)
    elif not res.get("ok") and "error" not in res:
        res["error"] = f"worker exited with {proc.returncode} and no result"
    text = log_path.read_text(errors="replace")
    tail = text.splitlines()[-60:]
    if nproc > 1:
        res.update(arm=name, arm_base=arm)
        if not res.get("ok") and (cause := launch.root_cause(text)):
            res["error"] = f"{res.get('error')} | {cause}"
    if not res.get("ok"):
        res["log_tail"] = "\n".join(tail)
        print(f"---- last lines of {log_path} ----\n" + "\n".join(tail[-40:]), flush=True)
    res.update(nproc=nproc, exit_code=proc.returncode, arm_wall_s=round(time.time() - t0, 1), command=command,
               finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), log_file=str(log_path))
    return res


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group of the arm process this script started (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        from bench_grpo_gpu_arms import run

        rc = run(args.worker, json.loads(Path(args.settings).read_text()), args.result, args.t0)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)  # skip interpreter shutdown: an in-process vLLM engine can hang it
    if args.table:
        print(table(load(Path(args.table))))
        return 0
    if args.merge:
        if not args.results_file:
            raise SystemExit("--merge needs --results-file (the file to merge into)")
        for src in args.merge:
            data = load(Path(src))
            header = {k: data[k] for k in ("date", "device", "shape", "model_path", "settings", "versions", "notes",
                                           "invocations") if k in data}
            merged = merge(Path(args.results_file), header, data.get("runs", []))
        print(merged["table"])
        return 0
    start = time.time()
    command = shlex.join([os.path.basename(sys.executable), *PY[1:], *(sys.argv if argv is None else
                                                                       [sys.argv[0], *argv])])
    say(f"command: {command}")
    gpus = visible_gpu_count()  # NVML: no CUDA context in this process
    if args.nproc > 1 and not args.prepare_only and (why := launch.check_nproc(args.nproc, args.shape, gpus)):
        raise SystemExit(f"refused before starting anything: {why}")
    model_path = prepare_model(args.shape, args.model_dir, timeout=max(args.budget_s - 60, 60))
    if args.prepare_only:
        print(model_path)
        return 0
    settings = {"model_path": model_path, "shape": args.shape, "steps": args.steps, "warmup": args.warmup,
                "prompts_per_step": args.prompts_per_step, "generations": args.generations,
                "completion_length": args.completion_length, "prompt_length": args.prompt_length,
                "max_seq_length": args.max_seq_length, "micro_batch": args.micro_batch,
                "gpu_memory_utilization": args.gpu_memory_utilization, "learning_rate": args.learning_rate,
                "temperature": 1.0, "seed": 0, "lora_rank": 16, "lora_alpha": 32, "dataset_size": 512,
                "is_correction": args.is_correction, "mem_interval_ms": args.mem_interval_ms,
                "ts_load_kwargs": args.ts_load_kwargs, "ts_checkpointing": args.ts_checkpointing}
    if args.profile_step:
        settings["profile_step"] = args.profile_step
    if args.nproc > 1:  # (1 process: the settings stay as they were)
        settings.update(nproc=args.nproc, dist_timeout=args.dist_timeout)
    names = [launch.run_name(arm, args.nproc, gpus) for arm in args.arms]
    work = Path("/tmp/bench_grpo_gpu")
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, (arm, name) in enumerate(zip(args.arms, names, strict=True)):
        left = args.budget_s - (time.time() - start) - 20  # keep time to write the results
        if left < 30:
            runs.append({"arm": name, "nproc": args.nproc, "ok": False,
                         "error": f"not run: --budget-s {args.budget_s:.0f} s spent",
                         "command": command, "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
            continue
        runs.append(run_arm(arm, settings, min(args.timeout, left / (len(args.arms) - i)), work, command,
                            args.nproc, name, gpus))
        say(f"{name}: {'ok' if runs[-1].get('ok') else 'FAILED'} in {runs[-1].get('arm_wall_s')} s")
    device = device_name() or next((r["device"] for r in runs if r.get("device")), "cpu")
    date = dt.datetime.now(dt.UTC).date().isoformat()
    out_dir = Path(args.out) if Path(args.out).is_absolute() else Path(__file__).resolve().parent.parent / args.out
    path = Path(args.results_file or out_dir / f"grpo_{slug(device)}_{args.shape}_{date}.json")
    header = {"date": date, "device": device, "shape": args.shape, "model_path": model_path,
              "settings": {k: v for k, v in settings.items() if k != "model_path"}, "versions": versions(),
              "notes": NOTES, "invocation": {"command": command, "started_at": dt.datetime.fromtimestamp(
                  start, dt.UTC).isoformat(timespec="seconds"), "arms": names}}
    report = merge(path, header, runs)
    say(f"results: {path}")
    if args.copy_to:
        dest = Path(args.copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        if (dest / path.name).resolve() != path.resolve():
            shutil.copy(path, dest / path.name)
        for stem in map(launch.file_stem, names):
            if (work / f"{stem}.log").exists():
                shutil.copy(work / f"{stem}.log", dest / f"{path.stem}_{stem}.log")
        say(f"copied the results and logs to {dest}")
    print(f"\n{report['table']}", flush=True)
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
