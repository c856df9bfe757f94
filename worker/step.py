"""The Step: the one message from the scheduler to every rank of a replica, once per iteration."""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top candidates a request may ask for per token


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = all tokens
    seed: int | None = None  # the same seed gives the same tokens, whatever else is in the batch
    logprobs: int = 0  # > 0: return the sampled token's logprob and this many top candidates (<= MAX_LOGPROBS)


@dataclass(frozen=True)
class TokenLogprobs:
    """One sampled token's log-probability and the top candidates', from the log-softmax of the
    float32 logits before temperature; top_ids are in descending order of top_logprobs."""

    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class Sampled:
    """What rank 0 returns for a step: one token per sequence of Step.seqs, in order, and its
    TokenLogprobs where that sequence asked for them (None for the others; None when none asked)."""

    tokens: list[int]
    logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class SeqWork:
    """One sequence's share of a step.

    token_ids: the tokens to run now, at positions start .. start + len - 1: a chunk of the
        prompt (the whole prompt when it fits the step's token budget), or one token to decode.
        A chunk attends to the sequence's earlier pages and to itself, causally.
    start: position of token_ids[0]: the number of tokens whose KV the sequence has already.
    new_pages: one KV page per token of token_ids, appended to the sequence's page list.
    adapter: the adapter's name, or None for the base model.
    sampling: sent with the first chunk only; the worker keeps it for later steps.
    prefix: set on a sequence's first chunk only (a start, or a restart after preemption, which
        drops any pages the worker knew for it): the pages that hold the KV of its first `start`
        tokens, from the prefix cache (shared with other sequences, never written); [] when
        nothing was cached.
    """

    seq_id: int
    token_ids: list[int]
    start: int
    new_pages: list[int]
    adapter: str | None = None
    sampling: SamplingParams | None = None
    prefix: list[int] | None = None


@dataclass
class Step:
    """seqs: every sequence that runs now; rank 0 returns one sampled token per entry, in order
        (the scheduler drops the token of a chunk that ends before the sequence's last token).
    load_adapters: adapter name -> the pages to write its host copy into before running.
    evicted_adapters: adapters whose pages the scheduler has taken back (host copies stay).
    dropped_adapters: adapters whose host copies the coordinator no longer needs.
    finished: sequences the worker can forget (their pages are free again).
    """

    seqs: list[SeqWork] = field(default_factory=list)
    load_adapters: dict[str, list[int]] = field(default_factory=dict)
    evicted_adapters: list[str] = field(default_factory=list)
    dropped_adapters: list[str] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.seqs or self.load_adapters or self.evicted_adapters or self.dropped_adapters or self.finished)


class StepError(RuntimeError):
    """A Step that disagrees with the ones before it: a bug in the scheduler, never a user error."""


@dataclass
class PageTables:
    """What a rank knows of its pool, built from Steps alone: each sequence's pages and sampling,
    and each resident adapter's pages. Every rank applies the same Steps, so every rank agrees
    with the scheduler; tests apply Steps to one of these to check exactly that."""

    seq_pages: dict[int, list[int]] = field(default_factory=dict)
    sampling: dict[int, SamplingParams] = field(default_factory=dict)
    adapter_pages: dict[str, list[int]] = field(default_factory=dict)

    def apply(self, step: Step) -> None:
        for seq_id in step.finished:
            self.seq_pages.pop(seq_id, None)
            self.sampling.pop(seq_id, None)
        for name in step.evicted_adapters:
            self.adapter_pages.pop(name, None)
        self.adapter_pages.update((name, list(pages)) for name, pages in step.load_adapters.items())
        for w in step.seqs:
            if len(w.new_pages) != len(w.token_ids):
                raise StepError(f"sequence {w.seq_id}: {len(w.token_ids)} tokens but {len(w.new_pages)} new pages")
            if w.prefix is not None:
                self.seq_pages[w.seq_id] = list(w.prefix)
                self.sampling[w.seq_id] = w.sampling or SamplingParams()
            pages = self.seq_pages.get(w.seq_id)
            if pages is None or len(pages) != w.start:
                raise StepError(f"sequence {w.seq_id} continues at {w.start} but {0 if pages is None else len(pages)} pages are known")
            if w.adapter is not None and w.adapter not in self.adapter_pages:
                raise StepError(f"sequence {w.seq_id} runs with adapter {w.adapter!r}, which is not in the pool")
            pages += w.new_pages
