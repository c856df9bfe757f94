"""The physical unified page pool: one tensor of pages per layer, for KV and adapter weights alike."""
from __future__ import annotations

import torch


class PagePool:
    """pages: (layers, num_pages, page_dim). A page holds one token's K and V for a layer,
    or one chunk of an adapter's flat per-layer vector. The scheduler decides which."""

    def __init__(self, num_layers: int, num_pages: int, page_dim: int, dtype: torch.dtype, device="cpu"):
        if num_pages < 1:
            raise ValueError("the page pool needs at least one page; raise --pool-bytes")
        self.pages = torch.zeros(num_layers, num_pages, page_dim, dtype=dtype, device=device)

    @staticmethod
    def pages_for_bytes(pool_bytes: int, num_layers: int, page_dim: int, dtype: torch.dtype) -> int:
        return pool_bytes // (num_layers * page_dim * dtype.itemsize)

    @property
    def num_pages(self) -> int:
        return self.pages.shape[1]

    def write(self, pages: list[int], packed: torch.Tensor) -> None:
        """packed: (layers, len(pages), page_dim), e.g. an adapter from pack_adapter."""
        index = torch.tensor(pages, dtype=torch.int64, device=self.pages.device)
        self.pages.index_copy_(1, index, packed.to(self.pages.device, self.pages.dtype))
