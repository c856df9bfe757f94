"""The coordinator's adapter registry: names, where they live on disk, what they need in the pool."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..worker.adapters import AdapterError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdapterNotFound(LookupError):
    pass


class AdapterPathDenied(PermissionError):
    pass


@dataclass
class AdapterEntry:
    name: str
    path: Path
    rank: int
    targets: tuple[str, ...]
    num_pages: int
    requests: int = 0


class AdapterRegistry:
    """Adapters live in subfolders of one root; a name is a subfolder (or a name given at load)."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root).resolve() if root else None
        self.entries: dict[str, AdapterEntry] = {}

    def resolve(self, name: str, path: str | None = None) -> Path:
        """The folder for `name`, confined to the root (no '..', no symlink escapes)."""
        if not _NAME.match(name or ""):
            raise AdapterNotFound(f"adapter name {name!r} is not valid: use letters, digits, '.', '_' or '-' (max 128)")
        if self.root is None:
            raise AdapterNotFound(f"adapter {name!r}: the server has no adapters folder (--adapters)")
        candidate = Path(path) if path else Path(name)
        full = (self.root / candidate) if not candidate.is_absolute() else candidate
        real = Path(os.path.realpath(full))
        if real != self.root and self.root not in real.parents:
            raise AdapterPathDenied(f"adapter path {str(path or name)!r} is outside the adapters folder {self.root}")
        if not real.is_dir():
            raise AdapterNotFound(f"adapter {name!r} not found: no folder {real}")
        return real

    def known(self, name: str) -> bool:
        return name in self.entries

    def add(self, name: str, path: Path, info) -> AdapterEntry:
        entry = AdapterEntry(name, path, info.rank, tuple(info.targets), info.num_pages)
        self.entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        self.entries.pop(name, None)


def disk_adapter_summary(root: Path, exclude: set[str], limit: int = 10_000) -> list[dict]:
    """Name, rank and targets of the adapter folders under root, from their configs only."""
    found = []
    for folder in sorted(root.iterdir())[:limit]:
        config = folder / "adapter_config.json"
        if folder.name in exclude or not config.is_file() or not _NAME.match(folder.name):
            continue
        try:
            raw = json.loads(config.read_text())
            targets = raw.get("target_modules") or []
            found.append({"name": folder.name, "rank": int(raw.get("r", 0)),
                          "targets": sorted(targets) if isinstance(targets, list) else [str(targets)]})
        except (ValueError, TypeError, OSError):
            found.append({"name": folder.name, "rank": 0, "targets": []})
    return found


