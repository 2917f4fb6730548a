"""Data parallel under an existing launcher (``torchrun``, ``accelerate launch``): one engine per rank.

Each rank is one process with its own trainer and its own colocated vLLM engine over that rank's
copy of the base weights (the trainer's parameters are views of *this rank's* engine tensors, as
on one device). Only LoRA gradients cross ranks: the transformers/TRL ``Trainer`` wraps the model in
DDP under the launcher, which averages them, so every rank applies the same optimizer step and its
live adapter — and so the adapter its engine serves — stays identical to the others'.

Why the process group is started here, before the engine: a single-process vLLM engine otherwise
creates its *own* one-process ``torch.distributed`` world (the default group, of which a process
has one), and the trainer would then never see the launcher's world. So when the launcher's
variables say ``WORLD_SIZE > 1``, :func:`init_launcher_world` joins the launcher's world first
(gloo on CPU, NCCL on CUDA, with a timeout), and the engine is started with vLLM's
``distributed_executor_backend="external_launcher"`` (:func:`engine_kwargs`), the mode TRL's colocate
generation uses: vLLM then builds its groups inside that world — a tensor-parallel group of size 1
per rank — and needs no port of its own. vLLM's engine shutdown destroys the default process group,
so :func:`trainserve.shutdown_engine` under a launcher ends this process's part in the job.

Tensor parallelism (``tensor_parallel_size > 1``) is not implemented: the value is checked (it must
divide the world size and the head counts) and then refused by name, before anything loads.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# How long a collective waits for a rank that stopped answering before the job fails (seconds).
# Defaults to transformers' ``ddp_timeout``; override with TRAINSERVE_DIST_TIMEOUT.
DEFAULT_TIMEOUT_S = 1800
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LauncherError(RuntimeError):
    """The launcher's environment cannot run data-parallel training (named variable and value)."""


@dataclass(frozen=True)
class LauncherWorld:
    """This process's place in a launcher's job (from ``torchrun``'s environment variables)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes metrics, plots, checkpoints and summaries."""
        return self.rank == 0


def _int_var(name: str, env: Mapping[str, str]) -> int:
    value = env.get(name)
    if value is None:
        raise LauncherError(
            f"{name} is not set although WORLD_SIZE={env.get('WORLD_SIZE')} says this process is one of several; "
            f"start the job with torchrun or accelerate launch, which set {', '.join(_LAUNCHER_VARS)}")
    try:
        return int(value)
    except ValueError:
        raise LauncherError(f"{name}={value!r} is not an integer") from None


def launcher_world(env: Mapping[str, str] | None = None) -> LauncherWorld | None:
    """The launcher's world when this process is one of several (``WORLD_SIZE > 1``), else ``None``.

    Raises :class:`LauncherError` naming the variable when the launcher left out ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` or ``MASTER_PORT``, or set an inconsistent value.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None
    world_size = _int_var("WORLD_SIZE", env)
    if world_size < 1:
        raise LauncherError(f"WORLD_SIZE={world_size} must be at least 1")
    if world_size == 1:
        return None
    rank, local_rank = _int_var("RANK", env), _int_var("LOCAL_RANK", env)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise LauncherError(f"{name} is not set; start the job with torchrun or accelerate launch")
    local_world_size = _int_var("LOCAL_WORLD_SIZE", env) if "LOCAL_WORLD_SIZE" in env else world_size
    if not 0 <= rank < world_size:
        raise LauncherError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if local_rank < 0:
        raise LauncherError(f"LOCAL_RANK={local_rank} must not be negative")
    return LauncherWorld(rank, world_size, local_rank, max(local_world_size, local_rank + 1))


def check_one_device_per_process() -> None:
    """Refuse several visible GPUs in one process outside a launcher, before a model loads.

    trainserve's model lives on one device (its engine's), and transformers' ``Trainer`` would wrap
    it in ``nn.DataParallel`` when it sees more than one GPU, which TRL's ``GRPOTrainer`` refuses —
    but only once it is built, after the model and its engine have loaded (minutes at 7B)."""
    if launcher_world() is not None:
        return
    import torch

    if torch.cuda.is_available() and (n := torch.cuda.device_count()) > 1:
        raise LauncherError(
            f"{n} GPUs are visible to this one process (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); the trainer would wrap the model in "
            "nn.DataParallel, which TRL's GRPOTrainer refuses. Train on one GPU with CUDA_VISIBLE_DEVICES=0, "
            f"or on all of them with one process each: torchrun --nproc_per_node {n} ...")


def is_main_process() -> bool:
    """True on rank 0 of a launcher's job and in a single process."""
    world = launcher_world()
    return world is None or world.is_main


