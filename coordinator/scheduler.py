"""Iteration-level continuous batching with chunked prefill, page-budget admission and preemption.

Each iteration `schedule()` spends a budget of `max_batched_tokens` tokens, in this order:
1. decode first: one token for every running sequence whose tokens are all computed but the
   last (preempting the newest running sequence when the pool is full);
2. then the running sequences whose prefill is in progress, oldest first, continue with a
   chunk of at most the remaining budget;
3. then waiting sequences are admitted, each with a first chunk of at most the remaining budget,
   while pages, the budget and max_num_seqs allow: first come first served, except that a
   request whose adapter is already in the batch (or that needs none) may go before older ones
   whose adapter is not, so a step touches fewer distinct adapters; a request is passed over so
   in at most `adapter_affinity` steps, then it goes first (0: strictly first come first served).
So a long prompt is prefilled over several steps and never stops the running streams, and
`max_batched_tokens` bounds the tokens of a step, not the length of a prompt.

Pages: a sequence holds one page per token computed so far, plus those of this step's chunk;
admission asks that the sequence's remaining tokens (and a decode page for each running
sequence) are free now, and `add` refuses a request that could never fit the pool or the
context. A chunk that cannot get its pages is skipped for this step (and no one is admitted
after it). Preemption drops a sequence's pages, prefilled in part or not (what it computed joins
the prefix cache first), and recomputes it from the longest prefix still cached (0 without the cache).

Prefix cache (prefix_cache.py): a sequence starts with the longest cached prefix of its
tokens under its adapter's identity (never all of them: its last token runs to give the first
output), so its first chunk starts there; the KV it computes joins the cache after each prefill
chunk and when it ends or is preempted (a preempted sequence often finds its own prefix again).
Idle cached pages are the first to be taken when pages run short (pages.py).

`postprocess()` takes the sampled tokens back: only the chunk that computes a sequence's last
token makes an output; the token the worker sampled for an earlier chunk is dropped. Finished
sequences free their pages at once. Pure Python: no torch, no communication.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from ..worker.step import SeqWork, Step, TokenLogprobs
from .pages import PagePlan
from .sequence import Request, Sequence, Status


AFFINITY_WINDOW = 256  # how far into the queue admission looks for a request whose adapter is in the batch


class RequestTooLarge(ValueError):
    """A request that could never fit the pool or the model's context."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    max_model_len: int = 2048
    prefix_cache: bool = True
    adapter_affinity: int = 0  # steps a request may be passed over for ones whose adapter is in the batch

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.max_batched_tokens < 1 or self.max_model_len < 2:
            raise ValueError("max_num_seqs and max_batched_tokens must be >= 1, max_model_len >= 2")


