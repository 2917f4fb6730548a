"""The live adapter: the trainer's PEFT LoRA weights, copied into the engine's LoRA slots in memory.

Two pinned engine slots (``LIVE_LORA_IDS``) are used as a double buffer. A new version is always
written into the slot that no unfinished request uses, between engine steps, so a generation in
flight never sees half an update and finishes on the version it started with. Each version is
sent to vLLM under its own LoRA *name* (``live@v<N>``), which is part of vLLM's prefix-cache key:
KV computed with an older version is never reused for a newer one.

Change detection costs nothing per step: an in-place update bumps each tensor's version counter,
so ``(tensor._version, data_ptr)`` of every LoRA parameter is the marker. Fused optimizers
(``torch.optim.AdamW(fused=True)``, the transformers default on torch ≥ 2.8) write parameters
without bumping those counters, so a global optimizer post-step hook also counts every step of
an optimizer that holds live-adapter parameters, and that count is part of the marker.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from trainserve.engine import vllm_compat
from trainserve.engine.launch import LIVE_LORA_IDS, Engine
from trainserve.engine.optimizer_watch import updates_any

# transformers module name → (engine fused module name, sub-projection index)
HF_TO_ENGINE = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}


_LIVE_ADAPTERS: weakref.WeakSet[LiveAdapter] = weakref.WeakSet()


def _after_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    for live in list(_LIVE_ADAPTERS):
        if live.holds(optimizer):
            live.mark_stepped()


_STEP_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


class LiveAdapterRevoked(RuntimeError):
    """A newer model claimed the engine's live adapter slots."""


@dataclass
class _Target:
    lora_a: torch.nn.Parameter  # (r, in)
    lora_b: torch.nn.Parameter  # (out, r)
    scaling: float
    engine_layer: torch.nn.Module
    sub: int


@dataclass
class _Snapshot:
    version: int
    tensors: list[tuple[torch.Tensor, torch.Tensor]]  # (A, B·scaling) per target
    ready: tuple[Any, Any] | None = None  # _producer_mark after the snapshot's kernels were queued


def _producer_mark(tensor: torch.Tensor) -> tuple[Any, Any] | None:
    """CUDA only (None on CPU): an event recorded on the calling thread's current stream, and that stream.

    The slot copy runs in the engine loop's thread, which during an overlapped GRPO ``train()`` has its
    own CUDA stream; kernels the caller queued on *its* stream (the optimizer step writing the LoRA
    tensors, a snapshot's copies) are not ordered before the copy unless the engine stream waits on this
    event (:func:`_wait_for`). CUDA events cannot be exercised on a CPU-only test machine: the test
    checks with a fake stream API that the event is recorded by the caller and waited on by the writer."""
    if not tensor.is_cuda:
        return None
    stream = torch.cuda.current_stream(tensor.device)
    event = torch.cuda.Event()
    event.record(stream)
    return event, stream


def _wait_for(mark: tuple[Any, Any] | None) -> None:
    """Make the current (writing) stream wait for the work queued before ``mark`` on the producer's
    stream; nothing when they are the same stream (already in order) or on CPU. No host sync."""
    if mark is None:
        return
    event, producer = mark
    current = torch.cuda.current_stream(producer.device)
    if current != producer:
        current.wait_event(event)


