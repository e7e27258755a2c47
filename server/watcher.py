"""Watch the adapters folder and refresh the registry when an entry changes.

Two sources of change, one path into the registry (``AdapterRegistry.refresh``):

- ``watchdog`` file-system events (inotify on Linux), for speed;
- a polling rescan every ``poll_interval`` seconds that compares each entry's stat signature
  (size, mtime, ctime, mode, inode of the file or of every file in a PEFT folder), for file
  systems that do not deliver events (NFS, some container volumes) and as a safety net for
  missed ones. ctime and mode make a permissions fix count as a change.

Each poll also retries the adapters whose file could not be read at all (``transient_errors``),
and re-attaches the event watch when the folder itself was deleted and created again (the old
inotify watch died with the old folder; until the next poll, polling alone sees changes).

Events are debounced per adapter: a name is refreshed once no event has touched it for
``debounce`` seconds, so a file being written in place, or a PEFT folder appearing file by file,
is read once it is quiet rather than at every write. A read that still fails is only logged; the
next event or signature change tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from loraserve.server.registry import AdapterRegistry, adapter_name_for

log = logging.getLogger(__name__)

Signature = tuple


def entry_signature(path: Path) -> Signature | None:
    try:
        if path.is_dir() and not path.is_symlink():
            return tuple(
                (p.name, *_stat_signature(p.lstat()))
                for p in sorted(path.iterdir())
                if p.is_file() or p.is_symlink()
            )
        return _stat_signature(path.lstat())
    except OSError:
        return None


def _stat_signature(st) -> Signature:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_ino)


def _folder_identity(directory: Path) -> tuple[int, int] | None:
    try:
        st = directory.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class AdapterWatcher:
    def __init__(
        self,
        registry: AdapterRegistry,
        debounce: float = 0.25,
        poll_interval: float = 5.0,
        use_events: bool = True,
    ):
        self.registry = registry
        self.directory = registry.directory
        self.debounce = debounce
        self.poll_interval = poll_interval
        self.use_events = use_events
        self._due: dict[str, float] = {}  # name -> monotonic time of its last event
        self._signatures: dict[str, Signature] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._observer = None
        self._folder: tuple[int, int] | None = None  # (device, inode) the watch is attached to

    def start(self) -> AdapterWatcher:
        self._signatures = self._scan_signatures()
        self._folder = _folder_identity(self.directory)
        if self.use_events:
            self._observer = self._start_observer()
        self._thread = threading.Thread(target=self._run, name="loraserve-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._stop_observer()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def touch(self, name: str) -> None:
        """Note a change to ``name``; it is refreshed ``debounce`` seconds after the last one."""
        with self._cond:
            self._due[name] = time.monotonic()
            self._cond.notify()

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

    def _reattach(self) -> None:
        """The folder was deleted (and maybe created again): watch the one there now. A new
        folder may reuse the old inode number, so a watch whose emitter stopped (inotify ends
        it when the watched folder goes) counts as gone too."""
        folder = _folder_identity(self.directory)
        dead = self._observer is not None and not all(e.is_alive() for e in self._observer.emitters)
        if folder == self._folder and not dead:
            return
        log.warning(
            "adapters folder %s was %s; %s",
            self.directory,
            "removed" if folder is None else "replaced",
            "polling until it is back" if folder is None else "watching the new one",
        )
        self._folder = folder
        if self.use_events:
            self._stop_observer()
            if folder is not None:
                self._observer = self._start_observer()

    def _start_observer(self):
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover - watchdog is a dependency; polling still works
            log.warning("watchdog unavailable; watching %s by polling only", self.directory)
            return None

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.event_type in ("opened", "closed_no_write"):
                    return
                for p in (event.src_path, getattr(event, "dest_path", "")):
                    if p and (name := adapter_name_for(watcher.directory, Path(p))):
                        watcher.touch(name)

        observer = Observer()
        try:
            observer.schedule(Handler(), str(self.directory), recursive=True)
            observer.start()
        except OSError as err:  # e.g. inotify watch limit reached
            log.warning("file events unavailable for %s (%s); polling only", self.directory, err)
            return None
        return observer

    def _run(self) -> None:
        next_poll = time.monotonic() + self.poll_interval
        while True:
            with self._cond:
                if self._stop:
                    return
                now = time.monotonic()
                ready = [n for n, t in self._due.items() if now - t >= self.debounce]
                for n in ready:
                    del self._due[n]
                if not ready:
                    waits = [t + self.debounce - now for t in self._due.values()]
                    self._cond.wait(timeout=max(0.01, min([next_poll - now, *waits])))
            for name in ready:
                self._refresh(name)
            if time.monotonic() >= next_poll:
                try:
                    self._poll()
                except Exception:  # e.g. the folder unreadable for a moment: poll again later
                    log.exception("scanning %s failed", self.directory)
                next_poll = time.monotonic() + self.poll_interval

    def _refresh(self, name: str) -> None:
        # the signature first: a change after it is seen by the next poll, and the poll does
        # not read again what an event just had read
        signature = self._signature_of(name)
        try:
            self.registry.refresh(name)
        except Exception:  # never let one adapter stop the watcher
            log.exception("refreshing adapter %s failed", name)
        if signature:
            self._signatures[name] = signature
        else:
            self._signatures.pop(name, None)

    def _signature_of(self, name: str) -> Signature:
        paths = [self.directory / f"{name}.safetensors", self.directory / name]
        return tuple(
            sig
            for p in paths
            if adapter_name_for(self.directory, p) == name
            and (sig := entry_signature(p)) is not None
        )

    def _scan_signatures(self) -> dict[str, Signature]:
        sigs = {}
        try:
            entries = list(self.directory.iterdir())
        except OSError:
            return sigs
        for p in sorted(entries, key=lambda p: (p.name.removesuffix(".safetensors"), p.is_dir())):
            name = adapter_name_for(self.directory, p)
            if name and (sig := entry_signature(p)) is not None:
                sigs[name] = sigs.get(name, ()) + (sig,)
        return sigs

    def _poll(self) -> None:
        self._reattach()
        sigs = self._scan_signatures()
        changed = {
            n
            for n in sigs.keys() | self._signatures.keys()
            if sigs.get(n) != self._signatures.get(n)
        }
        self._signatures = sigs
        for name in changed | set(self.registry.transient_errors()):
            self.touch(name)