def check_parallel_config(tensor_parallel_size: Any, config: Any = None,
                          world: LauncherWorld | None = None, cuda: bool | None = None) -> None:
    """Refuse, before any engine starts, a layout this machine or model cannot run.

    ``tensor_parallel_size`` (vLLM's and TRL's name) must be a positive integer dividing the world
    size and the model's attention and key/value head counts; values above 1 are then refused
    (tensor parallelism is not implemented). On CUDA each rank of a host needs its own GPU.
    """
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
    world_size = world.world_size if world is not None else 1
    if world_size % tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} does not divide the world size "
                         f"{world_size} (WORLD_SIZE; data-parallel groups are world size / tensor_parallel_size)")
    if config is not None:
        for name in ("num_attention_heads", "num_key_value_heads"):
            heads = getattr(config, name, None)
            if heads is not None and heads % tensor_parallel_size:
                raise ValueError(f"tensor_parallel_size={tensor_parallel_size} does not divide the model's "
                                 f"{name}={heads}")
    if tensor_parallel_size > 1:
        raise NotImplementedError(
            f"tensor_parallel_size={tensor_parallel_size}: tensor parallelism is not implemented in trainserve yet; "
            "use tensor_parallel_size=1 (data parallel: one engine per rank under torchrun)")
    if world is not None:
        import torch

        cuda = torch.cuda.is_available() if cuda is None else cuda
        if cuda and torch.cuda.device_count() < world.local_world_size:
            raise LauncherError(
                f"LOCAL_WORLD_SIZE={world.local_world_size} ranks on this host but only "
                f"{torch.cuda.device_count()} visible GPU(s) (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); each rank needs its own GPU: lower "
                "--nproc_per_node")


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("TRAINSERVE_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise LauncherError(f"TRAINSERVE_DIST_TIMEOUT={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise LauncherError(f"TRAINSERVE_DIST_TIMEOUT={raw!r} must be positive")
    return datetime.timedelta(seconds=seconds)


def init_launcher_world() -> LauncherWorld | None:
    """Join the launcher's process group (if any) before the engine starts; return the world.

    Idempotent. gloo on CPU, NCCL on CUDA (after selecting ``cuda:LOCAL_RANK``), with the
    ``TRAINSERVE_DIST_TIMEOUT`` timeout so a rank that stops answering fails the job instead of
    hanging it. A group someone else started (accelerate, a script) is used as it is, if its
    size matches ``WORLD_SIZE``.
    """
    world = launcher_world()
    if world is None:
        return None
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != world.world_size:
            raise LauncherError(
                f"torch.distributed is already initialised with world size {dist.get_world_size()}, not "
                f"WORLD_SIZE={world.world_size}: an engine started before the launcher's group (a "
                "single-process vLLM makes its own) — load the model after torchrun starts the process")
        return world
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(world.local_rank)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # tear down the process on a failed collective
    dist.init_process_group("nccl" if cuda else "gloo", timeout=_timeout(), rank=world.rank,
                            world_size=world.world_size)
    return world


@contextlib.contextmanager
def keep_launcher_env() -> Iterator[None]:
    """Restore the launcher's variables after vLLM's start-up (vLLM's CPU platform sets
    ``LOCAL_WORLD_SIZE`` to its tensor-parallel size, 1, which accelerate then reads)."""
    saved = {name: os.environ.get(name) for name in (*_LAUNCHER_VARS, "LOCAL_WORLD_SIZE")}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is not None:
                os.environ[name] = value


def engine_kwargs() -> dict[str, Any]:
    """Extra ``vllm.LLM`` arguments for this process: the external launcher under a launcher's job."""
    if init_launcher_world() is None:
        return {}
    return {"distributed_executor_backend": "external_launcher"}


def prepare_trainer_args(args: Any) -> None:
    """Check (and complete) training arguments for a launcher's job, before the trainer is built.

    Refused: arguments that would train each rank alone. accelerate (and so transformers'
    ``TrainingArguments``) runs multi-process training on CPU only with ``use_cpu=True``; otherwise
    every rank sees a world of one, trains on its own and its adapter drifts from the others'.

    Set: ``ddp_find_unused_parameters=False`` when left at ``None``. transformers would pick
    ``True`` (it does not see trainserve's own gradient checkpointing), and DDP's unused-parameter
    search then fails inside the checkpointed layers' inner backward ("mark a variable ready only
    once"); every LoRA parameter is used in every forward, so there is nothing to search for.
    """
    world = launcher_world()
    if world is None or args is None:
        return
    if args.world_size != world.world_size:
        hint = (" On CPU accelerate runs multi-process training only with use_cpu=True: pass "
                "use_cpu=True in the config." if not getattr(args, "use_cpu", False) else "")
        raise ValueError(f"the training arguments see a world of {args.world_size} process(es) but the launcher "
                         f"started WORLD_SIZE={world.world_size}; every rank would train alone.{hint}")
    if getattr(args, "ddp_find_unused_parameters", False) is None:
        args.ddp_find_unused_parameters = False


def exclude_frozen_from_ddp(model: Any) -> None:
    """Keep DDP from broadcasting the frozen base weights and the buffers.

    When DDP wraps a model it broadcasts every parameter and buffer from rank 0 (and, with
    transformers' defaults, the buffers again before every forward). Here the frozen base weights
    are this rank's *engine* tensors, loaded from the same checkpoint on every rank: the broadcast
    would rewrite the whole base model (gigabytes at 7B) into each engine for nothing. DDP skips
    the names in ``_ddp_params_and_buffers_to_ignore``; the trainable (LoRA) parameters stay in
    and their gradients are averaged as usual.
    """
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    model._ddp_params_and_buffers_to_ignore = frozen + [name for name, _ in model.named_buffers()]


def process_index() -> int:
    """This process's rank in the running job (0 in a single process)."""
    world = launcher_world()
    return 0 if world is None else world.rank
