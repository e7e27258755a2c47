"""Two cache tiers between the adapters folder and the batched LoRA layers.

    disk ──(loader thread: read + validate)──► host memory ──(engine thread)──► device slot

- Host tier: an LRU of loaded ``Adapter``s keyed by version, bounded by count and by bytes.
  Misses are loaded on a background thread, so the engine never waits on disk; when a load
  lands the engine is woken to admit the requests that waited for it.
- Device tier: the slot table of ``loraserve.adapters.lora.LoRASlotTable``
  (``--max-active-adapters`` slots). A slot is pinned while any running sequence uses it;
  eviction picks the least recently used *unpinned* slot, and only once the newcomer is
  loaded and validated, so a broken file never costs a working adapter its slot. When every
  slot is pinned the request waits in the queue: more adapters than slots are all served,
  taking turns.

A failed load is remembered per version with a growing back-off (``RETRY_AFTER`` doubling up to
``RETRY_MAX``): while it lasts, requests for that version fail at once with the reason instead of
waiting; after it, the next request tries the disk again, so a transient failure (permissions
fixed, a disk hiccup) heals without a restart and a permanent one costs one read per back-off.
A refresh that finds the file valid again (the watcher retries unreadable files) ends the
back-off at once.

``acquire`` / ``release`` / ``set_row_slots`` run on the engine thread only (slot writes must
not race a forward); the host tier is shared with the loader and is locked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from loraserve.adapters.format import Adapter, InvalidAdapter
from loraserve.adapters.lora import LoRASlotTable, Route
from loraserve.server.errors import AdapterUnavailable
from loraserve.server.registry import AdapterEntry, AdapterRegistry

log = logging.getLogger(__name__)

RETRY_AFTER = 1.0  # seconds before a failed load of a version is tried again; doubles
RETRY_MAX = 30.0


class HostCache:
    """LRU of adapters in host memory, bounded by count and by total bytes."""

    def __init__(self, max_adapters: int, max_bytes: int, metrics=None):
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.on_evict: Callable[[str], None] | None = None  # called with the evicted version
        self._items: OrderedDict[str, Adapter] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, version: str) -> Adapter | None:
        with self._lock:
            adapter = self._items.get(version)
            if adapter is not None:
                self._items.move_to_end(version)
            return adapter

    def put(self, adapter: Adapter) -> None:
        """Insert as most recent, evicting the least recent until both bounds hold. The newest
        entry always stays, even alone over the byte bound: a waiting request needs it."""
        with self._lock:
            if adapter.version in self._items:
                self._items.move_to_end(adapter.version)
                return
            self._items[adapter.version] = adapter
            self._bytes += adapter.nbytes
            while len(self._items) > 1 and (
                len(self._items) > self.max_adapters or self._bytes > self.max_bytes
            ):
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
                if self.metrics is not None:
                    self.metrics.observe_eviction("host")
                if self.on_evict is not None:
                    self.on_evict(old.version)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def versions(self) -> set[str]:
        with self._lock:
            return set(self._items)


class AdapterCache:
    """What the engine calls to get an adapter into a device slot."""

    def __init__(
        self,
        registry: AdapterRegistry,
        table: LoRASlotTable,
        host: HostCache,
        device: torch.device | str = "cpu",
        metrics=None,
        wake: Callable[[], None] | None = None,
        load_threads: int = 2,
        prefetch: int | None = None,
    ):
        self.registry = registry
        self.table = table
        self.host = host
        self.device = torch.device(device)
        self.metrics = metrics
        self.wake = wake or (lambda: None)
        self._loader = ThreadPoolExecutor(load_threads, thread_name_prefix="loraserve-load")
        # disk loads one admission pass may ask for (None: no bound); see begin_admission
        self.prefetch = prefetch
        self._wanted: dict[str, int] = {}  # version -> bytes, waited for in this pass
        self._loading: set[str] = set()  # versions with a load in flight
        self._read_for: set[str] = set()  # read from disk for a request, not placed yet
        host.on_evict = self._forget
        registry.on_published = self._forgive
        # version -> (why its load failed, when to try again, the back-off that gave it)
        self._failed: dict[str, tuple[str, float, float]] = {}
        self._lock = threading.Lock()
        # device tier, engine thread only
        n = table.num_slots
        self._free = list(range(n, 0, -1))
        self._slot_of: dict[str, int] = {}  # version -> slot
        self._version_in: dict[int, str] = {}  # slot -> version
        self._refs: dict[int, int] = {}  # slot -> running sequences using it
        self._idle: OrderedDict[int, None] = OrderedDict()  # unpinned filled slots, LRU first
        self._on_device: frozenset[str] = frozenset()  # snapshot other threads may read

    # ------------------------------------------------------------ engine thread

    def resolve(self, name: str) -> AdapterEntry:
        return self.registry.resolve(name)

    def begin_admission(self) -> None:
        """The engine starts a pass over its queue (arrival order). The adapters one pass waits
        for (loading, or in host memory waiting for a device slot) are bounded by ``prefetch``;
        past it, adapters missing from host memory are not read from disk yet. Without the
        bound a deep queue of long-tail adapters loads them all at once, each load evicting
        one read a moment earlier that still waits for a slot, and the host tier thrashes
        (the load bench saw 4 disk reads per request)."""
        self._wanted.clear()

    def acquire(self, name: str) -> tuple[int, str] | None:
        """Pin a device slot holding ``name``'s current version: ``(slot, version)``, or None
        while it is loading or every slot is pinned. Raises if the adapter is gone or broken."""
        entry = self.registry.resolve(name)
        slot = self._slot_of.get(entry.version)
        if slot is not None:
            self._pin(slot)
            self._count("device", hit=True)
            return slot, entry.version
        adapter = self.host.get(entry.version)
        if adapter is None:
            if self._over_prefetch(entry):
                return None  # a later pass loads it, once requests before it are placed
            self._wanted[entry.version] = entry.nbytes
            self._load_in_background(entry)
            return None
        slot = self._free_slot()
        if slot is None:
            self._wanted[entry.version] = entry.nbytes  # in host memory, waiting for a slot
            return None  # all slots pinned by running sequences: wait for one to finish
        try:
            self._fill(slot, adapter)
        except BaseException:  # never lose the slot (or leave half an adapter in it)
            self.table.clear(slot)
            self._free.append(slot)
            raise
        with self._lock:
            from_disk = entry.version in self._read_for
            self._read_for.discard(entry.version)
        self._count("host", hit=not from_disk)
        self._count("device", hit=False)
        self._pin(slot)
        return slot, entry.version

    def _over_prefetch(self, entry: AdapterEntry) -> bool:
        """Would reading ``entry`` now take the adapters this pass waits for past what host
        memory holds at once (count, or half its bytes), or past ``prefetch``? The first one
        waited for is always allowed, so the queue's head is never held back."""
        if self.prefetch is None or entry.version in self._wanted or not self._wanted:
            return False
        if len(self._wanted) >= self.prefetch:
            return True
        return sum(self._wanted.values()) + entry.nbytes > self.host.max_bytes // 2

    def release(self, slot: int) -> None:
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._idle[slot] = None  # most recently used end

    def set_row_slots(self, row_slots: list[Route], seq_len: int, device) -> None:
        self.table.set_row_slots(row_slots, seq_len, device)

    def resident(self) -> dict[str, int]:
        """Adapters per tier, for metrics and ``ListAdapters`` (any thread)."""
        return {"device": len(self._on_device), "host": len(self.host)}

    def device_versions(self) -> frozenset[str]:
        """Versions in device slots (any thread)."""
        return self._on_device

    def _pin(self, slot: int) -> None:
        self._refs[slot] = self._refs.get(slot, 0) + 1
        self._idle.pop(slot, None)

    def _free_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        if not self._idle:
            return None
        slot, _ = self._idle.popitem(last=False)
        old = self._version_in.pop(slot)
        del self._slot_of[old]
        self._on_device = frozenset(self._slot_of)
        if self.metrics is not None:
            self.metrics.observe_eviction("device")
        return slot

    def _fill(self, slot: int, adapter: Adapter) -> None:
        dev = self.device
        self.table.fill(
            slot,
            {n: (w.A.to(dev), w.B.to(dev), w.scale) for n, w in adapter.modules.items()},
        )
        self._slot_of[adapter.version] = slot
        self._version_in[slot] = adapter.version
        self._on_device = frozenset(self._slot_of)

    # ------------------------------------------------------------ host tier, loader thread

    def _load_in_background(self, entry: AdapterEntry) -> None:
        with self._lock:
            failed = self._failed.get(entry.version)
            if failed is not None and time.monotonic() < failed[1]:
                raise AdapterUnavailable(entry.name, failed[0])
            if entry.version in self._loading:
                return
            self._loading.add(entry.version)
        self._loader.submit(self._load, entry)

    def _load(self, entry: AdapterEntry) -> None:
        try:
            adapter = self.registry.load(entry)
            with self._lock:  # before it is visible: the engine may place it at once
                self._read_for.add(adapter.version)
                self._failed.pop(entry.version, None)
            self.host.put(adapter)
        except Exception as err:  # whatever it was, this version fails alone, and not forever
            reason = (
                str(err)
                if isinstance(err, (InvalidAdapter, OSError))
                else f"{type(err).__name__}: {err}"
            )
            with self._lock:
                previous = self._failed.get(entry.version)
                backoff = RETRY_AFTER if previous is None else min(2 * previous[2], RETRY_MAX)
                self._failed[entry.version] = (reason, time.monotonic() + backoff, backoff)
            log.warning(
                "loading adapter %s version %s failed (next try in %.0fs at the earliest): %s",
                entry.name,
                entry.version,
                backoff,
                reason,
            )
            self.registry.refresh(entry.name)
        finally:
            with self._lock:
                self._loading.discard(entry.version)
            self.wake()

    def _forgive(self, entry: AdapterEntry) -> None:
        """The registry just read ``entry``'s file and found it valid (a fixed permission, say):
        its earlier failed loads no longer hold, whatever their back-off."""
        with self._lock:
            self._failed.pop(entry.version, None)

    def _forget(self, version: str) -> None:
        """Host memory dropped ``version``: a later placement of it is a disk read again."""
        with self._lock:
            self._read_for.discard(version)

    def _count(self, tier: str, hit: bool) -> None:
        if self.metrics is not None:
            self.metrics.observe_cache(tier, hit)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