class LiveAdapter:
    """Keeps the engine's live LoRA slots equal to a PEFT model's active adapter."""

    def __init__(self, engine: Engine, peft_model: Any):
        self.engine = engine
        self.peft_model = peft_model
        self.adapter_name: str = peft_model.active_adapter
        self._targets = self._collect_targets()
        if not self._targets:
            raise ValueError("the PEFT model has no LoRA layers that the engine can serve")
        self._dir = tempfile.mkdtemp(prefix="trainserve-live-")
        self._lock = threading.Lock()
        self.version = 0  # trainer-side version, bumped on every detected change
        self._marker: tuple | None = None
        self._staged: _Snapshot | None = None
        self._applied: tuple[int, int] | None = None  # (version, lora id) now served
        self._views: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._steps = 0  # optimizer steps seen by the global hook (fused optimizers skip _version)
        self._optimizers: weakref.WeakKeyDictionary[Any, tuple[int, bool]] = weakref.WeakKeyDictionary()
        self._param_ids = frozenset(id(p) for t in self._targets for p in (t.lora_a, t.lora_b))
        self.last_update_ms = 0.0
        self.updates = 0
        self._register_slots()
        _LIVE_ADAPTERS.add(self)

    # ----------------------------------------------------------- set-up
    def _collect_targets(self) -> list[_Target]:
        from peft.tuners.lora import LoraLayer

        engine_modules = dict(vllm_compat.lora_layers(self.engine.model))
        targets = []
        for name, module in self.peft_model.named_modules():
            if not isinstance(module, LoraLayer) or self.adapter_name not in module.lora_A:
                continue
            parent, _, leaf = name.rpartition(".")
            if leaf not in HF_TO_ENGINE:
                raise ValueError(f"LoRA on {leaf!r} cannot be served by the engine (supported: {sorted(HF_TO_ENGINE)})")
            engine_leaf, sub = HF_TO_ENGINE[leaf]
            # "base_model.model.model.layers.3.self_attn" → "model.layers.3.self_attn"
            key = f"{parent[parent.index('model.layers.'):]}.{engine_leaf}"
            if key not in engine_modules:
                raise vllm_compat.VLLMInternalsChanged(f"engine has no LoRA layer {key}")
            targets.append(
                _Target(
                    lora_a=module.lora_A[self.adapter_name].weight,
                    lora_b=module.lora_B[self.adapter_name].weight,
                    scaling=float(module.scaling[self.adapter_name]),
                    engine_layer=engine_modules[key],
                    sub=sub,
                )
            )
        return targets

    def _register_slots(self) -> None:
        from vllm.lora.request import LoRARequest

        previous = self.engine.live_owner
        if previous is not None and previous is not self:
            previous.revoke()
        self.engine.live_owner = self
        self.peft_model.save_pretrained(self._dir, selected_adapters=[self.adapter_name])
        path = self._adapter_path()
        engine = self.engine.llm.llm_engine

        def register() -> None:
            for k, lora_id in enumerate(LIVE_LORA_IDS):
                if lora_id in engine.list_loras():
                    engine.remove_lora(lora_id)
                engine.add_lora(LoRARequest(f"live-slot{k}", lora_id, path))
                engine.pin_lora(lora_id)

        self.engine.loop.call(register)

    def _adapter_path(self) -> str:
        import os

        sub = os.path.join(self._dir, self.adapter_name)
        return sub if self.adapter_name != "default" and os.path.isdir(sub) else self._dir

    def revoke(self) -> None:
        """Called when another model takes over the engine's live slots."""
        self._targets = []
        shutil.rmtree(self._dir, ignore_errors=True)

    # ------------------------------------------------------- change tracking
    def holds(self, optimizer: Any) -> bool:
        """True when ``optimizer`` updates parameters of this adapter (cached per optimizer)."""
        return updates_any(self._optimizers, self._param_ids, optimizer)

    def mark_stepped(self) -> None:
        """Record that an optimizer changed the adapter (needed for fused optimizers); let the KV
        standby prepare for the generation that usually follows."""
        self._steps += 1
        standby = getattr(self.engine, "standby", None)
        if standby is not None:
            standby.on_optimizer_step()

    def _current_marker(self) -> tuple:
        return (self._steps, *((t.lora_a._version, t.lora_a.data_ptr(), t.lora_b._version, t.lora_b.data_ptr())
                               for t in self._targets))

    def _check_owner(self) -> None:
        if not self._targets or self.engine.live_owner is not self:
            raise LiveAdapterRevoked(
                "this model's live adapter was replaced by a newer get_peft_model() on the same engine"
            )

    def _detect_change(self) -> bool:
        marker = self._current_marker()
        if marker != self._marker:
            self._marker = marker
            self.version += 1
            return True
        return False

    def publish(self) -> int:
        """Training thread: stage a snapshot of the adapter if it changed; return its version.

        Use when other threads (the HTTP server) generate with the live adapter while this
        thread trains: the snapshot is taken here, between optimizer steps, and applied by the
        engine loop between engine steps.
        """
        self._check_owner()
        with self._lock:
            if self._detect_change() or self._staged is None:
                with torch.no_grad():
                    tensors = list(zip(torch._foreach_add([t.lora_a.detach() for t in self._targets], 0),
                                       self._scaled_b(), strict=True))
                self._staged = _Snapshot(self.version, tensors, _producer_mark(tensors[0][0]))
            return self._staged.version

    # ------------------------------------------------------------ applying
    def _free_slot(self) -> int | None:
        in_use = self.engine.loop.in_use_lora_ids()
        current = self._applied[1] if self._applied else None
        for lora_id in LIVE_LORA_IDS:
            if lora_id != current and lora_id not in in_use:
                return lora_id
        return None

    def _slot_views(self, slot: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Destination views ``A[:r]`` and ``B[:, :r]`` of every target in one slot (cached)."""
        views = self._views.get(slot)
        if views is None:
            a_dst, b_dst = [], []
            for target in self._targets:
                a_slot, b_slot = vllm_compat.slot_tensors(target.engine_layer, slot, target.sub)
                r = target.lora_a.shape[0]
                if r > a_slot.shape[0]:
                    raise ValueError(f"LoRA rank {r} exceeds the engine's max_lora_rank {a_slot.shape[0]}")
                a_dst.append(a_slot[:r])
                b_dst.append(b_slot[:, :r])
            views = self._views[slot] = (a_dst, b_dst)
        return views

    def _scaled_b(self) -> list[torch.Tensor]:
        """``B · scaling`` for every target, one batched multiply per distinct scaling."""
        out: list[torch.Tensor] = [None] * len(self._targets)  # type: ignore[list-item]
        groups: dict[float, list[int]] = {}
        for i, target in enumerate(self._targets):
            groups.setdefault(target.scaling, []).append(i)
        for scaling, idx in groups.items():
            for i, b in zip(idx, torch._foreach_mul([self._targets[i].lora_b.detach() for i in idx], scaling),
                            strict=True):
                out[i] = b
        return out

    def _write(self, lora_id: int, tensors: list[tuple[torch.Tensor, torch.Tensor]] | None,
               after: tuple[Any, Any] | None) -> None:
        """Copy A and B·scaling into the slot of ``lora_id``, after the work ``after`` marks (see
        :func:`_producer_mark`) on the stream that produced them. Runs between engine steps."""
        t0 = time.perf_counter()
        slot = vllm_compat.lora_slot(self.engine.lora_manager(), lora_id)
        if slot is None:
            raise vllm_compat.VLLMInternalsChanged(f"pinned live LoRA {lora_id} is not in any engine slot")
        a_dst, b_dst = self._slot_views(slot)
        _wait_for(after)
        with torch.no_grad():
            if tensors is None:
                a_src = [t.lora_a.detach() for t in self._targets]
                b_src = self._scaled_b()
            else:
                a_src = [a for a, _ in tensors]
                b_src = [b for _, b in tensors]
            torch._foreach_copy_(a_dst, a_src)
            torch._foreach_copy_(b_dst, b_src)
        if a_dst[0].is_cuda:
            torch.cuda.current_stream().synchronize()
        self.last_update_ms = (time.perf_counter() - t0) * 1e3
        self.updates += 1

    def _lora_request(self) -> Any:
        from vllm.lora.request import LoRARequest

        assert self._applied is not None
        version, lora_id = self._applied
        return LoRARequest(f"live@v{version}", lora_id, self._adapter_path())

    def sync_request(self, timeout: float = 600.0) -> Any:
        """Training thread, between steps: make the engine's live slot equal the trainer's adapter
        *now* and return the ``LoRARequest`` that generates with it.

        If both slots hold requests still running on older versions (only possible while the
        engine loop serves other threads), wait for one of them to finish."""
        self._check_owner()
        # The caller's stream holds the optimizer step that wrote the tensors the engine thread copies.
        mark = _producer_mark(self._targets[0].lora_a)

        def sync() -> Any:
            with self._lock:
                self._detect_change()
                if self._applied is None or self._applied[0] != self.version:
                    lora_id = self._free_slot()
                    if lora_id is None:  # both buffers serve requests in flight: try again shortly
                        return None
                    self._write(lora_id, None, mark)
                    self._applied = (self.version, lora_id)
                return self._lora_request()

        deadline = time.monotonic() + timeout
        while (request := self.engine.loop.call(sync)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no live adapter slot came free in {timeout} s: both hold requests in flight")
            time.sleep(0.005)
        return request

    def published_request(self) -> Any:
        """Any thread: the request for the newest *published* version (see :meth:`publish`)."""
        self._check_owner()

        def apply() -> Any:
            with self._lock:
                staged = self._staged
                if staged is not None and (self._applied is None or staged.version > self._applied[0]):
                    lora_id = self._free_slot()
                    if lora_id is not None:
                        self._write(lora_id, staged.tensors, staged.ready)
                        self._applied = (staged.version, lora_id)
                if self._applied is None:
                    raise RuntimeError("no live adapter version has been published yet")
                return self._lora_request()

        return self.engine.loop.call(apply)

    @property
    def served_version(self) -> int | None:
        """The version the next live request would use (None before the first sync)."""
        return self._applied[0] if self._applied else None
