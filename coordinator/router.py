"""Picks a replica for a request: where its adapter is already resident, else the least loaded."""
from __future__ import annotations

from .engine_loop import EngineLoop


class Router:
    def __init__(self, loops: list[EngineLoop], max_num_seqs: int):
        self.loops = loops
        # a replica holding the adapter wins unless it is this much busier than the least loaded
        self.imbalance = max_num_seqs

    def pick(self, adapter: str | None) -> EngineLoop:
        least = min(self.loops, key=lambda r: r.load)
        if adapter is None:
            return least
        for tier in (self._resident, self._registered):
            holders = [r for r in self.loops if tier(r, adapter)]
            if holders:
                best = min(holders, key=lambda r: r.load)
                if best.load - least.load <= self.imbalance:
                    return best
        return least

    @staticmethod
    def _resident(loop: EngineLoop, adapter: str) -> bool:
        return loop.engine.scheduler.plan.is_resident(adapter)

    @staticmethod
    def _registered(loop: EngineLoop, adapter: str) -> bool:
        """Registered, or being registered: concurrent first requests go where the first one went."""
        return loop.engine.registry.known(adapter) or loop.registering(adapter)
