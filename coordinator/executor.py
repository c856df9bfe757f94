"""Runs a method on every rank of one replica. Locally (tp=1) that is this process."""
from __future__ import annotations

from ..worker.config import WorkerConfig
from ..worker.worker import Worker


class LocalExecutor:
    """A replica of one rank, in this process."""

    tp = 1

    def __init__(self, cfg: WorkerConfig):
        self.worker = Worker(cfg)

    def call_all(self, method: str, *args) -> list:
        """Calls `method(*args)` on every rank; returns their results, rank 0 first."""
        return [getattr(self.worker, method)(*args)]

    def shutdown(self) -> None:
        self.worker = None
