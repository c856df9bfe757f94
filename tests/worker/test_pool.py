"""The host page pool: zeroed, and on Linux advised onto transparent huge pages before first touch."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from lorafleet.worker.pool import HUGE_PAGE, PagePool, host_pages

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _mapping_fields(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            if inside:
                break
            inside = int(m[1], 16) <= address < int(m[2], 16)
        elif inside and ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


def test_the_pool_is_zeroed_contiguous_and_starts_on_a_huge_page():
    pool = PagePool(num_layers=3, num_pages=5000, page_dim=384, dtype=torch.bfloat16)
    pages = pool.pages
    assert pages.shape == (3, 5000, 384) and pages.dtype == torch.bfloat16 and pages.is_contiguous()
    assert not pages.any(), "a fresh pool holds zeros"
    if sys.platform == "linux":
        assert pages.data_ptr() % HUGE_PAGE == 0
    pages[2, 4999, 383] = 1.0  # the whole extent is writable
    assert float(pages.sum()) == 1.0


def test_a_large_host_pool_is_eligible_for_huge_pages_where_the_kernel_allows_them():
    """THPeligible is the mapping's advice, which the kernel reports whether or not it found free
    huge pages; with THP "never" (or off Linux) the pool is an ordinary tensor."""
    pages = host_pages((4, 4096, 512), torch.float32)  # 32 MiB
    assert pages.shape == (4, 4096, 512) and not pages.any()
    if sys.platform != "linux" or not THP_MODE.exists():
        return
    mode = re.search(r"\[(\w+)\]", THP_MODE.read_text())[1]
    fields = _mapping_fields(pages.data_ptr())
    if "THPeligible" in fields:
        assert fields["THPeligible"] == ("0" if mode == "never" else "1"), (mode, fields)


def test_small_pools_are_plain_tensors():
    pages = host_pages((2, 10, 8), torch.float32)
    assert pages.shape == (2, 10, 8) and not pages.any()


def test_writes_land_on_their_pages_in_a_run_or_scattered():
    pool = PagePool(num_layers=2, num_pages=12, page_dim=4, dtype=torch.bfloat16)
    packed = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # cast on the way in
    pool.write([5, 6, 7], packed)
    pool.write([9, 2, 10], packed + 100)
    expected = torch.zeros(2, 12, 4)
    expected[:, 5:8] = packed
    expected[:, [9, 2, 10]] = packed + 100
    assert torch.equal(pool.pages.float(), expected)
