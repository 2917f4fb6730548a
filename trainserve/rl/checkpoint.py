"""Atomic checkpoints in the Hugging Face ``checkpoint-<step>`` layout, and in-place adapter loading.

A checkpoint (adapter, optimizer, scheduler, grad scaler, RNG states, ``trainer_state.json`` with
the step) is written into a hidden staging directory next to its final place and renamed there
with ``os.replace`` only once complete, so a crash mid-save never leaves a half-written
``checkpoint-<step>``: resuming always finds the last *complete* one. The layout is the one
``transformers.Trainer`` writes, so ``trainer.train(resume_from_checkpoint=...)`` restores the
optimizer, scheduler, RNG and step counter as usual.

Resuming loads the adapter *in place* (``copy_`` into the existing LoRA parameters): the engine's
live adapter tracks those exact tensors, so replacing them would leave the engine serving stale
weights.

Resuming with a larger total (``--steps 6`` then ``--steps 9 --resume``) *extends* the run: the
optimizer state is restored, but the learning rate comes from this run's schedule, built for the
new total, at the restored step (:func:`rebuild_lr_schedule`) — not from the saved schedule, which
had already decayed to its end. ``trainserve_state.json`` carries the adapter version so the
``adapter_version`` metric keeps counting across the resume.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.json"
TRAINSERVE_STATE = "trainserve_state.json"  # what the HF layout lacks: the live adapter's version


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_contents(trainer: Any, directory: str) -> None:
    """Everything ``transformers.Trainer._save_checkpoint`` writes, into ``directory``."""
    from transformers.trainer_callback import ExportableState

    args = trainer.args
    trainer.save_model(directory, _internal_call=True)
    if not args.save_only_model:
        trainer._save_optimizer_and_scheduler(directory)
        trainer._save_scaler(directory)
        trainer._save_rng_state(directory)
    callbacks = trainer.callback_handler.callbacks + [trainer.control]
    for cb in [c for c in callbacks if isinstance(c, ExportableState)]:
        name = cb.__class__.__name__
        if isinstance(trainer.state.stateful_callbacks.get(name), list):
            trainer.state.stateful_callbacks[name].append(cb.state())
        else:
            trainer.state.stateful_callbacks[name] = cb.state()
    trainer.state.save_to_json(os.path.join(directory, TRAINER_STATE))
    extra = getattr(trainer, "trainserve_checkpoint_state", None)
    if callable(extra):
        with open(os.path.join(directory, TRAINSERVE_STATE), "w") as f:
            json.dump(extra(), f)
    if getattr(trainer, "use_adaptive_entropy", False):  # TRL's adaptive entropy controller
        with open(os.path.join(directory, "entropy_ctrl_state.json"), "w") as f:
            json.dump({"entropy_coef": trainer.entropy_coef,
                       "last_world_entropy": trainer._last_world_entropy}, f)


def save_checkpoint(trainer: Any, run_dir: str | None = None) -> str | None:
    """Atomically write ``<run_dir>/checkpoint-<global_step>`` and prune old ones (``save_total_limit``).

    Returns the checkpoint path (``None`` on processes that do not save).
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    args = trainer.args
    if trainer.hp_search_backend is None:
        trainer.store_flos()
    if not args.should_save:
        return None
    run_dir = run_dir or trainer._get_output_dir(trial=None)
    os.makedirs(run_dir, exist_ok=True)
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    final = os.path.join(run_dir, name)
    staging = tempfile.mkdtemp(prefix=f".{name}.staging-", dir=run_dir)
    try:
        _write_contents(trainer, staging)
        _fsync_tree(staging)
        if os.path.exists(final):  # re-saving the same step: swap, then drop the old copy
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=run_dir)
            os.replace(final, os.path.join(old, name))
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    rotate_checkpoints(output_dir=run_dir, save_total_limit=args.save_total_limit,
                       best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=False)
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    """The complete checkpoint with the highest step in ``run_dir`` (staging directories are ignored)."""
    from transformers.trainer_utils import get_last_checkpoint

    if not os.path.isdir(run_dir):
        return None
    path = get_last_checkpoint(run_dir)
    if path is not None and not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        raise RuntimeError(f"checkpoint {path} has no {TRAINER_STATE}; it was not written by this trainer")
    return path


def checkpoint_step(path: str) -> int:
    """The global step recorded in a checkpoint."""
    with open(os.path.join(path, TRAINER_STATE)) as f:
        return int(json.load(f)["global_step"])


def checkpoint_max_steps(path: str) -> int | None:
    """The total steps of the run that wrote a checkpoint (``max_steps`` in its trainer state)."""
    with open(os.path.join(path, TRAINER_STATE)) as f:
        value = json.load(f).get("max_steps")
    return None if value is None else int(value)


def read_trainserve_state(checkpoint_dir: str) -> dict[str, Any]:
    """The checkpoint's ``trainserve_state.json`` (empty for checkpoints written without it)."""
    path = os.path.join(checkpoint_dir, TRAINSERVE_STATE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def rebuild_lr_schedule(optimizer: Any, scheduler: Any) -> bool:
    """Set the learning rate to what ``scheduler``'s own schedule gives at its restored step.

    Call after loading a checkpoint's optimizer and scheduler state into ones created for *this*
    run's total steps. The saved state carries the learning rate of the *saved* schedule (0.0 at the
    end of a linear decay), which is wrong when the total grew; the schedule functions of a
    ``LambdaLR`` (every ``transformers`` schedule) are not saved, so the loaded scheduler has this
    run's. With an unchanged total this gives the saved learning rate again, bit for bit. Returns
    False (and changes nothing) for other scheduler types.
    """
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(scheduler, LambdaLR):
        return False
    scheduler.last_epoch -= 1
    scheduler.step()  # recomputes base_lr * lambda(step) into every param group, as during training
    return True


def load_adapter_in_place(model: Any, checkpoint_dir: str) -> int:
    """Copy a saved PEFT adapter into ``model``'s existing LoRA tensors; return how many were loaded.

    Raises if the saved adapter does not have exactly the model's LoRA tensors and shapes.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = getattr(model, "active_adapter", "default")
    candidates = [os.path.join(checkpoint_dir, ADAPTER_WEIGHTS),
                  os.path.join(checkpoint_dir, adapter, ADAPTER_WEIGHTS)]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in checkpoint {checkpoint_dir}")
    saved = load_file(path)
    current = get_peft_model_state_dict(model, adapter_name=adapter)  # detached views of the parameters
    missing, unexpected = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint adapter {path} does not match the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        for key, tensor in current.items():
            value = saved[key]
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{key}: checkpoint shape {tuple(value.shape)} vs model {tuple(tensor.shape)}")
            tensor.copy_(value.to(dtype=tensor.dtype, device=tensor.device))
    return len(current)
