"""The coordinator's configuration: one validated dataclass, passed down."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..worker.config import DTYPE_CHOICES, WorkerConfig, resolve_dtype


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    adapters_dir: str | None = None
    dtype: str = "auto"  # resolved in __post_init__: the field holds the dtype served in (GetServerInfo shows it)
    device: str = "cpu"
    tp: int = 1
    pool_bytes: int | None = 512 * 2**20  # None: pool_fraction of free device memory (CUDA)
    pool_fraction: float = 0.9
    host_cache_bytes: int = 2 * 2**30
    max_lora_rank: int = 256
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    prefix_cache: bool = True  # reuse the KV of cached prefixes (per adapter and content version)
    adapter_affinity: int = 0  # steps a request may be passed over for ones whose adapter is in the batch (0: FCFS)
    max_queue: int | None = None  # None: sized from the pool (server.queue_limit)
    step_timeout: float = 60.0  # seconds a step may take before its replica is declared failed
    ray_address: str | None = None  # None: an embedded Ray when tp > 1
    placement_strategy: str = "PACK"  # how Ray places one replica's tp workers (worker.config.PLACEMENT_STRATEGIES)

    def __post_init__(self):
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ValueError(f"--model {self.model_dir}: not a Hugging Face model folder (no config.json)")
        if self.adapters_dir is not None and not Path(self.adapters_dir).is_dir():
            raise ValueError(f"--adapters {self.adapters_dir}: no such folder")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        if self.tp < 1:
            raise ValueError(f"--tp must be at least 1, got {self.tp}")
        if self.host_cache_bytes < 0:
            raise ValueError("--host-cache-bytes must be >= 0")
        if self.adapter_affinity < 0:
            raise ValueError(f"--adapter-affinity must be >= 0 steps, got {self.adapter_affinity}")
        for name in ("max_lora_rank", "max_num_seqs", "max_batched_tokens", "max_queue"):
            if (getattr(self, name) or 1) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.step_timeout > 0:
            raise ValueError(f"--step-timeout must be positive, got {self.step_timeout}")

    def worker_config(self) -> WorkerConfig:
        return WorkerConfig(
            model_dir=self.model_dir, dtype=self.dtype, device=self.device, pool_bytes=self.pool_bytes,
            pool_fraction=self.pool_fraction, max_lora_rank=self.max_lora_rank,
            placement_strategy=self.placement_strategy, warm_rows=self.max_num_seqs,
        )
