"""The host adapter cache: packed adapters in CPU memory, bounded in bytes, least recently used out first."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .lora import AdapterLayout


@dataclass
class PackedAdapter:
    """An adapter as this rank copies it into the pool: packed (layers, num_pages, page_dim)."""

    name: str
    rank: int
    targets: tuple[str, ...]
    layout: AdapterLayout
    packed: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()


class HostAdapterCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self._items: OrderedDict[str, PackedAdapter] = OrderedDict()
        self.bytes = 0

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def get(self, name: str) -> PackedAdapter | None:
        item = self._items.get(name)
        if item is not None:
            self._items.move_to_end(name)
        return item

    def put(self, item: PackedAdapter) -> None:
        """Keeps `item` unless it alone exceeds the capacity; evicts the least recently used to fit."""
        self.remove(item.name)
        if item.nbytes > self.capacity:
            return
        while self.bytes + item.nbytes > self.capacity:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes
        self._items[item.name] = item
        self.bytes += item.nbytes

    def remove(self, name: str) -> None:
        old = self._items.pop(name, None)
        if old is not None:
            self.bytes -= old.nbytes
