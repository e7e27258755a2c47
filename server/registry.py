"""The adapters folder as a set of named, versioned adapters.

Each entry of ``--adapters DIR`` is one adapter named after it: ``NAME.safetensors`` (a single
file) or ``NAME/`` (a PEFT folder). Dotfiles and ``*.tmp`` / ``*.partial`` are ignored, so a
writer that writes a temp name and renames is never seen half-way.

``refresh(name)`` is the only way the registry changes: it re-reads the entry, and

- valid (parses, sizes match, fits the base model) -> it becomes the current version (its
  content hash); the adapter just read is handed to ``on_loaded`` so the cache starts warm;
- invalid -> the reason is recorded and logged, and a working current version stays current.
  *Every* failure to read an entry lands here, whatever raised it (a reader bug included): the
  adapter is listed with its reason, counted, and its requests get FAILED_PRECONDITION; nothing
  about one file can stop start-up or the watcher. A failure to read the file at all (an
  ``OSError``: permissions, a disk error) is transient: ``transient_errors`` names those
  adapters so the watcher retries them;
- a symbolic link, for the entry or inside a PEFT folder, is refused with that reason: every
  path the server reads stays inside the adapters folder;
- gone -> the adapter is retired: new requests get ``AdapterNotFound``. Requests already running
  hold their own device slot and finish on the weights they started with.

Thread-safe: the watcher refreshes from its thread, the engine resolves from its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraserve.adapters.format import (
    MAX_ADAPTER_BYTES,
    MAX_HEADER_BYTES,
    NAME_RE,
    Adapter,
    InvalidAdapter,
    read_adapter,
)
from loraserve.server.errors import AdapterNotFound, AdapterUnavailable

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".tmp", ".partial")
SINGLE_FILE_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    path: Path
    version: str
    rank: int
    nbytes: int
    chat_template: str | None = None  # the adapter's own, which wins over the base model's


def adapter_name_for(directory: Path, path: Path) -> str | None:
    """The adapter a path inside ``directory`` belongs to, or None if it is not an adapter's."""
    # absolute, not resolved: a symlink in the folder is named after itself (and refused)
    try:
        rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(directory))
    except ValueError:
        return None
    if not rel.parts:
        return None
    top = rel.parts[0]
    if top.startswith(".") or top.endswith(IGNORED_SUFFIXES):
        return None
    if len(rel.parts) > 1:  # a file inside a PEFT folder
        if rel.parts[-1].startswith(".") or rel.parts[-1].endswith(IGNORED_SUFFIXES):
            return None
        name = top
    elif top.endswith(SINGLE_FILE_SUFFIX):
        name = top[: -len(SINGLE_FILE_SUFFIX)]
    elif (directory / top).is_dir() or not (directory / top).exists():
        name = top  # a folder, or something that was one and is gone
    else:
        return None
    return name if NAME_RE.fullmatch(name) else None


