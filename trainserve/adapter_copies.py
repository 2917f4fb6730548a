"""Private copies of saved adapters, so the engine never reads a file that changed after validation.

Why: vLLM keeps at most ``max_cpu_loras`` adapters in host memory (least recently used out) and
reads a dropped one again from its ``lora_path`` when a request needs it. Handed the user's
directory, that read could return whatever is there *now*: the loop ``save_lora("out")`` /
``load_lora("out")`` after every epoch would, once more than 16 adapters were used, serve an old
request the newest files, silently; a deleted directory would fail inside an engine step and stop
the engine. So the engine reads copies: each adapter's files are copied once, validated, and the
copy is what vLLM loads.

Copies are bounded. :class:`AdapterCopies` keeps the ``keep`` most recently used ones plus those of
unfinished requests (never dropped while a request may still need to read them). A dropped copy is
made again, from the directory the adapter was loaded from, the next time a request uses it, and
only if those files still have the content that was validated (same digest); otherwise that
request is refused with an error that says why and what to do (``load_lora`` again), and nothing
else is disturbed. The engine-side check runs inside the job that submits the request, between
engine steps, so no drop can come between it and vLLM's read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from trainserve.adapter_paths import AdapterError, snapshot_adapter

__all__ = ["AdapterCopies"]


class AdapterCopies:
    """The private copies of one engine's saved adapters, one directory per adapter id.

    ``validate(directory) -> digest`` checks a copy (the registry's full validation);
    ``in_use() -> ids`` names the adapters of unfinished requests (called between engine steps)."""

    def __init__(self, keep: int, validate: Callable[[str], str], in_use: Callable[[], set[int]]):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.keep = keep
        self._validate = validate
        self._in_use = in_use
        self.root = tempfile.mkdtemp(prefix="trainserve-lora-")
        self._remove_root = weakref.finalize(self, shutil.rmtree, self.root, True)
        self._sources: dict[int, tuple[str, str]] = {}  # id → (directory loaded from, digest)
        self._present: OrderedDict[int, None] = OrderedDict()  # ids with a copy, least recently used first
        self._doomed: set[int] = set()  # forgotten ids whose copy is still there
        self._lock = threading.Lock()
        self.remade = 0  # copies made again after a drop (for tests and logs)

    def path_for(self, lora_id: int) -> str:
        """The directory the engine reads adapter ``lora_id`` from."""
        return os.path.join(self.root, f"lora-{lora_id}")

    def stage(self, source: str | os.PathLike) -> tuple[str, str]:
        """Copy ``source`` into a staging directory and validate the copy: ``(staged dir, digest)``.

        Errors name ``source``, not the copy."""
        staged = snapshot_adapter(source, self.root)
        try:
            return staged, self._validate(staged)
        except AdapterError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            message = str(exc).replace(str(Path(staged).resolve()), str(source)).replace(staged, str(source))
            raise AdapterError(message) from exc
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def adopt(self, lora_id: int, staged: str, source: str | os.PathLike, digest: str) -> None:
        """Make ``staged`` the copy of ``lora_id`` (or drop it if that copy exists); remember where
        the content came from, to make the copy again after a drop."""
        target = self.path_for(lora_id)
        with self._lock:
            self._sources[lora_id] = (str(Path(source).resolve()), digest)
            if os.path.isdir(target):
                shutil.rmtree(staged, ignore_errors=True)
            else:
                os.replace(staged, target)
            self._present[lora_id] = None
            self._present.move_to_end(lora_id)
            self._doomed.discard(lora_id)

    def forget(self, lora_id: int) -> None:
        """``lora_id`` is never made again; its copy goes at the next :meth:`trim` that finds no
        unfinished request using it (one still running may need vLLM to read it again)."""
        with self._lock:
            self._sources.pop(lora_id, None)
            if lora_id in self._present:
                self._doomed.add(lora_id)

    def ensure(self, lora_id: int) -> None:
        """Before a request with ``lora_id`` is submitted (between engine steps): its copy exists, made
        again from its source if it was dropped and the source still holds the validated content."""
        with self._lock:
            source = self._sources.get(lora_id)
            if source is None:  # not one of ours (the live adapter, or a caller-managed directory)
                return
            present = lora_id in self._present and os.path.isdir(self.path_for(lora_id))
            if present:
                self._present.move_to_end(lora_id)
        if not present:
            self._remake(lora_id, *source)
            self.trim()

    def _remake(self, lora_id: int, source: str, digest: str) -> None:
        again = ("it was loaded from {src} with load_lora(); the engine had dropped its copy after {n} other "
                 "adapters were used, and {why}. Call load_lora({src!r}) again to serve the files there now")
        if not os.path.isdir(source):
            raise AdapterError(again.format(src=source, n=self.keep, why="that directory no longer exists"))
        try:
            staged, now = self.stage(source)
        except AdapterError as exc:
            raise AdapterError(again.format(src=source, n=self.keep, why=f"its files there no longer load ({exc})")) \
                from exc
        if now != digest:
            shutil.rmtree(staged, ignore_errors=True)
            raise AdapterError(again.format(src=source, n=self.keep, why="the files there have changed since"))
        self.adopt(lora_id, staged, source, digest)
        self.remade += 1

    def trim(self) -> None:
        """Keep the ``keep`` most recently used copies and those unfinished requests use; drop the
        others (and forgotten ones once no request uses them). Call between engine steps."""
        busy = self._in_use()
        with self._lock:
            live = [i for i in self._present if i not in self._doomed]
            kept = set(live[-self.keep:]) | busy
            drop = [i for i in self._present if i not in kept]
            for lora_id in drop:
                del self._present[lora_id]
                self._doomed.discard(lora_id)
        for lora_id in drop:
            shutil.rmtree(self.path_for(lora_id), ignore_errors=True)

    def count(self) -> int:
        """Copies on disk now."""
        with self._lock:
            return len(self._present)
