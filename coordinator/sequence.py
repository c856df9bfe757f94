"""A request as the scheduler tracks it."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ..worker.step import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """What a user asked for, already tokenized and validated."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    adapter: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()  # stop strings: the output processor cuts the text at the first one


@dataclass
class Sequence:
    seq_id: int
    request: Request
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    computed: int = 0  # tokens whose KV is in the sequence's pages
    finish_reason: str | None = None
    error: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    preemptions: int = 0
    passed_over: int = 0  # steps in which a younger request was admitted first (adapter affinity)
    cache_key: tuple[str, str] = ("", "")  # (adapter, its content version) when it last started: the prefix cache's key
    cached_tokens: int = 0  # tokens found in the prefix cache when it last started

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        """The token a decode step runs (O(1): `tokens` copies the whole sequence)."""
        return self.output_ids[-1] if self.output_ids else self.request.prompt_ids[-1]

    @property
    def adapter(self) -> str | None:
        return self.request.adapter

    @property
    def total_len(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)
