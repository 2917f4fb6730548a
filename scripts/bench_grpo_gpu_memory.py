"""Device memory in use, sampled by a background thread, for the GPU GRPO benchmark.

Why a thread and NVML: ``torch.cuda.max_memory_allocated`` sees only torch's caching allocator,
not vLLM's cuMem pool (weights and KV cache in sleep/standby modes), and sampling once at the end
of a step misses the peak *inside* it (rollout KV cache vs. training activations). NVML's
``used`` is what the device really holds. One arm runs per process on an otherwise idle GPU, so
device-level use is this arm's use; the use before this process touched CUDA is kept as
``baseline`` so it can be subtracted.

Sources, first that works: ``pynvml`` (nvidia-ml-py); vLLM's vendored copy of it, loaded from its
file without importing the ``vllm`` package (importing vLLM early would break Unsloth's "import
unsloth first" rule); ``torch.cuda.mem_get_info`` once this process has initialised CUDA itself,
read only at step boundaries on the main thread (not a true in-step peak: ``mem_source`` says so);
none (CPU): peaks are then ``None``.

With ``devices=N`` (``--nproc N``: one rank per GPU) the first N visible GPUs are sampled (NVML only):
the usual keys then hold the maximum over the GPUs, and ``*_per_gpu`` keys each GPU's own value.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

GIB = 2**30


def _load_pynvml() -> Any:
    try:
        import pynvml

        return pynvml
    except ImportError:
        pass
    spec = importlib.util.find_spec("vllm")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "third_party", "pynvml.py")
    if not os.path.exists(path):
        return None
    name = "_bench_vendored_pynvml"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module  # the module looks itself up in sys.modules while loading
    mod_spec.loader.exec_module(module)
    return module


def _nvml_handle(nvml: Any, visible: str | None = None) -> Any:
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible.startswith(("GPU-", "MIG-")):
        return nvml.nvmlDeviceGetHandleByUUID(visible)
    return nvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)


def _visible(nvml: Any) -> list[str]:
    """The visible devices as NVML ids: CUDA_VISIBLE_DEVICES' entries, else every device's index."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [v.strip() for v in env.split(",") if v.strip()]
    return [str(i) for i in range(nvml.nvmlDeviceGetCount())]


def visible_gpu_count() -> int:
    """Visible CUDA devices through NVML (no CUDA context is created); 0 without a driver or GPU."""
    try:
        nvml = _load_pynvml()
        if nvml is None:
            return 0
        nvml.nvmlInit()
        return len(_visible(nvml))
    except Exception:
        return 0


def device_name() -> str | None:
    """The first visible GPU's name through NVML (no CUDA context is created), else ``None``."""
    try:
        nvml = _load_pynvml()
        if nvml is None:
            return None
        nvml.nvmlInit()
        name = nvml.nvmlDeviceGetName(_nvml_handle(nvml))
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None


