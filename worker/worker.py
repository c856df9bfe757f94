"""One worker: a model shard, its page pool and host adapter cache, executing Steps."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter_cache import HostAdapterCache, PackedAdapter
from .adapters import AdapterError, read_adapter
from .batch import forward_batch
from .comm import Comm
from .config import ModelConfig, WorkerConfig
from .loader import Shard
from .lora import pack_adapter, plan_layout
from .model import load_model
from .pool import PagePool
from .sampler import sample
from .step import SamplingParams, Step

log = logging.getLogger(__name__)
MAX_PREFETCH = 2  # adapter reads in flight on the prefetch thread (one running, one queued)


@dataclass(frozen=True)
class WorkerInfo:
    num_pages: int
    page_dim: int
    model: ModelConfig


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    rank: int
    targets: tuple[str, ...]
    num_pages: int


@dataclass
class _Sequence:
    pages: list[int]
    sampling: SamplingParams


@dataclass
class _Prefetch:
    path: Path  # the registration it reads for: a result for a forgotten one is dropped
    future: Future


class Worker:
    def __init__(self, cfg: WorkerConfig, shard: Shard = Shard(), comm: Comm | None = None):
        self.cfg, self.shard = cfg, shard
        self.comm = comm or Comm()
        self.model_cfg = ModelConfig.from_dir(cfg.model_dir)
        check_divisible(self.model_cfg, shard.size)
        self.device = torch.device(cfg.device)
        self.model = load_model(cfg.model_dir, self.model_cfg, cfg.torch_dtype, self.device, shard, self.comm, cfg.fuse_lora_comm)
        self.page_dim = 2 * self.model_cfg.kv_size // shard.size
        self.pool = PagePool(self.model_cfg.num_layers, self._num_pages(), self.page_dim, cfg.torch_dtype, self.device)
        self.cache = HostAdapterCache(cfg.host_cache_bytes)
        self.adapter_paths: dict[str, Path] = {}
        self.adapter_pages: dict[str, list[int]] = {}
        self.layouts = {}
        self.seqs: dict[int, _Sequence] = {}
        # register_adapter may run on another thread while execute runs: the lock guards the
        # adapter tables, the host cache and the prefetches; reading and packing happen outside it
        self._lock = threading.Lock()
        self._prefetching: dict[str, _Prefetch] = {}
        self._prefetch_failed: dict[str, Path] = {}  # not retried for that registration; the load reports it
        self._prefetcher: ThreadPoolExecutor | None = None

    def _num_pages(self) -> int:
        pool_bytes = self.cfg.pool_bytes
        if pool_bytes is None:
            if self.device.type != "cuda":
                raise ValueError("set pool_bytes (--pool-bytes) on CPU; the memory fraction applies to CUDA devices")
            free, _ = torch.cuda.mem_get_info(self.device)
            pool_bytes = int(free * self.cfg.pool_fraction)
        return PagePool.pages_for_bytes(pool_bytes, self.model_cfg.num_layers, self.page_dim, self.cfg.torch_dtype)

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.pool.num_pages, self.page_dim, self.model_cfg)

    # ------------------------------------------------------------- adapters

    def register_adapter(self, name: str, path: str) -> AdapterInfo:
        """Reads, checks and packs an adapter into the host cache. Raises AdapterError.

        Safe to call while `execute` runs on another thread: only the bookkeeping takes the lock.
        """
        path = Path(path)
        packed = self._read_and_pack(name, path)
        with self._lock:
            self.adapter_paths[name] = path
            self.layouts[name] = packed.layout
            self.cache.put(packed)
        return AdapterInfo(name, packed.rank, packed.targets, packed.layout.num_pages)

    def forget_adapter(self, name: str) -> None:
        with self._lock:
            for table in (self.adapter_paths, self.adapter_pages, self.layouts, self._prefetch_failed):
                table.pop(name, None)
            self.cache.remove(name)

    def host_cached_adapters(self) -> list[str]:
        with self._lock:
            return self.cache.names()

    def close(self) -> None:
        """Stops the prefetch thread (a read in progress finishes first)."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
            self._prefetcher = None

    def _read_and_pack(self, name: str, path: Path) -> PackedAdapter:
        """The heavy part of loading, with no lock held: disk -> checked weights -> this rank's packed shard."""
        weights = read_adapter(name, path, self.model_cfg, self.cfg.max_lora_rank)
        layout = plan_layout(weights.ranks, weights.scales, self.model_cfg, self.shard, self.page_dim)
        packed = pack_adapter(weights, layout, self.model_cfg, self.shard, self.page_dim, self.cfg.torch_dtype)
        return PackedAdapter(name, weights.rank, tuple(weights.ranks), layout, packed)

    def _packed_bytes(self, name: str) -> int:
        layout = self.layouts[name]
        return self.model_cfg.num_layers * layout.num_pages * self.page_dim * self.cfg.torch_dtype.itemsize

    def _prefetch(self, names: list[str]) -> None:
        """Starts re-reading, on the prefetch thread, the adapters in `names` that fell out of the host cache.

        Bounded: at most MAX_PREFETCH reads in flight, and only the first adapters of `names`
        that fit the host cache together (more would push each other out before they are used).
        """
        budget = self.cache.capacity
        with self._lock:
            for name in names:
                if name not in self.layouts:
                    continue  # not registered here (yet, or any more)
                budget -= self._packed_bytes(name)
                if budget < 0 or len(self._prefetching) >= MAX_PREFETCH:
                    return
                path = self.adapter_paths[name]
                if name in self.cache or name in self._prefetching or self._prefetch_failed.get(name) is path:
                    continue
                if self._prefetcher is None:
                    self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="adapter-prefetch")
                self._prefetching[name] = _Prefetch(path, self._prefetcher.submit(self._prefetch_one, name, path))

    def _prefetch_one(self, name: str, path: Path) -> PackedAdapter:
        item = None
        try:
            item = self._read_and_pack(name, path)
            return item
        except Exception:
            log.warning("prefetching adapter %s failed; it is read again when it is loaded", name, exc_info=True)
            raise
        finally:
            with self._lock:  # leaves the in-flight table and enters the cache at once: no second read between
                entry = self._prefetching.get(name)
                if entry is not None and entry.path is path:
                    del self._prefetching[name]
                if item is None:
                    self._prefetch_failed[name] = path
                elif self.adapter_paths.get(name) is path:  # still the same registration
                    self.cache.put(item)

    def _load_into_pool(self, name: str, pages: list[int]) -> None:
        with self._lock:
            item = self.cache.get(name)
            pending = self._prefetching.get(name) if item is None else None
            path = self.adapter_paths.get(name)
        if item is None and pending is not None:  # being prefetched: wait for that read, do not start another
            try:
                item = pending.future.result()
            except Exception:  # noqa: BLE001 - read it here, and raise its error if it fails again
                item = None
        if item is None:  # fell out of the host cache: read it from disk again
            if path is None:
                raise AdapterError(name, "was never registered with this worker")
            item = self._read_and_pack(name, path)
            with self._lock:
                self._prefetch_failed.pop(name, None)
                if self.adapter_paths.get(name) is path:
                    self.cache.put(item)
        if len(pages) != item.layout.num_pages:
            raise ValueError(f"adapter {name!r} needs {item.layout.num_pages} pages, the step gave {len(pages)}")
        self.pool.write(pages, item.packed)
        with self._lock:
            self.adapter_pages[name] = list(pages)

    def comm_counts(self, reset: bool = False) -> dict[str, dict[str, int]]:
        """Collectives run since the last reset: {kind: {"calls": n, "elements": n}}."""
        counts = {k: {"calls": self.comm.calls[k], "elements": self.comm.elements[k]} for k in self.comm.calls}
        if reset:
            self.comm.reset_counts()
        return counts

    # ------------------------------------------------------------- steps

    def execute(self, step: Step) -> list[int] | None:
        """Runs one step; rank 0 returns one sampled token per sequence, the others None."""
        for seq_id in step.finished:
            self.seqs.pop(seq_id, None)
        with self._lock:
            for name in step.evicted_adapters:
                self.adapter_pages.pop(name, None)
        for name, pages in step.load_adapters.items():
            self._load_into_pool(name, pages)
        if step.prefetch_adapters:  # read while this step runs
            self._prefetch(step.prefetch_adapters)
        if not step.seqs:
            return [] if self.shard.rank == 0 else None
        for w in step.seqs:
            if w.start == 0:
                self.seqs[w.seq_id] = _Sequence([], w.sampling or SamplingParams())
            self.seqs[w.seq_id].pages += w.new_pages
        with self._lock:  # this step's adapters only: registration may add entries while the step runs
            names = {w.adapter for w in step.seqs if w.adapter is not None}
            adapter_pages = {n: self.adapter_pages[n] for n in names}
            layouts = {n: self.layouts[n] for n in names}
        batch = forward_batch(step.seqs, {w.seq_id: self.seqs[w.seq_id].pages for w in step.seqs},
                              adapter_pages, layouts, self.model_cfg, self.shard, self.device)
        logits = self.model.forward(batch, self.pool.pages)
        if self.shard.rank != 0:
            return None
        params = [self.seqs[w.seq_id].sampling for w in step.seqs]
        positions = [w.start + len(w.token_ids) for w in step.seqs]
        return sample(logits, params, positions)


def check_divisible(cfg: ModelConfig, tp: int) -> None:
    """Clear errors for a tensor-parallel size the model cannot be split by."""
    if tp < 1:
        raise ValueError(f"tp must be at least 1, got {tp}")
    for what, n in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("intermediate size", cfg.intermediate_size), ("hidden size", cfg.hidden_size)):
        if n % tp:
            raise ValueError(f"tp={tp} does not divide the model's {n} {what}; choose a tp that divides {n}")
