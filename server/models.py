"""The served models: the base, versioned saved adapters, and the live (training) adapter.

Each adapter name maps to one current :class:`AdapterEntry` (a version and its vLLM
``LoRARequest``). Loading a name again with new content makes a new version with a new LoRA id;
the old version is *retired*: no new request can get it, and it is removed from the engine only
once no unfinished request uses its id. Requests pin their version: :meth:`ModelTable.resolve`
runs between engine steps, in the same job that submits the request.

Every adapter is copied into a private snapshot directory before it is validated, so what the
engine loads (and re-reads, if vLLM evicts it from its CPU cache) is exactly what was validated,
whatever later happens to the user's directory.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainserve.server.errors import APIError

from trainserve.adapter_paths import AdapterError, resolve_in_dir, snapshot_adapter
from trainserve.adapters import validate_adapter_dir

logger = logging.getLogger("trainserve.server")

LIVE_NAME = "live"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}$")


@dataclass
class AdapterEntry:
    """One version of a named saved adapter."""

    name: str
    version: int
    request: Any  # vLLM LoRARequest
    source_path: str
    snapshot_dir: str
    digest: str
    rank: int
    source: str  # "cli", "api" or "dir"
    shown_path: str = ""  # what clients see: relative to --adapters-dir, else the directory's name
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def label(self) -> str:
        return f"{self.name}@v{self.version}"


def shown_path(path: str | os.PathLike, adapters_dir: str | None) -> str:
    """An adapter directory as clients see it: relative to the adapters directory when inside it,
    else its directory name only (where the operator keeps files is not the clients' business)."""
    resolved = Path(path).resolve()
    if adapters_dir is not None:
        try:
            return str(resolved.relative_to(Path(adapters_dir).resolve()))
        except ValueError:
            pass
    return resolved.name


class ModelTable:
    """Which model names are served and by which engine LoRA request; thread-safe."""

    def __init__(self, engine: Any, hf_config: Any, base_name: str, max_lora_rank: int, metrics: Any = None):
        self.engine = engine
        self.loop = engine.loop
        self.hf_config = hf_config
        self.base_name = base_name
        self.max_lora_rank = max_lora_rank
        self.metrics = metrics
        self.created = int(time.time())
        self.errors: dict[str, str] = {}  # adapters-dir entries that were rejected, by name
        self._entries: dict[str, AdapterEntry] = {}
        self._retired: list[AdapterEntry] = []
        self._next_version: dict[str, int] = {}
        self._lock = threading.Lock()  # guards the dicts; never held while waiting for the loop
        self._mutate = threading.RLock()  # serialises load/unload (may wait for the loop)
        self._snapshots = tempfile.mkdtemp(prefix="trainserve-adapters-")
        self._last_live: str | None = None

    # ------------------------------------------------------------ lookup
    @property
    def live(self) -> Any:
        """The engine's live adapter (a training model's LoRA), if one exists."""
        return getattr(self.engine, "live_owner", None)

    @property
    def retiring(self) -> int:
        """Replaced or unloaded versions still waiting for their requests to finish."""
        with self._lock:
            return len(self._retired)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return [self._entries[k] for k in sorted(self._entries)]

    def get(self, name: str) -> AdapterEntry | None:
        with self._lock:
            return self._entries.get(name)

    def exists(self, name: str) -> bool:
        if name == self.base_name or (name == LIVE_NAME and self.live is not None):
            return True
        with self._lock:
            return name in self._entries

    def require(self, name: str) -> None:
        if not self.exists(name):
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def resolve(self, name: str) -> tuple[Any, str]:
        """``(LoRARequest or None, version label)`` for a new request. Call between engine steps
        (inside :meth:`EngineLoop.call`), in the job that also submits the request."""
        if name == self.base_name:
            return None, "base"
        if name == LIVE_NAME and self.live is not None:
            try:
                request = self.live.published_request()
            except RuntimeError as exc:  # nothing published yet, or the adapter was revoked
                raise APIError(
                    503, f"the live adapter cannot be served yet: {exc}", code="live_unavailable"
                ) from exc
            label = request.lora_name
            if label != self._last_live:
                self._last_live = label
                if self.metrics is not None:
                    self.metrics.adapter_swaps.labels("live").inc()
            return request, label
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            self.require(name)
        assert entry is not None
        return entry.request, entry.label

    # ------------------------------------------------------------ loading
    def check_name(self, name: str) -> None:
        if name in (self.base_name, LIVE_NAME):
            raise APIError(400, f"the name {name!r} is reserved", param="lora_name", code="reserved_name")
        if not _NAME_RE.match(name):
            raise APIError(
                400,
                f"invalid adapter name {name!r} (letters, digits and ._:/+- only, at most 128)",
                param="lora_name",
                code="invalid_value",
            )

    def _snapshot(self, source: Path, confine_to: str | None) -> str:
        """Copy the adapter's files into a private directory (refusing links that leave ``confine_to``)."""
        return snapshot_adapter(source, self._snapshots, confine_to)

    def load(
        self,
        name: str,
        path: str | os.PathLike,
        *,
        source: str,
        replace: bool = False,
        confine_to: str | None = None,
    ) -> tuple[AdapterEntry, bool]:
        """Validate and serve the adapter at ``path`` as ``name``; return ``(entry, changed)``.

        Raises :class:`AdapterError` for an adapter that cannot be served (nothing else changes),
        and :class:`APIError` for a name that is taken (unless ``replace``) or reserved. Error
        messages name paths as clients may see them (:func:`shown_path`), never the server's
        absolute paths: they reach API clients and ``/health``.
        """
        try:
            return self._load(name, path, source=source, replace=replace, confine_to=confine_to)
        except AdapterError as exc:
            raise AdapterError(self._scrub(str(exc), path, confine_to)) from exc

    def _scrub(self, message: str, path: str | os.PathLike, confine_to: str | None) -> str:
        """``message`` with the adapter's absolute path shown as clients see it, and the adapters
        directory and the snapshot directory by their role."""
        pairs: list[tuple[str, str]] = []
        if "\x00" not in str(path):
            src = Path(path) if confine_to is None else Path(confine_to).resolve() / path
            pairs.append((str(src.resolve()), shown_path(src, confine_to)))
            pairs.append((str(Path(path).absolute()), shown_path(src, confine_to)))
        if confine_to is not None:
            pairs += [(str(Path(confine_to).resolve()), "<adapters-dir>"), (str(confine_to), "<adapters-dir>")]
        pairs.append((self._snapshots, "<snapshot>"))
        for old, new in sorted(pairs, key=lambda p: -len(p[0])):
            if old and old not in (".", "/"):
                message = message.replace(old, new)
        return message

    def _load(
        self, name: str, path: str | os.PathLike, *, source: str, replace: bool, confine_to: str | None
    ) -> tuple[AdapterEntry, bool]:
        self.check_name(name)
        if "\x00" in str(path):  # os calls raise a bare ValueError for it
            raise AdapterError(f"adapter path {str(path)!r} contains a NUL byte")
        src = Path(path)
        if confine_to is not None:
            src = resolve_in_dir(confine_to, src)
        with self._mutate:
            existing = self.get(name)
            if existing is not None and not replace:
                raise APIError(
                    400,
                    f"The lora adapter '{name}' has already been loaded "
                    "(send load_inplace=true to load a new version).",
                    param="lora_name",
                    code="adapter_exists",
                )
            snap = self._snapshot(src, confine_to)
            try:
                try:
                    dtype = getattr(getattr(self.engine, "spec", None), "dtype", None)
                    info = validate_adapter_dir(snap, self.hf_config, self.max_lora_rank, dtype)
                except AdapterError as exc:  # name the user's directory, not the snapshot
                    raise AdapterError(str(exc).replace(snap, str(src))) from exc
                if existing is not None and existing.digest == info.digest:
                    shutil.rmtree(snap, ignore_errors=True)
                    with self._lock:  # the good content is back: an earlier rejection is stale
                        self.errors.pop(name, None)
                    return existing, False
                version = self._next_version.get(name, 0) + 1
                try:
                    request = self.engine.adapters.load(snap, name=f"{name}@v{version}", copy=False)
                except AdapterError:
                    raise
                except Exception as exc:  # vLLM refused it in add_lora: still the adapter's fault
                    raise AdapterError(f"the engine could not load the adapter: {exc}") from exc
            except BaseException:
                shutil.rmtree(snap, ignore_errors=True)
                raise
            entry = AdapterEntry(
                name, version, request, str(src), snap, info.digest, info.rank, source, shown_path(src, confine_to)
            )
            with self._lock:
                self._next_version[name] = version
                old = self._entries.get(name)
                self._entries[name] = entry
                if old is not None:
                    self._retired.append(old)
                self.errors.pop(name, None)
        if self.metrics is not None:
            self.metrics.adapter_swaps.labels("reload" if old is not None else "load").inc()
        logger.info("serving adapter %s from %s", entry.label, src)
        self.reap()
        return entry, True

    def unload(self, name: str, source: str | None = None) -> AdapterEntry:
        """Stop serving ``name`` (404 if unknown); requests already running finish first."""
        if name in (self.base_name, LIVE_NAME):
            raise APIError(
                400, f"the model {name!r} cannot be unloaded", param="lora_name", code="reserved_name"
            )
        with self._mutate:
            with self._lock:
                entry = self._entries.get(name)
                if entry is None or (source is not None and entry.source != source):
                    raise APIError(
                        404,
                        f"The lora adapter '{name}' cannot be found.",
                        param="lora_name",
                        code="model_not_found",
                    )
                del self._entries[name]
                self._retired.append(entry)
        if self.metrics is not None:
            self.metrics.adapter_swaps.labels("unload").inc()
        logger.info("retired adapter %s", entry.label)
        self.reap()
        return entry

    def reap(self) -> int:
        """Remove retired versions that no unfinished request uses; return how many are still waiting."""
        with self._lock:
            if not self._retired:
                return 0
        in_use = self.loop.call(self.loop.in_use_lora_ids)
        with self._lock:
            done = [e for e in self._retired if e.request.lora_int_id not in in_use]
            self._retired = [e for e in self._retired if e.request.lora_int_id in in_use]
            waiting = len(self._retired)
        for entry in done:
            try:
                self.engine.adapters.unload(entry.request)
            except Exception:  # the engine may have evicted it already
                logger.debug("removing %s from the engine raised", entry.label, exc_info=True)
            shutil.rmtree(entry.snapshot_dir, ignore_errors=True)
        return waiting

    def close(self) -> None:
        """Remove this table's adapters from the engine (once idle) and delete the snapshots."""
        with self._lock:
            self._retired.extend(self._entries.values())
            self._entries.clear()
        if self.reap():
            logger.warning("closing with adapter versions still in use by unfinished requests")
        else:
            shutil.rmtree(self._snapshots, ignore_errors=True)
