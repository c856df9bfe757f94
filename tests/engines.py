"""Running lorafleet's engine in tests: build one (float32 unless told), run requests to completion."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import lorafleet.worker.adapter_store as store_module
from lorafleet.coordinator.config import EngineConfig
from lorafleet.coordinator.engine import Engine
from lorafleet.coordinator.pages import PagePlan
from lorafleet.coordinator.sequence import Request


def make_engine(model_dir, adapters_root=None, page_plan=PagePlan, executor=None, **kw) -> Engine:
    kw.setdefault("pool_bytes", 16 * 2**20)
    kw.setdefault("dtype", "float32")  # the exact dtype: tests compare tokens with PEFT's (the default is "auto")
    return Engine(EngineConfig(str(model_dir), str(adapters_root) if adapters_root else None, **kw), executor, page_plan)


def add(engine: Engine, request: Request):
    """Queues a request after reading its adapter on this thread, as `lorafleet run` does; steps
    the engine while host memory must free up for the read."""
    for _ in range(100_000):
        if request.adapter is None or engine.ensure_adapter(request.adapter) is not None:
            return engine.add(request)
        engine.step()
    raise AssertionError(f"adapter {request.adapter} never fit in host memory")


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
                seqs[i] = add(engine, Request(str(i), list(prompt), n, adapter, ignore_eos=True))
        if step > max(join_at) and not engine.has_work():
            break
        engine.step()
    else:
        raise AssertionError(f"requests did not finish within {max_steps} steps")
    return [s.output_ids for s in seqs]


def record_steps(engine: Engine) -> list:
    """Every Step the engine sends to its workers, in order (wraps the executor's call_all; bench/roofline.py uses it too)."""
    steps, real = [], engine.executor.call_all

    def call_all(method, *args, **kw):
        if method == "execute":
            steps.append(args[0])
        return real(method, *args, **kw)

    engine.executor.call_all = call_all
    return steps


def adapters_root(adapter_dirs: dict[str, Path]) -> Path:
    """The one folder that holds every fixture adapter."""
    (root,) = {Path(p).parent for p in adapter_dirs.values()}
    return root


class AdapterReads:
    """Wraps the worker's read_adapter (monkeypatched): records each read's adapter and thread,
    and can hold the read of an adapter until the test releases it. Every wait is bounded by `wait`."""

    def __init__(self, monkeypatch, wait: float = 60.0):
        self.calls: list[tuple[str, str]] = []
        self.held: dict[str, threading.Event] = {}
        self.entered: dict[str, threading.Event] = {}
        self.wait = wait
        real = store_module.read_adapter

        def read(name, *args, **kw):
            self.calls.append((name, threading.current_thread().name))
            if name in self.held:
                self.entered[name].set()
                assert self.held[name].wait(self.wait), f"read of {name} held for too long"
            return real(name, *args, **kw)

        monkeypatch.setattr(store_module, "read_adapter", read)

    def hold(self, name: str) -> None:
        self.held[name], self.entered[name] = threading.Event(), threading.Event()

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    @property
    def threads(self) -> list[str]:
        return [t for _, t in self.calls]

    async def entered_read(self, name: str) -> None:
        assert await asyncio.to_thread(self.entered[name].wait, self.wait), f"the read of {name} never started"
