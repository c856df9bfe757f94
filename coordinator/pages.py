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
    """Which pages each sequence and each resident adapter holds.

    Unified (the default): KV and adapters draw on one free list. With `adapter_capacity`
    the last that many pages serve adapters only and the rest KV only: S-LoRA's
    "no-unify-mem" ablation, kept to measure what unifying buys.
    """

    num_pages: int
    adapter_capacity: int | None = None
    free: list[int] = field(init=False)
    adapter_free: list[int] = field(init=False)
    seq_pages: dict[int, list[int]] = field(default_factory=dict)
    adapters: OrderedDict[str, ResidentAdapter] = field(default_factory=OrderedDict)  # least recently used first

    def __post_init__(self):
        split = self.num_pages - (self.adapter_capacity or 0)
        if not 0 < split <= self.num_pages:
            raise ValueError(f"adapter_capacity {self.adapter_capacity} leaves no KV pages in a pool of {self.num_pages}")
        self.free = list(range(split - 1, -1, -1))  # pop() hands out low pages first
        self.adapter_free = self.free if self.adapter_capacity is None else list(range(self.num_pages - 1, split - 1, -1))

    @property
    def unified(self) -> bool:
        return self.adapter_free is self.free

    @property
    def kv_capacity(self) -> int:
        return self.num_pages - (self.adapter_capacity or 0)

    def fits(self, kv: int, adapter: int) -> bool:
        if self.unified:
            return kv + adapter <= len(self.free)
        return kv <= len(self.free) and adapter <= len(self.adapter_free)

    def eviction_helps(self, kv: int, adapter: int) -> bool:
        """Would freeing an idle adapter bring (kv, adapter) closer to fitting?"""
        return self.unified or adapter > len(self.adapter_free)

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
        return len(self.free) + (0 if self.unified else len(self.adapter_free))

    @property
    def kv_pages(self) -> int:
        return sum(len(p) for p in self.seq_pages.values())

    @property
    def adapter_pages(self) -> int:
        return sum(len(a.pages) for a in self.adapters.values())

    def check(self) -> None:
        """Raises PageAccountingError unless every page is free or has exactly one owner."""
        owners: dict[int, str] = {}
        for owner, pages in [(f"seq {s}", p) for s, p in self.seq_pages.items()] + \
                            [(f"adapter {a}", r.pages) for a, r in self.adapters.items()] + [("free", self.free)] + \
                            ([] if self.unified else [("adapter free", self.adapter_free)]):
            for page in pages:
                if not 0 <= page < self.num_pages:
                    raise PageAccountingError(f"{owner} holds page {page}, outside the pool of {self.num_pages}")
                if page in owners:
                    raise PageAccountingError(f"page {page} is owned by {owners[page]} and {owner}")
                owners[page] = owner
        if len(owners) != self.num_pages:
            raise PageAccountingError(f"{self.num_pages - len(owners)} pages leaked")
        if not self.unified:
            split = self.kv_capacity
            for a in self.adapters.values():
                if any(p < split for p in a.pages):
                    raise PageAccountingError("an adapter holds a KV-only page")
            if any(p >= split for pages in self.seq_pages.values() for p in pages):
                raise PageAccountingError("a sequence holds an adapter-only page")
