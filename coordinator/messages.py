"""The typed boundary of a replica: the messages front ends send in, the ones that come out,
and the snapshot each replica publishes after every step. Plain frozen dataclasses: they can
be named, logged, compared in tests and pickled to another process."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from ..worker.step import TokenLogprobs
from .sequence import Request


class Code(enum.Enum):
    """Why a request or command failed, named as gRPC names its status codes (front ends map them)."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    UNAUTHENTICATED = "unauthenticated"


# ------------------------------------------------------------- in

@dataclass(frozen=True)
class AddRequest:
    key: int  # the sender's id for the request, unique per replica
    request: Request


@dataclass(frozen=True)
class Abort:
    key: int
    reason: str = "cancelled"  # or "stop": a stop string ended it


@dataclass(frozen=True)
class LoadAdapter:
    reply: int  # answered by a Reply with this id
    name: str
    path: str | None = None  # inside the adapters folder; None: the folder named `name`


@dataclass(frozen=True)
class UnloadAdapter:
    reply: int
    name: str
    timeout: float = 300.0  # seconds its running requests get to finish


@dataclass(frozen=True)
class Shutdown:
    pass


# ------------------------------------------------------------- out

@dataclass(frozen=True)
class Tokens:
    """New tokens of one request; finish_reason (length or stop) on its last ones; logprobs, one
    per token id, when the request asked for them (SamplingParams.logprobs)."""

    key: int
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprobs, ...] | None = None


@dataclass(frozen=True)
class Failed:
    """A request that ended without finishing; no more messages come for it."""

    key: int
    code: Code
    message: str


@dataclass(frozen=True)
class ReplicaDown:
    """The replica failed: every request and command in flight ends with UNAVAILABLE and this message."""

    message: str


@dataclass(frozen=True)
class Reply:
    reply: int
    code: Code | None = None  # None: done
    message: str = ""
    value: object = None


# ------------------------------------------------------------- the snapshot

@dataclass(frozen=True)
class AdapterView:
    name: str
    state: str  # disk, reading, host_ready, resident, unloading or failed
    folder: str
    reason: str | None = None
    rank: int = 0
    targets: tuple[str, ...] = ()
    num_pages: int = 0
    users: int = 0
    requests: int = 0
    version: str = ""


@dataclass(frozen=True)
class ReplicaSnapshot:
    index: int
    healthy: bool = True
    error: str | None = None
    steps: int = 0
    step_adapters: int = 0  # distinct adapters in the last step
    waiting: int = 0  # in the scheduler's queue
    parked: int = 0  # waiting for their adapter to be read
    running: int = 0
    kv_pages: int = 0
    adapter_pages: int = 0
    free_pages: int = 0
    cache_pages: int = 0  # held by the prefix cache (idle ones count as free for admission)
    num_pages: int = 0
    preemptions: int = 0
    adapters: Mapping[str, AdapterView] = field(default_factory=lambda: MappingProxyType({}))
    prefix_tokens: Mapping[str | None, tuple[int, int]] = field(default_factory=lambda: MappingProxyType({}))  # adapter -> (queried, hit)

    @property
    def load(self) -> int:
        """What the router balances: every request the replica has accepted and not finished."""
        return self.waiting + self.parked + self.running

    def holds(self, adapter: str) -> bool:
        view = self.adapters.get(adapter)
        return view is not None and view.state in ("reading", "host_ready", "resident")

    def resident(self, adapter: str) -> bool:
        view = self.adapters.get(adapter)
        return view is not None and view.state == "resident"