class AdapterRegistry:
    def __init__(
        self,
        directory: str | Path,
        check: Callable[[Adapter], None],
        on_loaded: Callable[[Adapter], None] | None = None,
        metrics=None,
        max_bytes: int = MAX_ADAPTER_BYTES,
        max_header_bytes: int = MAX_HEADER_BYTES,
    ):
        self.directory = Path(directory)
        self.max_bytes = max_bytes  # larger files are refused before they are read
        self.max_header_bytes = max_header_bytes  # JSON parsing holds the GIL: keep it small
        # called with each entry a refresh found valid (a fixed file clears its failed loads)
        self.on_published: Callable[[AdapterEntry], None] | None = None
        # one reader at a time per name (watcher and loader threads): versions land in order
        self._name_locks: dict[str, threading.RLock] = {}
        self.check = check  # raises InvalidAdapter when an adapter does not fit the base model
        self.on_loaded = on_loaded
        self.metrics = metrics
        self._lock = threading.Lock()
        self._current: dict[str, AdapterEntry] = {}
        self._errors: dict[str, str] = {}  # name -> why its newest file was refused
        self._transient: set[str] = set()  # names whose error was a failure to read at all

    # ------------------------------------------------------------ reading the folder

    def scan(self) -> None:
        """Register every adapter in the folder (start-up), and retire the ones that are gone."""
        names = {n for p in self.directory.iterdir() if (n := adapter_name_for(self.directory, p))}
        with self._lock:
            names |= set(self._current) | set(self._errors)
        for name in sorted(names):
            self.refresh(name)

    def path_for(self, name: str) -> Path | None:
        single = self.directory / f"{name}{SINGLE_FILE_SUFFIX}"
        folder = self.directory / name
        for path in (single, folder):
            if path.is_symlink():
                raise InvalidAdapter(
                    f"{path.name} is a symbolic link; links are not followed (an adapter must "
                    "live inside the adapters folder: copy or move it there)"
                )
        if folder.is_dir():
            inside = [p.name for p in folder.iterdir() if p.is_symlink()]
            if inside:
                raise InvalidAdapter(
                    f"{folder.name}/{inside[0]} is a symbolic link; links are not followed "
                    "(every file of an adapter must live inside the adapters folder)"
                )
        if single.is_file() and folder.is_dir():
            raise InvalidAdapter(f"both {single.name} and {folder.name}/ exist; keep one")
        if single.is_file():
            return single
        if folder.is_dir():
            return folder
        return None

    def refresh(self, name: str) -> AdapterEntry | None:
        """Re-read one adapter from disk; returns its current entry (None once retired)."""
        with self._lock_for(name):
            return self._refresh(name)

    def _refresh(self, name: str) -> AdapterEntry | None:
        try:
            path = self.path_for(name)
            if path is None:
                self._retire(name)
                return None
            adapter = self.load_path(path, name)
        except InvalidAdapter as err:
            self._refuse(name, str(err))
            return self.current(name)
        except OSError as err:  # vanished or unreadable between listing and reading
            self._refuse(name, f"cannot read: {err}", transient=True)
            return self.current(name)
        except Exception as err:  # a reader bug: this file fails, never the server
            log.exception("reading adapter %s failed unexpectedly", name)
            self._refuse(name, f"could not be read ({type(err).__name__}: {err})")
            return self.current(name)
        return self._publish(name, path, adapter)

    def load_path(self, path: Path, name: str) -> Adapter:
        """Read and validate; records load metrics. Raises ``InvalidAdapter``."""
        t0 = time.perf_counter()
        try:
            adapter = read_adapter(
                path, name, max_bytes=self.max_bytes, max_header_bytes=self.max_header_bytes
            )
            self.check(adapter)
        except Exception:
            if self.metrics is not None:
                self.metrics.observe_load("invalid", time.perf_counter() - t0)
            raise
        if self.metrics is not None:
            self.metrics.observe_load("ok", time.perf_counter() - t0)
        return adapter

    def _publish(self, name: str, path: Path, adapter: Adapter) -> AdapterEntry:
        entry = AdapterEntry(
            name, path, adapter.version, adapter.rank, adapter.nbytes, adapter.chat_template
        )
        with self._lock:
            old = self._current.get(name)
            self._current[name] = entry
            self._errors.pop(name, None)
            self._transient.discard(name)
        if self.on_published is not None:
            self.on_published(entry)
        if old is None or old.version != entry.version:
            verb = "deployed" if old is None else f"upgraded from {old.version} to"
            log.info("adapter %s %s version %s (rank %d)", name, verb, entry.version, entry.rank)
            if self.on_loaded is not None:
                self.on_loaded(adapter)
        return entry

    def _refuse(self, name: str, reason: str, transient: bool = False) -> None:
        with self._lock:
            seen = self._errors.get(name) == reason
            self._errors[name] = reason
            if transient:
                self._transient.add(name)
            else:
                self._transient.discard(name)
            kept = self._current.get(name)
        if not seen:
            keeping = f"; still serving version {kept.version}" if kept else ""
            log.warning("adapter %s refused: %s%s", name, reason, keeping)
            if self.metrics is not None:
                self.metrics.observe_invalid_file()

    def _retire(self, name: str) -> None:
        with self._lock:
            old = self._current.pop(name, None)
            self._errors.pop(name, None)
            self._transient.discard(name)
        if old is not None:
            log.info("adapter %s retired (version %s)", name, old.version)

    # ------------------------------------------------------------ queries

    def current(self, name: str) -> AdapterEntry | None:
        with self._lock:
            return self._current.get(name)

    def resolve(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self._current.get(name)
            error = self._errors.get(name)
        if entry is not None:
            return entry
        if error is not None:
            raise AdapterUnavailable(name, error)
        raise AdapterNotFound(name)

    def transient_errors(self) -> list[str]:
        """Adapters refused because their file could not be read at all: worth retrying."""
        with self._lock:
            return sorted(self._transient)

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return sorted(self._current.values(), key=lambda e: e.name)

    def errors(self) -> dict[str, str]:
        with self._lock:
            return dict(self._errors)

    def load(self, entry: AdapterEntry) -> Adapter:
        """Read ``entry``'s weights again (a host-cache miss). If the file changed since it was
        registered, refresh the adapter as the watcher would (under the same per-name lock, so
        an older read never lands after a newer one) and return the one now current."""
        with self._lock_for(entry.name):
            adapter = self.load_path(entry.path, entry.name)
        if adapter.version == entry.version:
            return adapter
        current = self.refresh(entry.name)
        if current is None or current.version != adapter.version:
            raise AdapterUnavailable(entry.name, "its file changed while it was being loaded")
        return adapter

    def _lock_for(self, name: str) -> threading.RLock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.RLock())
