"""One replica core: its Engine on its own thread, driven only by messages (messages.py).

Front ends never touch the engine: they send AddRequest / Abort / LoadAdapter /
UnloadAdapter / Shutdown through a ReplicaHandle, read the ReplicaSnapshot it publishes
after every step, and receive Tokens, Failed and Reply messages on their event loop.
Adapter reads run on a loader thread; a request whose adapter is not read yet waits here
(parked), outside the scheduler, so no step ever waits on a disk.
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

from ..worker.adapters import AdapterError
from ..worker.executor import StepTimeout, WorkerDied
from .adapters import AdapterEntry, AdapterNotFound, AdapterPathDenied, AdapterState
from .engine import Engine
from .messages import (Abort, AddRequest, AdapterView, Code, Failed, LoadAdapter, Reply, ReplicaDown, ReplicaSnapshot,
                       Shutdown, Tokens, UnloadAdapter)
from .request import InvalidRequest
from .scheduler import RequestTooLarge
from .sequence import Request, Sequence

log = logging.getLogger(__name__)

READS_AHEAD = 4  # adapter reads queued on the loader at once (host memory counts them before they start)

ERROR_CODES = (
    (AdapterPathDenied, Code.PERMISSION_DENIED),
    (AdapterNotFound, Code.NOT_FOUND),
    (FileExistsError, Code.ALREADY_EXISTS),
    (AdapterError, Code.INVALID_ARGUMENT),
    (InvalidRequest, Code.INVALID_ARGUMENT),
    (RequestTooLarge, Code.INVALID_ARGUMENT),
)


def error_code(error: Exception) -> Code:
    for kind, code in ERROR_CODES:
        if isinstance(error, kind):
            return code
    return Code.INTERNAL


def describe_failure(error: BaseException) -> str:
    """What a user may read of a worker failure: the kind, never a Ray dump (actor ids, pids)."""
    if isinstance(error, WorkerDied):
        return "a worker process died"
    if isinstance(error, StepTimeout):
        return f"a step took too long ({error})"
    if (type(error).__module__ or "").startswith("ray"):
        return f"a worker call failed ({type(error).__name__})"
    return f"{type(error).__name__} in a step"


def name_os_thread(name: str) -> None:
    """Gives the calling thread its name in the OS too (top -H, /proc/PID/task/*/comm; 15 characters)."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME, Linux only
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class _ReadDone:
    """The loader thread's report: every rank read the adapter, or one refused it."""

    name: str
    generation: int
    future: Future


@dataclass
class _Unload:
    reply: int
    deadline: float
    drained: int


class Replica:
    """watch_interval: how often the watchdog looks for a dead rank or a step past --step-timeout."""

    def __init__(self, index: int, engine: Engine, idle_wait: float = 0.05, watch_interval: float = 0.2):
        self.index, self.engine, self.idle_wait, self.watch_interval = index, engine, idle_wait, watch_interval
        self.outbox: Callable[[list], None] = lambda messages: None  # set by the ReplicaHandle
        self.snapshot = ReplicaSnapshot(index, num_pages=engine.scheduler.plan.num_pages)
        self.error: str | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._seqs: dict[int, Sequence] = {}  # key -> sequence in the scheduler
        self._keys: dict[int, int] = {}  # seq_id -> key
        self._parked: dict[str, list[tuple[int, Request]]] = {}  # adapter -> requests waiting for its read
        self._loads: dict[str, list[int]] = {}  # adapter -> LoadAdapter replies waiting for its read
        self._unloads: dict[str, _Unload] = {}
        self._views: dict[str, AdapterView] = {}
        self._reading: list[str] = []  # adapters of the reads submitted to the loader and not reported yet
        self._loader = ThreadPoolExecutor(1, thread_name_prefix=f"adapter-loader-{index}",
                                          initializer=name_os_thread, initargs=(f"adapter-loader{index}",))
        self._thread = threading.Thread(target=self._run, name=f"replica-{index}", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"replica-{index}-watchdog", daemon=True)
        self._stopped = threading.Event()
        self._fail_lock = threading.Lock()
        self._step_started: float | None = None  # when the step in progress began (the watchdog reads it)
        self._publish()

    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    def send(self, message) -> None:
        """Any thread: queue a message for the replica's thread."""
        self._inbox.put(message)

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the thread (waiting at most `timeout` for a step in progress) and the watchdog."""
        self._stopped.set()
        self.send(Shutdown())
        for thread in (self._thread, self._watchdog):
            if thread.is_alive():
                thread.join(timeout)
        self._loader.shutdown(wait=not self._thread.is_alive(), cancel_futures=True)

    def fail(self, reason: str) -> None:
        """Any thread: declares the replica failed. Every request and command in flight ends with
        UNAVAILABLE at once (the front end is told), the ranks are killed so that a hung call returns,
        and the replica serves nothing more; its supervisor builds a new one."""
        with self._fail_lock:
            if self.error is not None:
                return
            self.error = f"replica {self.index} failed: {reason}"
            log.error("%s", self.error)
            self.snapshot = dataclasses.replace(self.snapshot, healthy=False, error=self.error)
            self.outbox([ReplicaDown(self._unavailable())])
        self.engine.executor.abort()

    def _watch(self) -> None:
        """The watchdog: a dead rank, or a step past --step-timeout, fails the replica within a second,
        busy or idle."""
        name_os_thread(f"watchdog-{self.index}")
        timeout = self.engine.cfg.step_timeout
        while not self._stopped.wait(self.watch_interval):
            if self.error is not None:
                return
            started = self._step_started
            if started is not None and time.monotonic() - started > timeout:
                self.fail(f"a step took longer than --step-timeout ({timeout:g} s)")
                return
            try:
                dead = self.engine.executor.dead_ranks()
            except Exception:  # noqa: BLE001 - the watchdog itself must go on
                log.exception("replica %d: the watchdog's check failed", self.index)
                continue
            if dead:
                self.fail(f"a worker process died (rank {dead[0]})")
                return

    # ------------------------------------------------------------- the replica's thread

    def _run(self) -> None:
        name_os_thread(f"replica-{self.index}")
        while self.run_once(block=True):
            pass

    def run_once(self, block: bool = False) -> bool:
        """One turn of the replica's loop: the messages that arrived, a read to start, one step,
        a fresh snapshot, the outputs sent. Waits up to idle_wait for a message when `block` and
        idle. False on Shutdown. Only the replica's thread calls this (or a test, instead of it)."""
        out: list = []
        for message in self._receive(block=block and not self.engine.busy()):
            if isinstance(message, Shutdown):
                return False
            try:
                self._handle(message, out)
            except Exception as e:  # a bug in handling one message must not stop the replica
                log.exception("replica %d: handling %s failed", self.index, type(message).__name__)
                self._fail_message(message, Code.INTERNAL, f"{type(e).__name__}: {e}", out)
        self._start_read()
        if self.error is None and self.engine.has_work():
            self._step(out)
        self._finish_unloads(out)
        self._publish()
        if out:
            self.outbox(out)
        return True

    def _receive(self, block: bool) -> list:
        try:
            first = self._inbox.get(timeout=self.idle_wait) if block else self._inbox.get_nowait()
        except queue.Empty:
            return []
        messages = [first]
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

    def _handle(self, message, out: list) -> None:
        if isinstance(message, AddRequest):
            self._add(message.key, message.request, out)
        elif isinstance(message, Abort):
            self._abort(message)
        elif isinstance(message, _ReadDone):
            self._read_done(message, out)
        elif isinstance(message, LoadAdapter):
            self._load(message, out)
        elif isinstance(message, UnloadAdapter):
            self._unload(message, out)
        else:
            raise TypeError(f"replica {self.index} got an unknown message {message!r}")

    def _fail_message(self, message, code: Code, text: str, out: list) -> None:
        if isinstance(message, AddRequest):
            out.append(Failed(message.key, code, text))
        elif isinstance(message, (LoadAdapter, UnloadAdapter)):
            out.append(Reply(message.reply, code, text))

    # ------------------------------------------------------------- requests

    def _add(self, key: int, request: Request, out: list) -> None:
        if self.error is not None:
            out.append(Failed(key, Code.UNAVAILABLE, self._unavailable()))
            return
        if request.adapter is not None:
            try:
                entry = self.engine.want_adapter(request.adapter)
            except (AdapterNotFound, AdapterPathDenied, InvalidRequest) as e:
                out.append(Failed(key, error_code(e), str(e)))
                return
            if entry.state != AdapterState.HOST_READY:
                self._parked.setdefault(request.adapter, []).append((key, request))
                return
        self._queue(key, request, out)

    def _queue(self, key: int, request: Request, out: list) -> None:
        try:
            seq = self.engine.add(request)
        except RequestTooLarge as e:
            out.append(Failed(key, Code.INVALID_ARGUMENT, str(e)))
            return
        self._seqs[key], self._keys[seq.seq_id] = seq, key

    def _abort(self, message: Abort) -> None:
        seq = self._seqs.pop(message.key, None)
        if seq is not None:
            del self._keys[seq.seq_id]
            self.engine.abort(seq, message.reason)
            return
        for waiting in self._parked.values():
            waiting[:] = [(k, r) for k, r in waiting if k != message.key]

    def _step(self, out: list) -> None:
        self._step_started = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as e:  # a worker died or a bug: fail every request, stop serving
            log.exception("replica %d: step failed", self.index)
            self._failed(describe_failure(e))
            return
        finally:
            self._step_started = None
        if self.error is not None:
            return  # failed by the watchdog while the step ran: its requests have their answer
        for o in outputs:
            key = self._keys.get(o.seq.seq_id)
            if key is None:
                continue
            logprobs = (o.logprobs,) if o.logprobs is not None else None
            out.append(Tokens(key, (o.token,), o.seq.finish_reason if o.finished else None, logprobs))
            if o.finished:
                del self._keys[o.seq.seq_id], self._seqs[key]

    def _failed(self, reason: str) -> None:
        """The replica's thread found the failure: the front end ends what was in flight (ReplicaDown)."""
        self.fail(reason)
        self._seqs.clear(), self._keys.clear(), self._parked.clear(), self._loads.clear(), self._unloads.clear()

    def _unavailable(self) -> str:
        return f"{self.error}; the request may be retried"

    # ------------------------------------------------------------- adapters

    def _start_read(self) -> None:
        """Queues up to READS_AHEAD reads on the loader thread, which runs them back to back while
        steps run: its reports wait for the next turn of the loop, so one read per turn would let a
        long step hold the next read back."""
        while len(self._reading) < READS_AHEAD and self.error is None:
            read = self.engine.next_read()
            if read is None:
                return
            name, folder, generation = read
            self._reading.append(name)
            future = self._loader.submit(self.engine.read_adapter, name, folder)
            future.add_done_callback(lambda f, name=name, generation=generation: self.send(_ReadDone(name, generation, f)))

    def _read_done(self, done: _ReadDone, out: list) -> None:
        self._reading.remove(done.name)
        try:
            infos, error = done.future.result(), None
        except AdapterError as e:
            infos, error = None, str(e)
        except Exception as e:  # a worker died while reading: the next step finds out too
            log.exception("replica %d: reading adapter %s failed", self.index, done.name)
            infos, error = None, f"adapter {done.name!r}: reading it failed ({describe_failure(e)})"
        self.engine.finish_read(done.name, done.generation, infos, error)
        entry = self.engine.adapters.get(done.name)
        if entry is None or entry.state not in (AdapterState.HOST_READY, AdapterState.FAILED):
            return  # a stale report: the requests wait for the read now due (unload failed them already)
        waiting, replies = self._parked.pop(done.name, []), self._loads.pop(done.name, [])
        if entry.state == AdapterState.HOST_READY:
            for key, request in waiting:
                self._queue(key, request, out)
            out += [Reply(r, value=self._view(entry)) for r in replies]
        else:
            out += [Failed(key, Code.INVALID_ARGUMENT, entry.reason) for key, _ in waiting]
            out += [Reply(r, Code.INVALID_ARGUMENT, entry.reason) for r in replies]

    def _load(self, message: LoadAdapter, out: list) -> None:
        if self.error is not None:
            out.append(Reply(message.reply, Code.UNAVAILABLE, self._unavailable()))
            return
        try:
            entry = self.engine.want_adapter(message.name, message.path or message.name)
        except (AdapterNotFound, AdapterPathDenied, InvalidRequest, FileExistsError) as e:
            out.append(Reply(message.reply, error_code(e), str(e)))
            return
        if entry.state == AdapterState.HOST_READY:
            out.append(Reply(message.reply, value=self._view(entry)))
        else:
            self._loads.setdefault(message.name, []).append(message.reply)

    def _unload(self, message: UnloadAdapter, out: list) -> None:
        try:
            entry = self.engine.adapters.start_unload(message.name)
        except AdapterNotFound as e:
            out.append(Reply(message.reply, Code.NOT_FOUND, str(e)))
            return
        except FileExistsError as e:
            out.append(Reply(message.reply, Code.FAILED_PRECONDITION, str(e)))
            return
        gone = f"adapter {message.name!r} was unloaded"
        out += [Failed(key, Code.NOT_FOUND, gone) for key, _ in self._parked.pop(message.name, [])]
        out += [Reply(r, Code.NOT_FOUND, gone) for r in self._loads.pop(message.name, [])]
        self._unloads[message.name] = _Unload(message.reply, time.monotonic() + message.timeout, entry.users)

    def _finish_unloads(self, out: list) -> None:
        for name, unload in list(self._unloads.items()):
            if self.engine.unload_ready(name):
                out.append(Reply(unload.reply, value=unload.drained))
            elif time.monotonic() > unload.deadline:
                self.engine.cancel_unload(name)
                out.append(Reply(unload.reply, Code.DEADLINE_EXCEEDED,
                                 f"requests with adapter {name!r} did not finish in time; it stays loaded"))
            else:
                continue
            del self._unloads[name]

    # ------------------------------------------------------------- the snapshot

    def _view(self, entry: AdapterEntry) -> AdapterView:
        state = entry.state.value
        if entry.state == AdapterState.HOST_READY and self.engine.scheduler.plan.is_resident(entry.name):
            state = "resident"
        info = entry.info
        return AdapterView(
            name=entry.name, state=state, folder=str(entry.folder), reason=entry.reason,
            rank=info.rank if info else 0, targets=info.targets if info else (), num_pages=info.num_pages if info else 0,
            users=entry.users + len(self._parked.get(entry.name, ())), requests=entry.requests,
            version=info.version if info else "")

    def _publish(self) -> None:
        """A fresh immutable snapshot; readers on other threads take the reference as it is."""
        table = self.engine.adapters
        for name in table.changed | set(self._parked):
            entry = table.get(name)
            if entry is None:
                self._views.pop(name, None)
            else:
                self._views[name] = self._view(entry)
        table.changed.clear()
        s = self.engine.scheduler
        plan = s.plan
        self.snapshot = ReplicaSnapshot(
            index=self.index, healthy=self.error is None, error=self.error, steps=self.engine.steps,
            step_adapters=self.engine.step_adapters,
            waiting=len(s.waiting), parked=sum(len(w) for w in self._parked.values()), running=len(s.running),
            kv_pages=plan.kv_pages, adapter_pages=plan.adapter_pages, free_pages=plan.free_pages,
            cache_pages=plan.cache_pages, num_pages=plan.num_pages, preemptions=s.preemptions,
            adapters=MappingProxyType(dict(self._views)),
            prefix_tokens=MappingProxyType({a: tuple(c) for a, c in s.prefix_tokens.items()}))


class RequestFailed(Exception):
    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class ReplicaHandle:
    """The front ends' side of one replica, on their event loop."""

    def __init__(self, replica: Replica, loop: asyncio.AbstractEventLoop):
        self.replica, self.loop = replica, loop
        self.index = replica.index
        self._ids = itertools.count()
        self._streams: dict[int, asyncio.Queue] = {}
        self._replies: dict[int, asyncio.Future] = {}
        replica.outbox = self._from_replica

    @property
    def snapshot(self) -> ReplicaSnapshot:
        return self.replica.snapshot

    @property
    def in_flight(self) -> int:
        """Requests sent here that have not ended."""
        return len(self._streams)

    def _from_replica(self, messages: list) -> None:  # the replica's thread
        self.loop.call_soon_threadsafe(self._dispatch, messages)

    def _dispatch(self, messages: list) -> None:
        for m in messages:
            if isinstance(m, ReplicaDown):
                self.fail_all(m.message)
            elif isinstance(m, Reply):
                future = self._replies.pop(m.reply, None)
                if future is not None and not future.done():
                    future.set_result(m)
            else:
                stream = self._streams.get(m.key)
                if stream is not None:
                    stream.put_nowait(m)
                    if isinstance(m, Failed) or m.finish_reason is not None:
                        del self._streams[m.key]

    def fail_all(self, message: str) -> None:
        """Ends every request and command in flight here with UNAVAILABLE (the replica failed, or the
        server drains); tokens already delivered stay delivered."""
        streams, self._streams = self._streams, {}
        for key, stream in streams.items():
            stream.put_nowait(Failed(key, Code.UNAVAILABLE, message))
        replies, self._replies = self._replies, {}
        for reply, future in replies.items():
            if not future.done():
                future.set_result(Reply(reply, Code.UNAVAILABLE, message))

    def replace(self, replica: Replica) -> None:
        """Serves through a new replica from now on (its supervisor rebuilt it)."""
        self.fail_all(f"replica {self.index} was replaced; the request may be retried")
        self.replica = replica
        replica.outbox = self._from_replica

    def submit(self, request: Request) -> RequestStream:
        key = next(self._ids)
        self._streams[key] = asyncio.Queue()
        self.replica.send(AddRequest(key, request))
        return RequestStream(self, key, self._streams[key])

    def abort(self, key: int, reason: str = "cancelled") -> None:
        if self._streams.pop(key, None) is not None:
            self.replica.send(Abort(key, reason))

    async def command(self, make) -> object:
        """Sends make(reply_id) and waits for its Reply; raises RequestFailed with its code."""
        reply = next(self._ids)
        future = self.loop.create_future()
        self._replies[reply] = future
        self.replica.send(make(reply))
        try:
            answer = await future
        finally:
            self._replies.pop(reply, None)
        if answer.code is not None:
            raise RequestFailed(answer.code, answer.message)
        return answer.value

    async def load_adapter(self, name: str, path: str | None = None) -> AdapterView:
        return await self.command(lambda reply: LoadAdapter(reply, name, path))

    async def unload_adapter(self, name: str, timeout: float) -> int:
        return await self.command(lambda reply: UnloadAdapter(reply, name, timeout))


class RequestStream:
    """One request's messages: iterate for Tokens; a Failed ends it with RequestFailed."""

    def __init__(self, handle: ReplicaHandle, key: int, messages: asyncio.Queue):
        self.handle, self.key, self._messages = handle, key, messages
        self.done = False
        self._failure: Failed | None = None

    async def next_batch(self) -> list[Tokens]:
        """The Tokens that have arrived (at least one); raises RequestFailed once they are all out."""
        if self._failure is None:
            batch = [await self._messages.get()]
            while not self._messages.empty():
                batch.append(self._messages.get_nowait())
            tokens = [m for m in batch if isinstance(m, Tokens)]
            self._failure = next((m for m in batch if isinstance(m, Failed)), None)
            if tokens:  # tokens that came before a failure still reach the client
                self.done = self._failure is not None or tokens[-1].finish_reason is not None
                return tokens
        self.done = True
        raise RequestFailed(self._failure.code, self._failure.message)

    def close(self, reason: str = "cancelled") -> None:
        """Ends the request in the replica unless it already ended there."""
        if not self.done:
            self.done = True
            self.handle.abort(self.key, reason)
