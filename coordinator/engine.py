"""The engine of one replica: schedule -> execute on every rank -> postprocess."""
from __future__ import annotations

from pathlib import Path

from ..worker.adapters import AdapterError
from ..worker.executor import make_executor
from ..worker.step import SamplingParams
from ..worker.worker import AdapterInfo
from .adapters import AdapterEntry, AdapterRegistry
from .config import EngineConfig
from .pages import PagePlan
from .scheduler import Output, Scheduler, SchedulerConfig
from .sequence import Request, Sequence
from .tokenizer import Tokenizer


class InvalidRequest(ValueError):
    """A request with a bad field; the message says which and what is allowed."""


class Engine:
    def __init__(self, cfg: EngineConfig, executor=None):
        self.cfg = cfg
        self.executor = executor or make_executor(cfg.worker_config(), cfg.tp, cfg.ray_address)
        info = self.executor.call_all("info")[0]
        self.model = info.model
        max_len = min(cfg.max_model_len or self.model.max_position, self.model.max_position)
        self.scheduler = Scheduler(
            SchedulerConfig(cfg.max_num_seqs, cfg.max_batched_tokens, max_len),
            PagePlan(info.num_pages, _adapter_capacity(cfg, info.num_pages)), eos_ids=self.model.eos_token_ids,
        )
        self.registry = AdapterRegistry(cfg.adapters_dir)
        self.tokenizer = Tokenizer(cfg.model_dir) if Tokenizer.exists(cfg.model_dir) else None

    # ------------------------------------------------------------- adapters

    def ensure_adapter(self, name: str, path: str | None = None) -> AdapterEntry:
        """Registers an adapter on every rank (read, checked, packed into the host cache) once.

        The synchronous form, for `lorafleet run`; the server runs the two halves on two threads
        (EngineLoop.ensure_adapter) so that steps go on while the adapter is read.
        """
        if self.registry.known(name):
            return self.registry.entries[name]
        folder = self.registry.resolve(name, path)
        return self.add_adapter(name, folder, self.read_adapter(name, folder))

    def read_adapter(self, name: str, folder: Path) -> list[AdapterInfo]:
        """The slow half: every rank reads, checks and packs the adapter into its host cache.

        Safe on any thread while steps run (the workers lock their tables; it runs no collective).
        Touches no coordinator state. Raises AdapterError.
        """
        return self.executor.call_all("register_adapter", name, str(folder))

    def add_adapter(self, name: str, folder: Path, infos: list[AdapterInfo]) -> AdapterEntry:
        """The cheap half, on the engine thread: the registry entry and the pages the scheduler reserves."""
        if self.registry.known(name):
            return self.registry.entries[name]
        entry = self.registry.add(name, folder, infos[0])
        self.scheduler.adapter_pages[name] = entry.num_pages
        return entry

    # ------------------------------------------------------------- requests

    def add(self, request: Request) -> Sequence:
        self.validate(request)
        if request.adapter is not None:
            self.ensure_adapter(request.adapter).requests += 1
        return self.scheduler.add(request)

    def validate(self, r: Request) -> None:
        vocab = self.model.vocab_size
        if not r.prompt_ids:
            raise InvalidRequest("the prompt is empty")
        bad = [t for t in r.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if r.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be at least 1, got {r.max_new_tokens}")
        bad = [t for t in r.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"stop token id {bad[0]} is outside the vocabulary [0, {vocab})")
        check_sampling(r.sampling)

    def abort(self, seq: Sequence, reason: str = "cancelled") -> None:
        self.scheduler.abort(seq, reason)

    def adapter_users(self, name: str) -> int:
        """Waiting and running sequences that use the adapter."""
        return sum(1 for s in list(self.scheduler.waiting) + self.scheduler.running if s.adapter == name)

    def unload_adapter(self, name: str) -> None:
        """Forgets an adapter no sequence uses: out of the pool, the host cache and the registry."""
        if self.adapter_users(name):
            raise RuntimeError(f"adapter {name} is still in use")
        self.scheduler.unload_adapter(name)
        self.executor.call_all("forget_adapter", name)
        self.registry.remove(name)

    def host_cached_adapters(self) -> list[str]:
        return self.executor.call_all("host_cached_adapters")[0]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def busy(self) -> bool:
        """Sequences are waiting or running (finished ids alone can wait for the next step)."""
        return bool(self.scheduler.waiting or self.scheduler.running)

    def step(self) -> list[Output]:
        step = self.scheduler.schedule()
        if not (step.seqs or step.finished or step.load_adapters or step.evicted_adapters):
            return []
        tokens = self.executor.call_all("execute", step)[0]
        return self.scheduler.postprocess(tokens)

    def shutdown(self) -> None:
        self.executor.shutdown()


def _adapter_capacity(cfg: EngineConfig, num_pages: int) -> int | None:
    if cfg.separate_adapter_pages is None:
        return None
    return max(1, int(num_pages * cfg.separate_adapter_pages))


def check_sampling(p: SamplingParams) -> None:
    if not p.temperature >= 0 or p.temperature > 100:
        raise InvalidRequest(f"temperature must be in [0, 100], got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p}")
    if p.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0 (0 = all tokens), got {p.top_k}")
    if p.seed is not None and not 0 <= p.seed < 2**63:
        raise InvalidRequest(f"seed must be in [0, 2^63), got {p.seed}")