@dataclass
class Output:
    """One sampled token for a sequence; `finished` marks its last one."""

    seq: Sequence
    token: int
    finished: bool
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass
class Scheduler:
    cfg: SchedulerConfig
    plan: PagePlan
    eos_ids: tuple[int, ...] = ()
    adapter_pages: dict[str, int] = field(default_factory=dict)  # registered adapters -> pages they need
    adapter_versions: dict[str, str] = field(default_factory=dict)  # -> content version (the prefix cache's key)
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)  # in admission order
    _finished_ids: list[int] = field(default_factory=list)
    _evicted: list[str] = field(default_factory=list)
    _scheduled: list[tuple[Sequence, bool, bool]] = field(default_factory=list)  # this step's: (seq, it samples, a prefill chunk)
    _next_id: int = 0
    preemptions: int = 0  # since start, for metrics and tests
    prefix_tokens: dict[str | None, list[int]] = field(default_factory=dict)  # adapter -> [queried, found in the cache]

    # ------------------------------------------------------------- requests

    def add(self, request: Request) -> Sequence:
        need = len(request.prompt_ids) + request.max_new_tokens
        if need > self.cfg.max_model_len:
            raise RequestTooLarge(
                f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) = {need} "
                f"exceeds the model's context of {self.cfg.max_model_len} tokens")
        adapter_need = self.adapter_pages.get(request.adapter, 0) if request.adapter else 0
        plan = self.plan
        if need + adapter_need > plan.num_pages or need > plan.kv_capacity or adapter_need > plan.adapter_capacity:
            raise RequestTooLarge(
                f"the request needs {need} KV pages + {adapter_need} adapter pages, the pool has only "
                f"{plan.num_pages}; lower max_new_tokens or raise --pool-bytes")
        seq = Sequence(self._next_id, request)
        self._next_id += 1
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stops a sequence now; its pages are free before the next step."""
        if seq.status == Status.FINISHED:
            return
        if seq.status == Status.WAITING:
            self.waiting.remove(seq)
            seq.status, seq.finish_reason = Status.FINISHED, reason
            return
        self._finish(seq, reason)

    def unload_adapter(self, name: str, forget_prefixes: bool = False) -> None:
        """Takes an idle adapter's pages back and forgets its size (and, if asked, the KV cached
        under it: on unload; a host copy dropped for room keeps it, it is valid while the weights are)."""
        if self.plan.drop_adapter(name):
            self._evicted.append(name)
        self.adapter_pages.pop(name, None)
        self.adapter_versions.pop(name, None)
        if forget_prefixes:
            self.plan.forget_prefixes(name)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._finished_ids or self._evicted)

    # ------------------------------------------------------------- one iteration

    def schedule(self) -> Step:
        step = Step()
        scheduled: list[tuple[Sequence, SeqWork]] = []
        for seq in list(self.running):
            if seq.status != Status.RUNNING or seq.computed < seq.total_len - 1:
                continue  # preempted earlier in this loop, or its prefill is in progress
            page = self._page_for_decode(seq)
            if page is None:
                continue  # seq itself was preempted
            scheduled.append((seq, SeqWork(seq.seq_id, [seq.last_token], seq.total_len - 1, [page], seq.adapter)))
        budget = self.cfg.max_batched_tokens - len(scheduled)
        admit = True
        for seq in list(self.running):
            if seq.status != Status.RUNNING or seq.computed >= seq.total_len - 1:
                continue  # preempted while its chunk's pages were found, or scheduled above
            if budget <= 0:
                admit = False
                break
            work = self._continue(seq, budget, {s.seq_id for s, _ in scheduled})
            if work is None:
                admit = False  # first come first served: no one overtakes a prefill in progress
                break
            budget -= len(work.token_ids)
            scheduled.append((seq, work))
        in_batch = {None} | {s.adapter for s in self.running}
        passed_over: dict[int, Sequence] = {}
        while admit and budget > 0 and self.waiting and len(self.running) < self.cfg.max_num_seqs:
            at = self._pick(in_batch)
            seq = self.waiting[at]
            work = self._admit(seq, budget, step)
            if work is None:
                break
            passed_over.update((s.seq_id, s) for s in itertools.islice(self.waiting, at))
            del self.waiting[at]
            in_batch.add(seq.adapter)
            budget -= len(work.token_ids)
            scheduled.append((seq, work))
        for seq in passed_over.values():
            seq.passed_over += 1
        scheduled.sort(key=lambda sw: (sw[0].adapter or "", sw[0].seq_id))  # one run of tokens per adapter
        self._scheduled = [(s, s.computed == s.total_len, w.prefix is not None or len(w.token_ids) > 1) for s, w in scheduled]
        step.seqs = [w for _, w in scheduled]
        # finished before or preempted during this schedule: the worker forgets them before running
        step.finished, step.evicted_adapters = self._finished_ids, self._evicted
        self._finished_ids, self._evicted = [], []
        return step

    def _pick(self, in_batch: set[str | None]) -> int:
        """Where in the queue the next admission comes from: the oldest request that needs no adapter
        new to the batch or was passed over in adapter_affinity steps already, among the first
        AFFINITY_WINDOW; else the oldest. So no request is passed over in more than adapter_affinity steps."""
        limit = self.cfg.adapter_affinity
        if limit:
            for at, seq in enumerate(itertools.islice(self.waiting, AFFINITY_WINDOW)):
                if seq.adapter in in_batch or seq.passed_over >= limit:
                    return at
        return 0

    def _page_for_decode(self, seq: Sequence) -> int | None:
        while True:
            pages = self.plan.grow(seq.seq_id, 1)
            if pages is not None:
                seq.computed = seq.total_len
                return pages[0]
            if self.plan.eviction_helps(1, 0) and self._evict_adapter():
                continue
            victim = self.running[-1]  # the newest running sequence gives its pages back
            self._preempt(victim)
            if victim is seq:
                return None

    def _continue(self, seq: Sequence, budget: int, scheduled: set[int]) -> SeqWork | None:
        """The next chunk of a running sequence's prefill, or None if its pages are not free now:
        idle adapters go first, then the newest running sequences not scheduled in this step."""
        start = seq.computed
        n = min(seq.total_len - start, budget)
        while True:
            pages = self.plan.grow(seq.seq_id, n)
            if pages is not None:
                break
            if self.plan.eviction_helps(n, 0) and self._evict_adapter():
                continue
            victim = self.running[-1]
            if victim is seq or victim.seq_id in scheduled:
                return None
            self._preempt(victim)
        seq.computed = start + n
        prompt = seq.request.prompt_ids  # a slice of the prompt alone unless the chunk reaches the outputs
        chunk = prompt[start:start + n] if start + n <= len(prompt) else seq.tokens[start:start + n]
        return SeqWork(seq.seq_id, chunk, start, pages, seq.adapter)

    def _admit(self, seq: Sequence, budget: int, step: Step) -> SeqWork | None:
        """Starts a waiting sequence after its longest cached prefix, with a first chunk of at most
        `budget` tokens."""
        tokens = seq.tokens
        seq.cache_key = (seq.adapter or "", self.adapter_versions.get(seq.adapter, "") if seq.adapter else "")
        prefix, hit = self.plan.cache.match(seq.cache_key, tokens, len(tokens) - 1) if self.cfg.prefix_cache else (None, 0)
        self.plan.cache.hold(prefix)  # before anything below frees pages
        adapter_new = seq.adapter is not None and not self.plan.is_resident(seq.adapter)
        kv_need = len(tokens) - hit + len(self.running)  # all of it, and keep one decode page for each running sequence
        adapter_need = self.adapter_pages[seq.adapter] if adapter_new else 0
        while not self.plan.fits(kv_need, adapter_need):
            if not (self.plan.eviction_helps(kv_need, adapter_need) and self._evict_adapter(keep=seq.adapter)):
                self.plan.cache.release(prefix)
                return None
        if adapter_new:
            if not self.plan.has_adapter_run(adapter_need):  # one run of pages is read fastest (pages.FreePages)
                self._evict_adapter(keep=seq.adapter, run=adapter_need)
            step.load_adapters[seq.adapter] = self.plan.place_adapter(seq.adapter, adapter_need)
        if seq.adapter is not None:
            self.plan.use_adapter(seq.adapter)
        cached = self.plan.start_seq(seq.seq_id, prefix, hit)
        n = min(len(tokens) - hit, budget)
        pages = self.plan.grow(seq.seq_id, n)
        seq.status, seq.computed, seq.cached_tokens = Status.RUNNING, hit + n, hit
        counts = self.prefix_tokens.setdefault(seq.adapter, [0, 0])
        counts[0] += len(tokens)
        counts[1] += hit
        self.running.append(seq)
        return SeqWork(seq.seq_id, tokens[hit:hit + n], hit, pages, seq.adapter, seq.request.sampling, prefix=cached)

    def _evict_adapter(self, keep: str | None = None, run: int = 0) -> bool:
        name = self.plan.evict_idle_adapter(keep, run)
        if name is None:
            return False
        self._evicted.append(name)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop the KV, requeue at the front, keep the tokens so far."""
        self._release(seq)
        seq.status, seq.computed = Status.WAITING, 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _share(self, seq: Sequence) -> None:
        """The KV computed so far joins the prefix cache (called only once the steps that computed it ran)."""
        if self.cfg.prefix_cache and seq.computed:
            self.plan.share(seq.seq_id, seq.cache_key, seq.tokens[:seq.computed])

    def _release(self, seq: Sequence) -> None:
        self._share(seq)
        self.plan.release_seq(seq.seq_id)
        self.running.remove(seq)
        if seq.adapter is not None:
            self.plan.unuse_adapter(seq.adapter)
        self._finished_ids.append(seq.seq_id)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._release(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    # ------------------------------------------------------------- results

    def postprocess(self, tokens: list[int], logprobs: list[TokenLogprobs | None] | None = None) -> list[Output]:
        if len(tokens) != len(self._scheduled) or (logprobs is not None and len(logprobs) != len(tokens)):
            raise RuntimeError(f"the worker returned {len(tokens)} tokens for {len(self._scheduled)} sequences")
        outputs = []
        for i, ((seq, samples, prefill), token) in enumerate(zip(self._scheduled, tokens)):
            if seq.status != Status.RUNNING:
                continue  # aborted while the step ran
            if prefill:
                self._share(seq)
            if not samples:
                continue  # a chunk before the last of its prefill
            seq.output_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason:
                self._finish(seq, reason)
            outputs.append(Output(seq, token, reason is not None, logprobs[i] if logprobs else None))
        self._scheduled = []
        return outputs

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        req = seq.request
        if token in req.stop_token_ids or (not req.ignore_eos and token in self.eos_ids):
            return "stop"
        if len(seq.output_ids) >= req.max_new_tokens or seq.total_len >= self.cfg.max_model_len:
            return "length"
        return None
