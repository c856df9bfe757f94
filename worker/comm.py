"""The collectives of one tensor-parallel group, counted as they run.

Every collective of the model is a visible call on a `Comm`. A group of one rank
does no communication; a torch.distributed group (gloo on CPU, NCCL on CUDA) runs
the same calls. Each call is counted by kind, with the elements it moved, so tests
and benchmarks can check the communication the design promises.
"""
from __future__ import annotations

from collections import Counter

import torch


class Comm:
    """A tensor-parallel group of `size` ranks; this one is `rank`."""

    def __init__(self, rank: int = 0, size: int = 1, group=None):
        self.rank, self.size, self.group = rank, size, group
        self.calls: Counter[str] = Counter()
        self.elements: Counter[str] = Counter()

    def reset_counts(self) -> None:
        self.calls.clear()
        self.elements.clear()

    def _count(self, kind: str, t: torch.Tensor) -> None:
        self.calls[kind] += 1
        self.elements[kind] += t.numel()

    def all_reduce(self, t: torch.Tensor, kind: str = "all_reduce") -> torch.Tensor:
        """Sums `t` over the group, in place; returns it."""
        if self.size == 1:
            return t
        self._count(kind, t)
        torch.distributed.all_reduce(t, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor, kind: str = "all_gather") -> torch.Tensor:
        """(..., n) on each rank -> (..., size * n), rank-major along the last dim."""
        if self.size == 1:
            return t
        self._count(kind, t)
        out = t.new_empty((self.size * t.shape[0],) + tuple(t.shape[1:]))
        torch.distributed.all_gather_single(out, t.contiguous(), group=self.group)
        return torch.movedim(out.unflatten(0, (self.size, t.shape[0])), 0, -2).flatten(-2)
