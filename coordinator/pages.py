"""Page accounting for one replica's unified pool (pure Python; the worker holds the tensors).

Every page is free, held by one sequence (one token's KV), held by the prefix cache (one
token's KV, which any number of sequences may read), or held by one resident adapter (a chunk
of its weights). The scheduler decides, the Step carries the indices, and every rank of the
replica uses the same ones. Idle cached pages count as free for whoever needs pages: they are
taken back first, before any adapter or running sequence is touched. The one exception: when no
run of free pages is long enough for a new adapter, an idle adapter whose pages would make one
leaves first (Scheduler._admit; FreePages says why runs matter).
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .prefix_cache import CacheKey, Node, PrefixCache


class PageAccountingError(AssertionError):
    """An invariant of the pool broke: a bug, never a user error."""


class FreePages:
    """The free pages of a pool (or of one part of it): sequences take the lowest, adapters the
    highest run of consecutive pages that is long enough.

    Runs matter on the CPU: cpu_lora.c reads an adapter target that lies in consecutive pages at
    one address with plain, prefetched loads, 2.5x as fast as a walk page by page (bench/kernels.py
    --from-memory). Taking KV pages from the bottom and adapters from the top keeps the two apart,
    so the pages an adapter gives back are a run for the next one. A bytearray marks the free pages
    (bytearray.rfind finds a run in C); a heap orders them for sequences, and its entries for pages
    an adapter took meanwhile are skipped when they come up."""

    def __init__(self, pages: Iterable[int], num_pages: int):
        self._marks = bytearray(num_pages)  # 1: free
        self._heap: list[int] = []
        self._count = 0
        self.extend(pages)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        return (page for page, free in enumerate(self._marks) if free)

    def take(self, n: int) -> list[int]:
        """The n lowest free pages."""
        self._check_count(n)
        pages, marks, heap = [], self._marks, self._heap
        while len(pages) < n:
            page = heapq.heappop(heap)
            if marks[page]:
                marks[page] = 0
                pages.append(page)
        self._count -= n
        return pages

    def extend(self, pages: Iterable[int]) -> None:
        for page in pages:
            if self._marks[page]:
                raise PageAccountingError(f"page {page} is freed twice")
            self._marks[page] = 1
            self._count += 1
            heapq.heappush(self._heap, page)
        if len(self._heap) > 2 * self._count + 1024:  # mostly pages adapters took: rebuild (sorted is a heap)
            self._heap = list(self)

    def has_run(self, n: int) -> bool:
        return self._marks.find(b"\x01" * n) >= 0

    def run_if_freed(self, pages: list[int], n: int) -> bool:
        """Would freeing `pages` (held, ascending) leave n consecutive free pages?"""
        base = max(0, pages[0] - n)
        window = bytearray(self._marks[base:pages[-1] + n + 1])
        for page in pages:
            window[page - base] = 1
        return window.find(b"\x01" * n) >= 0

    def take_run(self, n: int) -> list[int]:
        """n pages, ascending: the highest n consecutive free pages, or where no run is that long,
        the n highest free pages."""
        self._check_count(n)
        at = self._marks.rfind(b"\x01" * n)
        if at >= 0:
            pages = list(range(at, at + n))
        else:
            pages, end = [], len(self._marks)
            while len(pages) < n:
                end = self._marks.rfind(1, 0, end)
                pages.append(end)
            pages.reverse()
        for page in pages:
            self._marks[page] = 0
        self._count -= n
        return pages

    def _check_count(self, n: int) -> None:
        if n > self._count:
            raise PageAccountingError(f"{n} pages taken where {self._count} are free")


@dataclass
class ResidentAdapter:
    pages: list[int]
    users: int = 0  # running sequences that use it; it can leave the pool only at 0


@dataclass
class PagePlan:
    """Which pages each sequence and each resident adapter holds: KV and adapters draw on the same
    free pages (S-LoRA's unified memory). bench/ablations.py derives the separate-pools variant."""

    num_pages: int
    free: FreePages = field(init=False)
    adapter_free: FreePages = field(init=False)  # where adapter pages come from: the same pages here
    seq_pages: dict[int, list[int]] = field(default_factory=dict)  # every page a sequence reads, in order
    seq_prefix: dict[int, tuple[Node, int]] = field(default_factory=dict)  # its first n pages are the cache's
    cache: PrefixCache = field(default_factory=PrefixCache)
    adapters: OrderedDict[str, ResidentAdapter] = field(default_factory=OrderedDict)  # least recently used first

    def __post_init__(self):
        if self.num_pages < 1:
            raise ValueError("the pool has no pages")
        self.free = FreePages(range(self.num_pages), self.num_pages)
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
        return kv + adapter <= len(self.free) + self.cache.idle_pages

    def _reclaim(self, n: int) -> None:
        """Idle cached pages back to the free list until n are free (or none is idle)."""
        if n > len(self.free):
            self.free.extend(self.cache.evict(n - len(self.free)))

    def eviction_helps(self, kv: int, adapter: int) -> bool:
        """Would freeing an idle adapter bring (kv, adapter) closer to fitting?"""
        return True

    # ------------------------------------------------------------- sequences

    def start_seq(self, seq_id: int, prefix: Node | None = None, depth: int = 0) -> list[int]:
        """A sequence starts reading the cached prefix `prefix` (held already, its first `depth`
        tokens; None: nothing cached); returns that prefix's pages."""
        pages = prefix.path_pages() if prefix is not None else []
        if len(pages) != depth or seq_id in self.seq_pages:
            raise PageAccountingError(f"sequence {seq_id} starts twice or with a prefix of {len(pages)} pages for {depth} tokens")
        self.seq_pages[seq_id] = list(pages)
        if prefix is not None:
            self.seq_prefix[seq_id] = (prefix, depth)
        return pages

    def grow(self, seq_id: int, n: int) -> list[int] | None:
        """n more pages for a sequence, or None (and nothing taken) if they are not free."""
        self._reclaim(n)
        if n > len(self.free):
            return None
        pages = self.free.take(n)
        self.seq_pages.setdefault(seq_id, []).extend(pages)
        return pages

    def share(self, seq_id: int, key: CacheKey, tokens: list[int]) -> None:
        """The sequence has computed the KV of `tokens` (its first len(tokens)): the pages of those
        the cache does not hold yet join it (prefix_cache.PrefixCache.extend)."""
        held, depth = self.seq_prefix.get(seq_id, (None, 0))
        node, depth = self.cache.extend(key, held, depth, tokens, self.seq_pages[seq_id])
        if node is not None:
            self.seq_prefix[seq_id] = (node, depth)

    def release_seq(self, seq_id: int) -> int:
        """Frees the sequence's own pages and lets go of its cached prefix; returns how many it read."""
        pages = self.seq_pages.pop(seq_id, [])
        node, depth = self.seq_prefix.pop(seq_id, (None, 0))
        self.free.extend(pages[depth:])
        self.cache.release(node)
        return len(pages)

    def forget_prefixes(self, adapter: str) -> None:
        """Frees the pages cached under an adapter that no sequence uses any more (on unload)."""
        self.free.extend(self.cache.drop(adapter))

    def clear_cache(self) -> None:
        self.free.extend(self.cache.clear())

    # ------------------------------------------------------------- adapters

    def is_resident(self, name: str) -> bool:
        return name in self.adapters

    def place_adapter(self, name: str, n: int) -> list[int] | None:
        """Pages for a new resident adapter, ascending, in one run where one is free (FreePages); or
        None if n pages are not free."""
        if name in self.adapters:
            raise PageAccountingError(f"adapter {name} is already resident")
        if self.adapter_free is self.free:
            self._reclaim(n)
        if n > len(self.adapter_free):
            return None
        self.adapters[name] = ResidentAdapter(self.adapter_free.take_run(n))
        return self.adapters[name].pages

    def has_adapter_run(self, n: int) -> bool:
        return self.adapter_free.has_run(n)

    def use_adapter(self, name: str) -> None:
        self.adapters[name].users += 1
        self.adapters.move_to_end(name)

    def unuse_adapter(self, name: str) -> None:
        entry = self.adapters[name]
        if entry.users <= 0:
            raise PageAccountingError(f"adapter {name} released more often than used")
        entry.users -= 1

    def evict_idle_adapter(self, keep: str | None = None, run: int = 0) -> str | None:
        """Frees the least recently used adapter that no running sequence uses (with run: the least
        recently used whose pages would leave `run` consecutive pages free); returns its name."""
        for name, entry in self.adapters.items():
            if entry.users == 0 and name != keep and (not run or self.adapter_free.run_if_freed(entry.pages, run)):
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
        """Pages sequences hold on their own (the cached prefixes they read are cache_pages)."""
        return sum(len(p) for p in self.seq_pages.values()) - sum(d for _, d in self.seq_prefix.values())

    @property
    def cache_pages(self) -> int:
        return self.cache.pages

    @property
    def adapter_pages(self) -> int:
        return sum(len(a.pages) for a in self.adapters.values())

    def owners(self) -> list[tuple[str, list[int]]]:
        own = [(f"seq {s}", p[self.seq_prefix.get(s, (None, 0))[1]:]) for s, p in self.seq_pages.items()]
        return (own + [(f"adapter {a}", r.pages) for a, r in self.adapters.items()]
                + [(f"cache {node.key}", node.pages) for node in self.cache.nodes()] + [("free", list(self.free))])

    def check(self) -> None:
        """Raises PageAccountingError unless every page is free or has exactly one owner, and every
        sequence reads the cached pages of the prefix it holds."""
        held: dict[Node, int] = {}
        for seq_id, (node, depth) in self.seq_prefix.items():
            held[node] = held.get(node, 0) + 1
            if self.seq_pages[seq_id][:depth] != node.path_pages():
                raise PageAccountingError(f"sequence {seq_id} does not read the pages of the prefix it holds")
        try:
            self.cache.check(held)
        except AssertionError as e:
            raise PageAccountingError(f"prefix cache: {e}") from None
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
