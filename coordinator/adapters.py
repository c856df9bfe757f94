"""Each replica's one adapter table: every adapter's state, from the first request for it to its unload.

    (not in the table) --request or load--> DISK --read on the loader thread--> READING
    READING --every rank reported it read--> HOST_READY      (the scheduler may place it in the pool)
    READING --a rank refused it--> FAILED (reason kept; the next request reads it again)
    HOST_READY --host memory needed for others, no request uses it--> DISK
    any --unload--> UNLOADING --its last request ends--> (not in the table)

Only the replica's Engine changes the table, driven by messages and by the workers' reports;
snapshots carry a frozen view of it. Host memory is accounted here, as pool pages are in the
scheduler: the workers never evict on their own, so every rank holds the same adapters.
"""
from __future__ import annotations

import enum
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..worker.adapter_store import AdapterInfo
from ..worker.adapters import AdapterError, check_folder
from .request import check_adapter_name

log = logging.getLogger(__name__)


class AdapterNotFound(LookupError):
    pass


class AdapterPathDenied(PermissionError):
    pass


class AdapterState(enum.Enum):
    DISK = "disk"
    READING = "reading"
    HOST_READY = "host_ready"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass
class AdapterEntry:
    name: str
    folder: Path
    state: AdapterState = AdapterState.DISK
    reason: str | None = None  # why it FAILED
    info: AdapterInfo | None = None  # rank 0's report of the last successful read
    users: int = 0  # requests accepted with it that have not finished
    requests: int = 0  # requests accepted with it since it entered the table
    generation: int = 0  # which read a report belongs to: a report for an older one is dropped
    last_used: int = 0
    wanted: bool = False  # a request or a load waits for it to be read
    unloading_from: AdapterState | None = None


class AdapterRoot:
    """Adapters live in subfolders of one root: a name is a subfolder, or a path given at load."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root).resolve() if root else None

    def resolve(self, name: str, path: str | None = None) -> Path:
        """The folder for `name`, confined to the root (no '..', no symlink escapes)."""
        check_adapter_name(name)
        if self.root is None:
            raise AdapterNotFound(f"adapter {name!r}: the server has no adapters folder (--adapters)")
        candidate = Path(path) if path else Path(name)
        real = Path(os.path.realpath(candidate if candidate.is_absolute() else self.root / candidate))
        if real != self.root and self.root not in real.parents:
            raise AdapterPathDenied(f"adapter path {str(path or name)!r} is outside the adapters folder {self.root}")
        if not real.is_dir():
            raise AdapterNotFound(f"adapter {name!r} not found: no folder {real}")
        return real


class AdapterTable:
    def __init__(self, root: str | Path | None, host_capacity_bytes: int):
        self.root = AdapterRoot(root)
        self.capacity = host_capacity_bytes
        self.entries: dict[str, AdapterEntry] = {}
        self.changed: set[str] = set()  # names whose view a snapshot must refresh
        self._clock = 0
        self._reads = 0  # generations are unique in the table, so a report never matches a later entry
        # kept as states change (_move), so that a read's bookkeeping does not walk thousands of entries
        self._ready: dict[str, AdapterEntry] = {}  # HOST_READY
        self._reading: dict[str, AdapterEntry] = {}  # READING
        self._host_bytes = 0  # of the HOST_READY entries
        self._largest = 0  # the largest host copy read so far

    def _move(self, entry: AdapterEntry, state: AdapterState) -> None:
        """Every change of an entry's state goes through here (its info set first when it becomes HOST_READY)."""
        self._leave(entry)
        entry.state = state
        if state == AdapterState.HOST_READY:
            self._host_bytes += entry.info.host_bytes
            self._largest = max(self._largest, entry.info.host_bytes)
            self._ready[entry.name] = entry
        elif state == AdapterState.READING:
            self._reading[entry.name] = entry
        self.changed.add(entry.name)

    def _leave(self, entry: AdapterEntry) -> None:
        """Out of the ready and reading sets and the host bytes, as its state is about to change or it leaves the table."""
        if entry.state == AdapterState.HOST_READY:
            self._host_bytes -= entry.info.host_bytes
        self._ready.pop(entry.name, None)
        self._reading.pop(entry.name, None)

    def get(self, name: str) -> AdapterEntry | None:
        return self.entries.get(name)

    def _touch(self, entry: AdapterEntry) -> None:
        self._clock += 1
        entry.last_used = self._clock
        self.changed.add(entry.name)

    # ------------------------------------------------------------- demand

    def want(self, name: str, path: str | None = None) -> AdapterEntry:
        """The entry a request or a load needs, created on first use; a FAILED one is read again.

        Raises AdapterNotFound / AdapterPathDenied, or FileExistsError when `path` names
        another folder than the one the adapter was loaded from."""
        entry = self.entries.get(name)
        if entry is not None and entry.state == AdapterState.UNLOADING:
            raise AdapterNotFound(f"adapter {name!r} is being unloaded")
        if entry is not None and path is not None:
            folder = self.root.resolve(name, path)
            if folder != entry.folder:
                raise FileExistsError(f"adapter {name!r} is already loaded from {entry.folder}; unload it first")
        if entry is None:
            entry = self.entries[name] = AdapterEntry(name, self.root.resolve(name, path))
        if entry.state == AdapterState.FAILED:
            self._move(entry, AdapterState.DISK)
            entry.reason = None
        entry.wanted = entry.state == AdapterState.DISK
        self._touch(entry)
        return entry

    def start_read(self, name: str) -> tuple[Path, int]:
        entry = self.entries[name]
        self._reads += 1
        entry.generation, entry.wanted = self._reads, False
        self._move(entry, AdapterState.READING)
        return entry.folder, entry.generation

    def reads_due(self) -> list[str]:
        """Adapters a request or a load waits for that no read is bringing yet, least recently wanted first."""
        due = [e for e in self.entries.values() if e.state == AdapterState.DISK and e.wanted]
        return [e.name for e in sorted(due, key=lambda e: e.last_used)]

    # ------------------------------------------------------------- reports

    def read_done(self, name: str, generation: int, info: AdapterInfo) -> bool:
        """Every rank read it; False if the report is for a read that no longer counts."""
        entry = self.entries.get(name)
        if entry is None or entry.generation != generation or entry.state != AdapterState.READING:
            return False
        self._touch(entry)
        if info.host_bytes > self.capacity:
            self.read_failed(name, generation, f"it needs {info.host_bytes} bytes of host memory per rank, more than "
                                               f"--host-cache-bytes ({self.capacity}); raise it")
            return False
        entry.info = info
        self._move(entry, AdapterState.HOST_READY)
        return True

    def read_failed(self, name: str, generation: int, reason: str) -> bool:
        entry = self.entries.get(name)
        if entry is None or entry.generation != generation:
            return False
        if entry.state == AdapterState.UNLOADING:
            return True
        self._move(entry, AdapterState.FAILED)
        entry.reason, entry.info = reason, None
        return True

    # ------------------------------------------------------------- host memory

    @property
    def host_bytes(self) -> int:
        return self._host_bytes

    def expected_bytes(self, entry: AdapterEntry) -> int:
        """Host memory a read of entry will take: its size at an earlier read, else the largest read so far."""
        return entry.info.host_bytes if entry.info else self._largest

    @property
    def reading_bytes(self) -> int:
        """Host memory the reads in flight will take."""
        return sum(self.expected_bytes(e) for e in self._reading.values())

    def over_capacity(self, keep: str | None = None, need: int = 0) -> list[str]:
        """Host copies to drop, least recently used first, so that the rest and `need` more bytes
        fit: only adapters that no request uses (they leave the pool too)."""
        excess = self.host_bytes + self.reading_bytes + need - self.capacity
        if excess <= 0:
            return []
        dropped = []
        idle = sorted((e for e in self._ready.values() if e.users == 0 and e.name != keep), key=lambda e: e.last_used)
        for entry in idle:
            if excess <= 0:
                break
            excess -= entry.info.host_bytes
            self._move(entry, AdapterState.DISK)  # known, not wanted until a request comes
            dropped.append(entry.name)
        return dropped

    # ------------------------------------------------------------- users

    def accepted(self, name: str) -> None:
        entry = self.entries[name]
        entry.users += 1
        entry.requests += 1
        self._touch(entry)

    def released(self, name: str) -> None:
        entry = self.entries.get(name)
        if entry is not None:
            entry.users -= 1
            self.changed.add(name)

    def start_unload(self, name: str) -> AdapterEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise AdapterNotFound(f"adapter {name!r} is not loaded")
        if entry.state == AdapterState.UNLOADING:
            raise FileExistsError(f"adapter {name!r} is already being unloaded")
        entry.unloading_from = entry.state
        self._move(entry, AdapterState.UNLOADING)
        return entry

    def cancel_unload(self, name: str) -> bool:
        """Back to what it was before the unload; False if its host copy is no longer good."""
        entry = self.entries[name]
        kept = entry.unloading_from == AdapterState.HOST_READY
        self._move(entry, AdapterState.HOST_READY if kept else AdapterState.DISK)
        entry.unloading_from = None
        return kept

    def remove(self, name: str) -> None:
        entry = self.entries.pop(name, None)
        if entry is not None:
            self._leave(entry)
        self.changed.add(name)


