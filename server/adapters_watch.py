"""Hot reload of ``--adapters-dir``: every sub-directory holding a PEFT adapter is served under its name.

A thread polls the directory (file sizes, mtimes and inodes: cheap) every ``interval`` seconds.
A new or changed adapter is loaded once its files have looked the same for two polls in a row (so
a half-written save is not picked up); its content digest decides whether it really is a new
version. A removed directory stops being served. Rejected adapters are logged, counted and kept
in :attr:`ModelTable.errors` until the directory changes again; the version served before keeps
serving. The same thread removes retired versions from the engine once their requests finish.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from trainserve.server.errors import APIError
from trainserve.server.models import ModelTable

from trainserve.adapter_paths import ADAPTER_FILES, AdapterError

logger = logging.getLogger("trainserve.server")

Signature = tuple[tuple[str, int, int, int], ...]


def dir_signature(path: Path) -> Signature | None:
    """(file, size, mtime_ns, inode) of the adapter files in ``path``; None if it is no adapter."""
    rows = []
    try:
        st = path.stat()
        rows.append((".", 0, st.st_mtime_ns, st.st_ino))
        for fname in ADAPTER_FILES:
            f = path / fname
            if f.exists():
                st = f.stat()
                rows.append((fname, st.st_size, st.st_mtime_ns, st.st_ino))
    except OSError:
        return None
    if len(rows) == 1:
        return None
    return tuple(rows)


class AdapterWatcher:
    """Polls an adapters directory (optional) and reaps retired adapter versions."""

    def __init__(self, table: ModelTable, adapters_dir: str | os.PathLike | None, interval: float = 1.0):
        self.table = table
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir is not None else None
        self.interval = interval
        self._seen: dict[str, Signature] = {}  # last signature observed per name
        self._done: dict[str, Signature] = {}  # signature last acted on per name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    def load_initial(self) -> None:
        """Load every adapter in the directory now (at start-up, before serving)."""
        if self.adapters_dir is None:
            return
        for name, sig in self._scan().items():
            self._seen[name] = sig
            self._apply(name, sig)

    def _scan(self) -> dict[str, Signature]:
        assert self.adapters_dir is not None
        found: dict[str, Signature] = {}
        try:
            children = sorted(self.adapters_dir.iterdir())
        except OSError as exc:
            logger.warning("cannot list the adapters directory %s: %s", self.adapters_dir, exc)
            return found
        for child in children:
            if child.name.startswith(".") or not child.is_dir():
                continue
            sig = dir_signature(child)
            if sig is not None:
                found[child.name] = sig
        return found

    def _apply(self, name: str, sig: Signature) -> None:
        self._done[name] = sig
        try:
            entry, changed = self.table.load(
                name, name, source="dir", replace=True, confine_to=str(self.adapters_dir)
            )
        except (AdapterError, APIError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            self.table.errors[name] = message
            if self.table.metrics is not None:
                self.table.metrics.adapter_failures.labels("dir").inc()
            logger.warning("adapters dir: %s was not loaded: %s", name, message)
            return
        if changed:
            logger.info("adapters dir: now serving %s", entry.label)

    def poll(self) -> None:
        """One pass: load what is new and settled, retire what disappeared, reap retired versions."""
        self.polls += 1
        if self.adapters_dir is not None:
            current = self._scan()
            for name, sig in current.items():
                settled = self._seen.get(name) == sig
                self._seen[name] = sig
                if settled and self._done.get(name) != sig:
                    self._apply(name, sig)
            for name in [n for n in self._done if n not in current]:
                del self._done[name]
                self._seen.pop(name, None)
                self.table.errors.pop(name, None)
                entry = self.table.get(name)
                if entry is not None and entry.source == "dir":
                    try:
                        self.table.unload(name, source="dir")
                    except APIError:  # unloaded through the API meanwhile
                        pass
        self.table.reap()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # keep watching: one bad pass must not end hot reload
                logger.exception("adapter watcher pass failed")

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="trainserve-adapter-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
