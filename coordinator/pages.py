"""Page accounting for one replica's unified pool (pure Python; the worker holds the tensors).

Every page is free, held by one sequence (one token's KV), or held by one resident
adapter (a chunk of its weights). The scheduler decides, the Step carries the indices,
and every rank of the replica uses the same ones.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


class PageAccountingError(AssertionError):
    """An invariant of the pool broke: a bug, never a user error."""


@dataclass
class ResidentAdapter:
    pages: list[int]
    users: int = 0  # running sequences that use it; it can leave the pool only at 0


@dataclass
class PagePlan:
    """Which pages each sequence and each resident adapter holds: KV and adapters draw on one
    free list (S-LoRA's unified memory). bench/ablations.py derives the separate-pools variant."""

    num_pages: int
    free: list[int] = field(init=False)
    adapter_free: list[int] = field(init=False)  # where adapter pages come from: the same list here
    seq_pages: dict[int, list[int]] = field(default_factory=dict)
    adapters: OrderedDict[str, ResidentAdapter] = field(default_factory=OrderedDict)  # least recently used first

    def __post_init__(self):
        if self.num_pages < 1:
            raise ValueError("the pool has no pages")
        self.free = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low pages first
        self.adapter_free = self.free

    @property
    def kv_capacity(self) -> int:
        """The most pages sequences can ever hold together."""
        return self.num_pages

    @property
    def adapter_capacity(self) -> int:
        """The most pages adapters can ever hold together."""
        return self.num_pages

    def fits(self, kv: int, adapter: int) -> bool:
        return kv + adapter <= len(self.free)

    def eviction_helps(self, kv: int, adapter: int) -> bool:
        """Would freeing an idle adapter bring (kv, adapter) closer to fitting?"""
        return True

    # ------------------------------------------------------------- sequences

    def grow(self, seq_id: int, n: int) -> list[int] | None:
        """n more pages for a sequence, or None (and nothing taken) if they are not free."""
        if n > len(self.free):
            return None
        pages = [self.free.pop() for _ in range(n)]
        self.seq_pages.setdefault(seq_id, []).extend(pages)
        return pages

    def release_seq(self, seq_id: int) -> int:
        pages = self.seq_pages.pop(seq_id, [])
        self.free.extend(pages)
        return len(pages)

    # ------------------------------------------------------------- adapters

    def is_resident(self, name: str) -> bool:
        return name in self.adapters

    def place_adapter(self, name: str, n: int) -> list[int] | None:
        """Pages for a new resident adapter, or None if they are not free."""
        if name in self.adapters:
            raise PageAccountingError(f"adapter {name} is already resident")
        if n > len(self.adapter_free):
            return None
        self.adapters[name] = ResidentAdapter([self.adapter_free.pop() for _ in range(n)])
        return self.adapters[name].pages

    def use_adapter(self, name: str) -> None:
        self.adapters[name].users += 1
        self.adapters.move_to_end(name)

    def unuse_adapter(self, name: str) -> None:
        entry = self.adapters[name]
        if entry.users <= 0:
            raise PageAccountingError(f"adapter {name} released more often than used")
        entry.users -= 1

    def evict_idle_adapter(self, keep: str | None = None) -> str | None:
        """Frees the least recently used adapter that no running sequence uses; returns its name."""
        for name, entry in self.adapters.items():
            if entry.users == 0 and name != keep:
                del self.adapters[name]
                self.adapter_free.extend(entry.pages)
                return name
        return None

    def drop_adapter(self, name: str) -> bool:
        """Frees an adapter's pages now if it is idle (e.g. on unload); False if it is in use."""
        entry = self.adapters.get(name)
        if entry is None or entry.users:
            return False
        del self.adapters[name]
        self.adapter_free.extend(entry.pages)
        return True

    # ------------------------------------------------------------- accounting

    @property
    def free_pages(self) -> int:
        return len(self.free)

    @property
    def kv_pages(self) -> int:
        return sum(len(p) for p in self.seq_pages.values())

    @property
    def adapter_pages(self) -> int:
        return sum(len(a.pages) for a in self.adapters.values())

    def owners(self) -> list[tuple[str, list[int]]]:
        return ([(f"seq {s}", p) for s, p in self.seq_pages.items()] + [(f"adapter {a}", r.pages) for a, r in self.adapters.items()]
                + [("free", self.free)])

    def check(self) -> None:
        """Raises PageAccountingError unless every page is free or has exactly one owner."""
        owners: dict[int, str] = {}
        for owner, pages in self.owners():
            for page in pages:
                if not 0 <= page < self.num_pages:
                    raise PageAccountingError(f"{owner} holds page {page}, outside the pool of {self.num_pages}")
                if page in owners:
                    raise PageAccountingError(f"page {page} is owned by {owners[page]} and {owner}")
                owners[page] = owner
        if len(owners) != self.num_pages:
            raise PageAccountingError(f"{self.num_pages - len(owners)} pages leaked")
