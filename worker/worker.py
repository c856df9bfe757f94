"""One worker: a model shard, its page pool and host adapter cache, executing Steps."""
from __future__ import annotations

import logging
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
        """Reads, checks and packs an adapter into the host cache. Raises AdapterError."""
        packed = self._pack(name, Path(path))
        self.adapter_paths[name] = Path(path)
        self.layouts[name] = packed.layout
        return AdapterInfo(name, packed.rank, packed.targets, packed.layout.num_pages)

    def forget_adapter(self, name: str) -> None:
        for table in (self.adapter_paths, self.adapter_pages, self.layouts):
            table.pop(name, None)
        self.cache.remove(name)

    def host_cached_adapters(self) -> list[str]:
        return self.cache.names()

    def _pack(self, name: str, path: Path) -> PackedAdapter:
        weights = read_adapter(name, path, self.model_cfg, self.cfg.max_lora_rank)
        layout = plan_layout(weights.ranks, weights.scales, self.model_cfg, self.shard, self.page_dim)
        packed = pack_adapter(weights, layout, self.model_cfg, self.shard, self.page_dim, self.cfg.torch_dtype)
        item = PackedAdapter(name, weights.rank, tuple(weights.ranks), layout, packed)
        self.cache.put(item)
        return item

    def _load_into_pool(self, name: str, pages: list[int]) -> None:
        item = self.cache.get(name)
        if item is None:  # fell out of the host cache: read it from disk again
            if name not in self.adapter_paths:
                raise AdapterError(name, "was never registered with this worker")
            item = self._pack(name, self.adapter_paths[name])
        if len(pages) != item.layout.num_pages:
            raise ValueError(f"adapter {name!r} needs {item.layout.num_pages} pages, the step gave {len(pages)}")
        self.pool.write(pages, item.packed)
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
        for name in step.evicted_adapters:
            self.adapter_pages.pop(name, None)
        for name, pages in step.load_adapters.items():
            self._load_into_pool(name, pages)
        if not step.seqs:
            return [] if self.shard.rank == 0 else None
        for w in step.seqs:
            if w.start == 0:
                self.seqs[w.seq_id] = _Sequence([], w.sampling or SamplingParams())
            self.seqs[w.seq_id].pages += w.new_pages
        batch = forward_batch(step.seqs, {w.seq_id: self.seqs[w.seq_id].pages for w in step.seqs},
                              self.adapter_pages, self.layouts, self.model_cfg, self.shard, self.device)
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
