"""The host adapter cache: bounded in bytes, least recently used out first."""
from __future__ import annotations

import torch

from lorafleet.worker.adapter_cache import HostAdapterCache, PackedAdapter
from lorafleet.worker.lora import AdapterLayout


def _item(name: str, nbytes: int) -> PackedAdapter:
    return PackedAdapter(name, 1, ("q_proj",), AdapterLayout({}, 0, 1), torch.zeros(nbytes // 4, dtype=torch.float32))


def test_lru_by_bytes():
    cache = HostAdapterCache(capacity_bytes=1000)
    for name in "abc":
        cache.put(_item(name, 300))
    assert cache.names() == ["a", "b", "c"] and cache.bytes == 900
    cache.get("a")  # a is now the most recently used
    cache.put(_item("d", 300))  # b goes
    assert cache.names() == ["c", "a", "d"]
    cache.put(_item("e", 600))  # c and a go
    assert cache.names() == ["d", "e"] and cache.bytes == 900
    cache.put(_item("huge", 4000))  # larger than the whole cache: not kept, nothing evicted for it
    assert "huge" not in cache and cache.names() == ["d", "e"]
    cache.remove("d")
    assert cache.bytes == 600
