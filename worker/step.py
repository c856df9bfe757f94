"""The Step: the one message from the scheduler to every rank of a replica, once per iteration."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = all tokens
    seed: int | None = None  # the same seed gives the same tokens, whatever else is in the batch


@dataclass
class SeqWork:
    """One sequence's share of a step.

    token_ids: the tokens to run now: the whole prompt when start == 0, else one token.
    start: position of token_ids[0]; 0 (re)starts the sequence and drops any pages the
        worker knew for it (a preempted sequence is recomputed from 0).
    new_pages: one KV page per token of token_ids, appended to the sequence's page list.
    adapter: the adapter's name, or None for the base model.
    sampling: sent with start == 0 only; the worker keeps it for later steps.
    """

    seq_id: int
    token_ids: list[int]
    start: int
    new_pages: list[int]
    adapter: str | None = None
    sampling: SamplingParams | None = None


@dataclass
class Step:
    """seqs: every sequence that runs now; rank 0 returns one sampled token per entry, in order.
    load_adapters: adapter name -> the pages to write it into before running.
    evicted_adapters: adapters whose pages the scheduler has taken back.
    finished: sequences the worker can forget (their pages are free again).
    prefetch_adapters: adapters of the next waiting requests, in queue order, that are not in
        the pool: the worker starts reading those missing from its host cache in the background,
        so that loading them later does not wait on the disk. A hint: nothing depends on it.
    """

    seqs: list[SeqWork] = field(default_factory=list)
    load_adapters: dict[str, list[int]] = field(default_factory=dict)
    evicted_adapters: list[str] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    prefetch_adapters: list[str] = field(default_factory=list)
