"""The variants that the benchmarks compare with lorafleet's design, injected from here; the
serving code has no branch for them.

- SeparatePoolsPlan: S-LoRA's "no-unify-mem" ablation: the last `adapter_capacity` pages serve
  adapters only and the rest KV only (pass `page_plan=separate_pools(fraction)` to Engine, or run
  `python bench/ablations.py --separate-pools FRACTION serve ARGS...`: `lorafleet serve` with it).
- unfused_row_output: the row-parallel LoRA deltas all-gathered on their own after the base
  all-reduce, instead of riding in it (`Engine(cfg, unfused_executor(cfg))`).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

from lorafleet.coordinator.pages import FreePages, PageAccountingError, PagePlan
from lorafleet.kernels.lora import lora_expand, lora_shrink


@dataclass
class SeparatePoolsPlan(PagePlan):
    adapter_capacity_pages: int = 1
    _split: int = field(init=False)

    def __post_init__(self):
        self._split = self.num_pages - self.adapter_capacity_pages
        if not 0 < self._split < self.num_pages:
            raise ValueError(f"{self.adapter_capacity_pages} adapter pages leave no KV pages in a pool of {self.num_pages}")
        self.free = FreePages(range(self._split), self.num_pages)
        self.adapter_free = FreePages(range(self._split, self.num_pages), self.num_pages)

    @property
    def kv_capacity(self) -> int:
        return self._split

    @property
    def adapter_capacity(self) -> int:
        return self.adapter_capacity_pages

    def fits(self, kv: int, adapter: int) -> bool:
        return kv <= len(self.free) + self.cache.idle_pages and adapter <= len(self.adapter_free)

    def eviction_helps(self, kv: int, adapter: int) -> bool:
        return adapter > len(self.adapter_free)

    @property
    def free_pages(self) -> int:
        return len(self.free) + len(self.adapter_free)

    def owners(self) -> list[tuple[str, list[int]]]:
        return super().owners() + [("adapter free", list(self.adapter_free))]

    def check(self) -> None:
        super().check()
        if any(p < self._split for a in self.adapters.values() for p in a.pages):
            raise PageAccountingError("an adapter holds a KV-only page")
        if any(p >= self._split for pages in self.seq_pages.values() for p in pages):
            raise PageAccountingError("a sequence holds an adapter-only page")


def separate_pools(fraction: float):
    """A page_plan factory for Engine: this fraction of the pool for adapters only."""
    if not 0 < fraction < 1:
        raise ValueError(f"the adapter fraction must be in (0, 1), got {fraction}")
    return lambda num_pages: SeparatePoolsPlan(num_pages, adapter_capacity_pages=max(1, int(num_pages * fraction)))


def unfused_row_output(y, x, pool, lora, group, comm):
    """Base all-reduce first, then the LoRA deltas all-gathered on their own (what fusing saves)."""
    if lora is None or group not in lora.groups:
        return comm.all_reduce(y)
    meta = lora.groups[group]
    s = comm.all_reduce(lora_shrink(x, pool, lora, meta), kind="lora_all_reduce")
    mine = lora_expand(y.new_zeros(y.shape[0], meta.out_dims[0]), s, pool, lora, meta)
    return comm.all_reduce(y) + comm.all_gather_last(mine, kind="lora_output_all_gather")


def unfused_executor(cfg):
    """Workers for EngineConfig `cfg` with the unfused row-parallel communication (Engine(cfg, this))."""
    from lorafleet.worker.executor import make_executor

    if cfg.tp > 1 or cfg.ray_address is not None:
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the Ray actors need not import bench/
    return make_executor(dataclasses.replace(cfg.worker_config(), row_output=unfused_row_output), cfg.tp, cfg.ray_address)


def main(argv: list[str] | None = None) -> int:
    """`lorafleet` with the separate-pools ablation injected: --separate-pools FRACTION, then its arguments."""
    import argparse

    from lorafleet.coordinator import cli

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--separate-pools", type=float, required=True, metavar="FRACTION",
                   help="this fraction of each pool holds adapters only")
    p.add_argument("lorafleet_args", nargs=argparse.REMAINDER, help="the `lorafleet` command line, e.g. serve --model DIR")
    args = p.parse_args(argv)
    return cli.main(args.lorafleet_args, page_plan=separate_pools(args.separate_pools))


if __name__ == "__main__":
    sys.exit(main())