class MemorySampler:
    """Samples device memory in use every ``interval_s``; keeps the peak per phase and per step.

    ``set_phase(name)`` starts a new phase (``startup``, ``warmup``, ``measured``);
    ``take_step_peak()`` returns the peak since its previous call (the step that just ended);
    ``take_window_peak()`` likewise for any stretch its calls bracket (the benchmark brackets each
    rollout, so a step's peak splits into the rollout's and the training's: they hold different
    memory, the KV cache against activations, and a format can only trade one for the other if it
    knows which phase sets the peak).
    """

    def __init__(self, interval_s: float = 0.02, devices: int = 1) -> None:
        self.interval_s = interval_s
        self.devices = devices
        self.baselines: list[int] = []
        self.peaks_per_gpu: dict[str, list[int]] = {}
        self._step_peaks: list[int] = []
        self.last_step_peaks: list[int] = []
        self.source: str | None = None
        self.error: str | None = None
        self.baseline: int | None = None
        self.samples = 0
        self.peaks: dict[str, int] = {}
        self._phase = "startup"
        self._step_peak = 0
        self._window_peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = self._open()

    def _open(self) -> Any:
        try:
            nvml = _load_pynvml()
            if nvml is not None:
                nvml.nvmlInit()
                if self.devices > 1:
                    handles = [_nvml_handle(nvml, v) for v in _visible(nvml)[:self.devices]]
                    self.baselines = [int(nvml.nvmlDeviceGetMemoryInfo(h).used) for h in handles]
                    self.baseline, self.source = max(self.baselines), f"nvml ({len(handles)} GPUs)"
                    return lambda: [int(nvml.nvmlDeviceGetMemoryInfo(h).used) for h in handles]
                handle = _nvml_handle(nvml)
                self.baseline = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
                self.source = "nvml"
                return lambda: int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception as exc:  # no driver / no GPU: fall through
            self.error = f"NVML: {type(exc).__name__}: {exc}"

        def torch_read() -> int | None:
            torch = sys.modules.get("torch")
            if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
                return None  # never initialise CUDA from here: the arm's framework does that
            free, total = torch.cuda.mem_get_info()
            self.source = "torch.cuda.mem_get_info at step boundaries"
            return int(total - free)

        return torch_read

    def sample(self) -> None:
        try:
            used = self._read()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return
        if used is None:
            return
        per_gpu = used if isinstance(used, list) else None
        used = max(per_gpu) if per_gpu else used
        with self._lock:
            self.samples += 1
            self.peaks[self._phase] = max(self.peaks.get(self._phase, 0), used)
            self._step_peak = max(self._step_peak, used)
            self._window_peak = max(self._window_peak, used)
            if per_gpu:
                old = self.peaks_per_gpu.get(self._phase) or [0] * len(per_gpu)
                self.peaks_per_gpu[self._phase] = [max(a, b) for a, b in zip(old, per_gpu, strict=True)]
                self._step_peaks = [max(a, b) for a, b in zip(self._step_peaks or [0] * len(per_gpu), per_gpu,
                                                              strict=True)]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> MemorySampler:
        self.sample()
        if self.source and self.source.startswith("nvml"):  # the torch fallback is only sampled from the main
            # thread, at step boundaries: a CUDA call from another thread could break vLLM's CUDA-graph capture
            self._thread = threading.Thread(target=self._run, name="bench-memory-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        self.sample()

    def set_phase(self, name: str) -> None:
        self.sample()  # the old phase's last sample
        with self._lock:
            self._phase = name
        self.sample()

    def take_step_peak(self) -> int | None:
        self.sample()
        with self._lock:
            peak, self._step_peak = self._step_peak, 0
            self.last_step_peaks, self._step_peaks = self._step_peaks, []
        return peak or None

    def take_window_peak(self) -> int | None:
        """The peak since the previous call (whatever the phase or step), sampled once more first."""
        self.sample()
        with self._lock:
            peak, self._window_peak = self._window_peak, 0
        return peak or None

    def step_per_gpu(self) -> dict[str, Any]:
        """The last step's peak of each GPU (GiB), for the step record; nothing when one GPU is sampled."""
        if not self.last_step_peaks:
            return {}
        return {"mem_peak_gib_per_gpu": [round(v / GIB, 2) for v in self.last_step_peaks]}

    def report(self) -> dict[str, Any]:
        """Peaks in GiB: per phase, over the whole run, and the baseline before this process."""
        def gib(v: int | None) -> float | None:
            return None if not v else round(v / GIB, 2)

        with self._lock:
            peaks, per_gpu = dict(self.peaks), {k: list(v) for k, v in self.peaks_per_gpu.items()}
        out = {
            "mem_source": self.source, "mem_error": self.error, "mem_samples": self.samples,
            "mem_interval_ms": round(self.interval_s * 1e3, 1), "mem_baseline_gib": gib(self.baseline),
            "peak_mem_run_gib": gib(max(peaks.values(), default=0)),
            **{f"peak_mem_{phase}_gib": gib(v) for phase, v in peaks.items()},
        }
        if per_gpu:  # several GPUs: each one's peaks (the keys above hold the maximum over them)
            run = [max(col) for col in zip(*per_gpu.values(), strict=True)]
            out.update({"mem_baseline_gib_per_gpu": [gib(v) for v in self.baselines],
                        "peak_mem_run_gib_per_gpu": [gib(v) for v in run],
                        **{f"peak_mem_{phase}_gib_per_gpu": [gib(v) for v in vs] for phase, vs in per_gpu.items()}})
        return out


class PhasePeaks:
    """Splits each step's memory peak at its rollout: ``mem_peak_rollout_gib`` (while generating: the
    KV cache's phase) and ``mem_peak_training_gib`` (the rest of the step: the activations' phase).

    On CUDA it also reads torch's caching allocator when the rollout starts and ends:
    ``torch_cache_unused_gib_rollout`` (the larger of the two: blocks torch holds but nothing uses,
    which then sit beside the KV cache) and ``torch_allocated_gib_rollout_start``. Whether the
    rollout's peak is the trainer's leftover cache or the engine's own memory decides what a
    training step may keep.

    Only a rollout on the stepping thread is bracketed; an overlapped one runs beside the training,
    and its step gets ``None`` for all of these.
    """

    def __init__(self, sampler: MemorySampler) -> None:
        self.sampler = sampler
        self.training = self.rollout_peak = 0
        self.allocator: dict[str, float] = {}

    def start(self) -> None:
        """The first step's windows start here, not at model loading."""
        self.sampler.take_window_peak()

    def _read_allocator(self, when: str) -> None:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        unused = round((reserved - allocated) / GIB, 2)
        self.allocator["torch_cache_unused_gib_rollout"] = max(
            unused, self.allocator.get("torch_cache_unused_gib_rollout", 0.0))
        if when == "start":
            self.allocator["torch_allocated_gib_rollout_start"] = round(allocated / GIB, 2)

    @contextlib.contextmanager
    def rollout(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.training = max(self.training, self.sampler.take_window_peak() or 0)
        self._read_allocator("start")
        try:
            yield
        finally:
            self._read_allocator("end")
            self.rollout_peak = max(self.rollout_peak, self.sampler.take_window_peak() or 0)

    def step_ended(self) -> dict[str, float | None]:
        rollout, training = self.rollout_peak, max(self.training, self.sampler.take_window_peak() or 0)
        allocator, self.allocator = self.allocator, {}
        self.training = self.rollout_peak = 0
        return {"mem_peak_rollout_gib": round(rollout / GIB, 2) if rollout else None,
                "mem_peak_training_gib": round(training / GIB, 2) if rollout and training else None,
                **allocator}


def wall() -> str:
    """A timestamp for progress lines."""
    return time.strftime("%H:%M:%S")
