"""One rank's adapters: packed copies in host memory, and which of them the pool holds.

The coordinator decides everything: which adapter is read (`read`, on a loader thread,
while steps run), which host copy is dropped (`Step.dropped_adapters`) and which pages an
adapter is written to (`Step.load_adapters`). The store never evicts on its own and never
touches the disk inside a step, so every rank of a replica holds the same adapters.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import read_adapter
from .config import ModelConfig
from .loader import Shard
from .lora import AdapterLayout, pack_adapter, plan_layout


@dataclass(frozen=True)
class AdapterInfo:
    """What the coordinator learns when a rank has read an adapter."""

    name: str
    rank: int
    targets: tuple[str, ...]
    num_pages: int
    host_bytes: int  # this rank's packed copy in host memory
    version: str  # a hash of the files' contents as read (LoraWeights.version): the prefix cache's key


@dataclass
class PackedAdapter:
    """An adapter as this rank copies it into the pool: packed (layers, num_pages, page_dim)."""

    info: AdapterInfo
    layout: AdapterLayout
    packed: torch.Tensor


class AdapterStore:
    def __init__(self, model_cfg: ModelConfig, shard: Shard, page_dim: int, dtype: torch.dtype, max_rank: int):
        self.model_cfg, self.shard, self.page_dim, self.dtype, self.max_rank = model_cfg, shard, page_dim, dtype, max_rank
        self._items: dict[str, PackedAdapter] = {}
        self._lock = threading.Lock()  # `read` runs on a loader thread while steps look adapters up

    def read(self, name: str, path: str | Path) -> AdapterInfo:
        """Reads, checks and packs an adapter into host memory (replacing an older copy). Raises AdapterError."""
        path = Path(path)
        weights = read_adapter(name, path, self.model_cfg, self.max_rank)
        layout = plan_layout(weights.ranks, weights.scales, self.model_cfg, self.shard, self.page_dim)
        packed = pack_adapter(weights, layout, self.model_cfg, self.shard, self.page_dim, self.dtype)
        info = AdapterInfo(name, weights.rank, tuple(weights.ranks), layout.num_pages,
                           packed.numel() * packed.element_size(), weights.version)
        with self._lock:
            self._items[name] = PackedAdapter(info, layout, packed)
        return info

    def drop(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._items)

    def get(self, name: str) -> PackedAdapter:
        """The host copy of an adapter the coordinator has been told is read; a missing one is a bug."""
        with self._lock:
            item = self._items.get(name)
        if item is None:
            raise RuntimeError(f"adapter {name!r} is not in this rank's host memory; the coordinator "
                               f"must only place adapters that every rank reported as read")
        return item

    def layouts(self, names) -> dict[str, AdapterLayout]:
        return {n: self.get(n).layout for n in names}

