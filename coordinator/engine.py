"""The state of one replica and the only code that changes it: the scheduler (queue, batch,
page plan), the adapter table, and the workers (one executor over every rank).

Each iteration is schedule -> execute on every rank -> postprocess. The Replica (replica.py)
drives an Engine from its own thread, with adapter reads on a loader thread; `lorafleet run`
drives one from a plain loop and reads adapters inline. Either way the same methods move
requests and adapters through their states.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from ..worker.adapter_store import AdapterInfo
from ..worker.adapters import AdapterError
from ..worker.executor import make_executor
from .adapters import AdapterEntry, AdapterState, AdapterTable
from .config import EngineConfig
from .pages import PagePlan
from .request import RequestParser
from .scheduler import Output, Scheduler, SchedulerConfig
from .sequence import Request, Sequence, Status
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class AdapterNotReady(RuntimeError):
    """A request reached the scheduler before its adapter was read: a bug in the caller."""


class Engine:
    def __init__(self, cfg: EngineConfig, executor=None, page_plan: Callable[[int], PagePlan] = PagePlan):
        """page_plan: builds the page accounting from the pool's page count (bench/ injects ablations)."""
        self.cfg = cfg
        self.executor = executor or make_executor(cfg.worker_config(), cfg.tp, cfg.ray_address)
        info = self.executor.call_all("info")[0]
        self.model = info.model
        max_len = min(cfg.max_model_len or self.model.max_position, self.model.max_position)
        self.scheduler = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_batched_tokens, max_len, cfg.prefix_cache,
                                                   cfg.adapter_affinity),
                                   page_plan(info.num_pages), eos_ids=self.model.eos_token_ids)
        self.adapters = AdapterTable(cfg.adapters_dir, cfg.host_cache_bytes)
        self.tokenizer = Tokenizer(cfg.model_dir) if Tokenizer.exists(cfg.model_dir) else None
        self.parser = RequestParser(self.tokenizer, self.model.vocab_size)
        self.steps = 0
        self.step_adapters = 0  # distinct adapters in the last step that ran
        self._dropped: list[str] = []  # host copies the next Step tells the workers to drop

    # ------------------------------------------------------------- adapters

    def want_adapter(self, name: str, path: str | None = None) -> AdapterEntry:
        return self.adapters.want(name, path)

    def next_read(self) -> tuple[str, Path, int] | None:
        """The next adapter to read (now READING), after dropping idle host copies to make room; None
        if none is due, or if host memory is held by adapters that queued requests use or that reads
        in flight will fill: the read starts when one of those finishes, so host memory stays within
        its bound (plus one adapter, and whatever an adapter not read before exceeds the largest one)."""
        due = self.adapters.reads_due()
        if not due:
            return None
        name = due[0]
        need = self.adapters.expected_bytes(self.adapters.get(name))
        self._drop_host_copies(self.adapters.over_capacity(keep=name, need=need))
        held = self.adapters.host_bytes + self.adapters.reading_bytes
        if held and held + need > self.adapters.capacity:
            return None
        if name in self._dropped:  # a drop not yet sent must not hit the copy this read makes
            self._dropped.remove(name)
        folder, generation = self.adapters.start_read(name)
        return name, folder, generation

    def read_adapter(self, name: str, folder: Path) -> list[AdapterInfo]:
        """The slow part, safe on any thread while steps run: every rank reads, checks and packs it
        into host memory. Touches no coordinator state. Raises AdapterError."""
        return self.executor.call_all("read_adapter", name, str(folder))

    def finish_read(self, name: str, generation: int, infos: list[AdapterInfo] | None = None,
                    error: str | None = None) -> bool:
        """Records a read's outcome (the ranks' reports, or the reason it failed); True if it counted."""
        if error is not None:
            return self.adapters.read_failed(name, generation, error)
        if not self.adapters.read_done(name, generation, infos[0]):
            entry = self.adapters.get(name)
            if entry is None or entry.state in (AdapterState.DISK, AdapterState.FAILED):
                self._dropped.append(name)  # unloaded while it was read: the copy it left is no one's
            return False
        self.scheduler.adapter_pages[name] = infos[0].num_pages
        self.scheduler.adapter_versions[name] = infos[0].version
        self._drop_host_copies(self.adapters.over_capacity(keep=name))
        return True

    def ensure_adapter(self, name: str, path: str | None = None) -> AdapterEntry | None:
        """Brings an adapter to HOST_READY on this thread (`lorafleet run`, tests); None if host
        memory must free up first (step, then call again). Raises AdapterError."""
        entry = self.want_adapter(name, path)
        while entry.state != AdapterState.HOST_READY:
            if entry.state == AdapterState.FAILED:
                raise AdapterError(name, entry.reason.removeprefix(f"adapter {name!r}: "))
            read = self.next_read()
            if read is None:
                return None
            read_name, folder, generation = read
            try:
                self.finish_read(read_name, generation, self.read_adapter(read_name, folder))
            except AdapterError as e:
                self.finish_read(read_name, generation, error=str(e))
        return entry

    def _drop_host_copies(self, names: list[str]) -> None:
        for name in names:
            self.scheduler.unload_adapter(name)  # out of the pool too (no request uses it)
        self._dropped += names

    def unload_ready(self, name: str) -> bool:
        """Forgets an UNLOADING adapter once no request uses it; True when it is gone."""
        entry = self.adapters.get(name)
        if entry is None:
            return True
        if entry.users:
            return False
        self.scheduler.unload_adapter(name, forget_prefixes=True)
        self._dropped.append(name)
        self.adapters.remove(name)
        return True

    def cancel_unload(self, name: str) -> None:
        if not self.adapters.cancel_unload(name):
            self._dropped.append(name)  # a read that finished during the unload left a copy

    # ------------------------------------------------------------- requests

    def parse(self, fields) -> Request:
        return self.parser.parse(fields)

    def add(self, request: Request) -> Sequence:
        """Queues a request whose adapter is host-ready (the scheduler never waits on a read).
        Raises RequestTooLarge."""
        if request.adapter is not None:
            entry = self.adapters.get(request.adapter)
            if entry is None or entry.state != AdapterState.HOST_READY:
                raise AdapterNotReady(f"adapter {request.adapter!r} is not read yet")
        seq = self.scheduler.add(request)
        if request.adapter is not None:
            self.adapters.accepted(request.adapter)
        return seq

    def abort(self, seq: Sequence, reason: str = "cancelled") -> None:
        if seq.status != Status.FINISHED:
            self.scheduler.abort(seq, reason)
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.adapters.released(seq.adapter)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._dropped)

    def busy(self) -> bool:
        """Sequences are waiting or running (finished ids alone can wait for the next step)."""
        return bool(self.scheduler.waiting or self.scheduler.running)

    def step(self) -> list[Output]:
        step = self.scheduler.schedule()
        step.dropped_adapters, self._dropped = self._dropped, []
        if step.empty():
            return []
        for name in list(step.load_adapters) + step.evicted_adapters:
            self.adapters.changed.add(name)  # residency shows in the snapshot
        sampled = self.executor.call_all("execute", step, timeout=self.cfg.step_timeout)[0]
        self.steps += 1
        self.step_adapters = len({w.adapter for w in step.seqs} - {None})
        outputs = self.scheduler.postprocess(sampled.tokens, sampled.logprobs)
        for out in outputs:
            if out.finished:
                self._release(out.seq)
        return outputs

    def shutdown(self, stop_ray: bool = True) -> None:
        self.executor.shutdown(stop_ray)
