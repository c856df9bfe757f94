"""One replica's engine on its own thread: schedule -> execute on every rank -> postprocess.

The engine and its scheduler are touched by this thread only. The asyncio side sends
commands (`call`) and receives each sampled token through the sequence's listener,
so the gRPC event loop never blocks on a step and no lock guards the scheduler.

Registering an adapter (reading, checking and packing it on every rank) is the one slow
command: it runs on a loader thread while steps go on, and only its bookkeeping comes to
the engine thread (`ensure_adapter`).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .adapters import AdapterEntry
from .engine import Engine
from .scheduler import Output

log = logging.getLogger(__name__)

Listener = Callable[[Output], None]


class EngineLoop:
    def __init__(self, index: int, engine: Engine, loop: asyncio.AbstractEventLoop, idle_wait: float = 0.05):
        self.index, self.engine, self.loop = index, engine, loop
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: dict[int, Listener] = {}
        self._stop = threading.Event()
        self._idle_wait = idle_wait
        self.steps = 0
        self.last_step_seconds = 0.0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"engine-{index}", daemon=True)
        # one registration at a time per replica: with the engine thread's call, a Ray worker
        # runs at most two calls at once, which its actor allows (max_concurrency=2)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix=f"adapter-loader-{index}")
        self._registering: dict[str, asyncio.Task] = {}

    def start(self) -> None:
        self._thread.start()

    # ------------------------------------------------------------- from the event loop

    def call(self, fn: Callable[[Engine], Any]) -> asyncio.Future:
        """Runs fn(engine) on the engine thread between steps; the future gets its result or exception."""
        future = self.loop.create_future()
        if self.error is not None or not self._thread.is_alive():
            future.set_exception(RuntimeError(f"engine {self.index} is not running: {self.error}"))
            return future
        self._inbox.put((fn, future))
        return future

    async def ensure_adapter(self, name: str, path: str | None = None) -> AdapterEntry:
        """Registers an adapter with this replica once, without stopping its steps.

        Every rank reads, checks and packs it on the loader thread; the registry entry is made
        on the engine thread. Concurrent callers for one name share one registration; errors
        (AdapterNotFound, AdapterPathDenied, AdapterError) reach every one of them.
        """
        entry = self.engine.registry.entries.get(name)
        if entry is not None:
            return entry
        task = self._registering.get(name)
        if task is None:
            task = self.loop.create_task(self._register(name, path))
            self._registering[name] = task
            task.add_done_callback(lambda t: self._registered(name, t))
        return await asyncio.shield(task)  # a caller that goes away does not cancel it for the others

    def registering(self, name: str) -> bool:
        """A registration of `name` is in flight here (the router counts this replica as holding it)."""
        return name in self._registering

    async def _register(self, name: str, path: str | None) -> AdapterEntry:
        engine = self.engine
        folder = engine.registry.resolve(name, path)
        infos = await self.loop.run_in_executor(self._loader, engine.read_adapter, name, folder)
        return await self.call(lambda e: e.add_adapter(name, folder, infos))

    def _registered(self, name: str, task: asyncio.Task) -> None:
        if self._registering.get(name) is task:
            del self._registering[name]
        if not task.cancelled():
            task.exception()  # retrieved: the callers that are still waiting have it

    def listen(self, seq_id: int, listener: Listener) -> None:
        self._listeners[seq_id] = listener

    def forget(self, seq_id: int) -> None:
        self._listeners.pop(seq_id, None)

    @property
    def load(self) -> int:
        """Waiting plus running sequences: what the router balances."""
        s = self.engine.scheduler
        return len(s.waiting) + len(s.running)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._loader.shutdown(wait=True, cancel_futures=True)  # a registration in progress finishes first

    # ------------------------------------------------------------- the engine thread

    def _run(self) -> None:
        while not self._stop.is_set():
            self._run_commands(block=not self.engine.busy())
            if self._stop.is_set() or not self.engine.busy():
                continue
            started = time.monotonic()
            try:
                outputs = self.engine.step()
            except BaseException as e:  # a worker died or a bug: fail every request, stop serving
                log.exception("engine %d: step failed", self.index)
                self.error = e
                self._fail_all(e)
                return
            self.last_step_seconds = time.monotonic() - started
            self.steps += 1
            for out in outputs:
                listener = self._listeners.get(out.seq.seq_id)
                if listener is not None:
                    self.loop.call_soon_threadsafe(listener, out)

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self._idle_wait) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, future = item
            try:
                result, error = fn(self.engine), None
            except Exception as e:  # handed to the caller, who maps it to a status
                result, error = None, e
            self.loop.call_soon_threadsafe(_settle, future, result, error)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _fail_all(self, error: BaseException) -> None:
        for seq in list(self.engine.scheduler.waiting) + list(self.engine.scheduler.running):
            self.engine.abort(seq, reason="error")
            listener = self._listeners.get(seq.seq_id)
            if listener is not None:
                self.loop.call_soon_threadsafe(listener, Output(seq, -1, True))
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self.loop.call_soon_threadsafe(_settle, item[1], None, RuntimeError(f"the engine stopped: {error}"))


def _settle(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
