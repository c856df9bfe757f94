"""Running lorafleet's engine in tests: build one, run requests to completion."""
from __future__ import annotations

from pathlib import Path

from lorafleet.coordinator.config import EngineConfig
from lorafleet.coordinator.engine import Engine
from lorafleet.coordinator.sequence import Request


def make_engine(model_dir, adapters_root=None, **kw) -> Engine:
    kw.setdefault("pool_bytes", 16 * 2**20)
    return Engine(EngineConfig(str(model_dir), str(adapters_root) if adapters_root else None, **kw))


def generate(engine: Engine, requests: list[tuple], join_at: list[int] | None = None, max_steps: int = 10_000) -> list[list[int]]:
    """requests: (adapter or None, prompt_ids, max_new_tokens); greedy, eos ignored.

    join_at[i] is the engine step before which request i is added, so requests join a
    running batch at different iterations. Returns the generated ids of each request.
    """
    join_at = join_at or [0] * len(requests)
    seqs = [None] * len(requests)
    for step in range(max_steps):
        for i, (adapter, prompt, n) in enumerate(requests):
            if join_at[i] == step:
                seqs[i] = engine.add(Request(str(i), list(prompt), n, adapter, ignore_eos=True))
        if step > max(join_at) and not engine.has_work():
            break
        engine.step()
    else:
        raise AssertionError(f"requests did not finish within {max_steps} steps")
    return [s.output_ids for s in seqs]


def adapters_root(adapter_dirs: dict[str, Path]) -> Path:
    """The one folder that holds every fixture adapter."""
    (root,) = {Path(p).parent for p in adapter_dirs.values()}
    return root
