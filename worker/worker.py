"""One worker: a model shard, its page pool and adapter store, executing Steps."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter_store import AdapterInfo, AdapterStore
from .batch import AdapterRows, PageRows, forward_batch
from .comm import Comm
from .config import ModelConfig, WorkerConfig
from .loader import Shard
from .model import load_model
from .pool import PagePool
from .sampler import sample, token_logprobs
from .step import PageTables, Sampled, Step, StepError


@dataclass(frozen=True)
class WorkerInfo:
    num_pages: int
    page_dim: int
    model: ModelConfig


class Worker:
    def __init__(self, cfg: WorkerConfig, shard: Shard = Shard(), comm: Comm | None = None):
        self.cfg, self.shard = cfg, shard
        self.comm = comm or Comm()
        self.model_cfg = ModelConfig.from_dir(cfg.model_dir)
        check_divisible(self.model_cfg, shard.size)
        self.device = torch.device(cfg.device)
        self.model = load_model(cfg.model_dir, self.model_cfg, cfg.torch_dtype, self.device, shard, self.comm, cfg.row_output)
        self.model.warm_up(cfg.warm_rows)
        self.page_dim = 2 * self.model_cfg.kv_size // shard.size
        self.pool = PagePool(self.model_cfg.num_layers, self._num_pages(), self.page_dim, cfg.torch_dtype, self.device)
        self.adapters = AdapterStore(self.model_cfg, shard, self.page_dim, cfg.torch_dtype, cfg.max_lora_rank)
        self.tables = PageTables()
        self.page_rows = PageRows(device=self.device)  # the same page lists, as tensor rows for the attention kernels
        self.adapter_rows = AdapterRows(self.model_cfg, shard, device=self.device)  # the pool's adapters, as tensor rows for the LoRA kernels

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

    # ------------------------------------------------------------- adapters (the loader thread)

    def read_adapter(self, name: str, path: str) -> AdapterInfo:
        """Reads, checks and packs an adapter into host memory. Raises AdapterError.

        Runs on the replica's loader thread while `execute` runs: it runs no collective and
        touches only the adapter store."""
        return self.adapters.read(name, Path(path))

    def host_adapters(self) -> list[str]:
        return self.adapters.names()

    def comm_counts(self, reset: bool = False) -> dict[str, dict[str, int]]:
        """Collectives run since the last reset: {kind: {"calls": n, "elements": n}}."""
        counts = {k: {"calls": self.comm.calls[k], "elements": self.comm.elements[k]} for k in self.comm.calls}
        if reset:
            self.comm.reset_counts()
        return counts

    # ------------------------------------------------------------- steps

    def execute(self, step: Step) -> Sampled | None:
        """Runs one step; rank 0 returns one sampled token per sequence (with logprobs for the
        sequences that ask), the others None.

        Never reads the disk: the adapters it places were read before the scheduler placed them."""
        for name in step.dropped_adapters:
            self.adapters.drop(name)
        for name, pages in step.load_adapters.items():
            item = self.adapters.get(name)
            if len(pages) != item.info.num_pages:
                raise StepError(f"adapter {name!r} needs {item.info.num_pages} pages, the step gave {len(pages)}")
            self.pool.write(pages, item.packed)
        self.tables.apply(step)
        self.page_rows.apply(step)
        self.adapter_rows.apply(step, self.adapters.layouts(step.load_adapters))
        if not step.seqs:
            return Sampled([]) if self.shard.rank == 0 else None
        batch = forward_batch(step.seqs, self.page_rows, self.adapter_rows, self.device)
        logits = self.model.forward(batch, self.pool.pages)
        if self.shard.rank != 0:
            return None
        params = [self.tables.sampling[w.seq_id] for w in step.seqs]
        positions = [w.start + len(w.token_ids) for w in step.seqs]
        tokens = sample(logits, params, positions)
        return Sampled(tokens, token_logprobs(logits, params, tokens))


def check_divisible(cfg: ModelConfig, tp: int) -> None:
    """Clear errors for a tensor-parallel size the model cannot be split by."""
    if tp < 1:
        raise ValueError(f"tp must be at least 1, got {tp}")
    for what, n in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("intermediate size", cfg.intermediate_size), ("hidden size", cfg.hidden_size)):
        if n % tp:
            raise ValueError(f"tp={tp} does not divide the model's {n} {what}; choose a tp that divides {n}")