class DiskCatalog:
    """The adapter folders under the root, from their configs only; rescanned when the folder changes.

    A folder whose config lorafleet would refuse is listed with its reason instead of failing."""

    def __init__(self, root: Path | None, limit: int = 10_000, recheck_every: float = 30.0):
        self.root, self.limit, self.recheck_every = root, limit, recheck_every
        self._stamp: tuple | None = None
        self._items: list[dict] = []
        self._root_mtime: int | None = None
        self._checked_at = -math.inf

    def items(self, recheck: bool = True) -> list[dict]:
        """Every folder's listing. recheck=False (the folder watcher, twice a second) looks at each
        config only if the root changed (a folder added, removed or renamed) or recheck_every
        seconds went by: statting thousands of configs twice a second costs a share of a core."""
        if self.root is None:
            return []
        root_mtime = _mtime(self.root)
        if not recheck and root_mtime == self._root_mtime and time.monotonic() - self._checked_at < self.recheck_every:
            return self._items
        self._root_mtime, self._checked_at = root_mtime, time.monotonic()
        try:
            folders = sorted(p for p in self.root.iterdir() if p.is_dir())[: self.limit]
            stamp = tuple((p.name, _mtime(p / "adapter_config.json")) for p in folders)
        except OSError as e:
            log.warning("cannot list the adapters folder %s: %s", self.root, e)
            return self._items
        if stamp != self._stamp:
            self._items = [self._describe(p) for p in folders if (p / "adapter_config.json").exists()]
            self._stamp = stamp
        return self._items

    @staticmethod
    def _describe(folder: Path) -> dict:
        name = folder.name
        try:
            check_adapter_name(name)
            config = check_folder(name, folder)
            targets = config.get("target_modules") or []
            r = config.get("r", 0)
            return {"name": name, "rank": int(r), "targets": sorted(targets) if isinstance(targets, list) else [str(targets)],
                    "error": None}
        except (AdapterError, ValueError, OSError) as e:
            return {"name": name, "rank": 0, "targets": [], "error": str(e)}


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0
