"""Picks a replica for a request from what the replicas publish: one whose pool holds the
adapter, else one that holds it in host memory or is reading it, else the one its adapter
was last sent to, else the least loaded; only healthy replicas."""
from __future__ import annotations

from collections import OrderedDict

from .replica import ReplicaHandle

RECENT = 10_000  # adapters whose last replica is remembered


class Router:
    def __init__(self, replicas: list[ReplicaHandle], max_num_seqs: int):
        self.replicas = replicas
        # a replica holding the adapter wins unless it is this much busier than the least loaded
        self.imbalance = max_num_seqs
        self._last: OrderedDict[str, ReplicaHandle] = OrderedDict()

    def healthy(self) -> list[ReplicaHandle]:
        return [r for r in self.replicas if r.snapshot.healthy]

    def pick(self, adapter: str | None) -> ReplicaHandle | None:
        """None when no replica is serving."""
        healthy = self.healthy()
        if not healthy:
            return None
        least = min(healthy, key=lambda r: r.in_flight)
        choice = least if adapter is None else self._holder(adapter, healthy, least)
        if adapter is not None:
            self._last[adapter] = choice
            self._last.move_to_end(adapter)
            if len(self._last) > RECENT:
                self._last.popitem(last=False)
        return choice

    def _holder(self, adapter: str, healthy: list[ReplicaHandle], least: ReplicaHandle) -> ReplicaHandle:
        last = self._last.get(adapter)
        # the snapshot lags the messages: concurrent first requests go where the first one went
        tiers = ([r for r in healthy if r.snapshot.resident(adapter)], [r for r in healthy if r.snapshot.holds(adapter)],
                 [last] if last in healthy else [])
        for holders in tiers:
            if holders:
                best = min(holders, key=lambda r: r.in_flight)
                if best.in_flight - least.in_flight <= self.imbalance:
                    return best
        return least
