"""The gRPC coordinator: the public LoraFleet service over one or more replicas."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..v1 import lorafleet_pb2 as pb
from ..v1 import lorafleet_pb2_grpc as pb_grpc
from ..worker.adapters import AdapterError
from ..worker.step import SamplingParams
from .adapters import AdapterNotFound, AdapterPathDenied, AdapterRegistry, disk_adapter_summary
from .config import EngineConfig
from .engine import Engine, InvalidRequest
from .engine_loop import EngineLoop
from .metrics import Metrics, adapter_label
from .router import Router
from .scheduler import Output, RequestTooLarge
from .sequence import Request
from .tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["LoraFleet"].full_name
DEFAULT_MAX_NEW_TOKENS = 16
MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    metrics_port: int | None = 9400  # 0 picks a free port, None turns metrics off
    admin_token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    shutdown_grace: float = 10.0
    unload_timeout: float = 300.0

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both --tls-cert and --tls-key, or neither")
        for f in (self.admin_token_file, self.tls_cert, self.tls_key):
            if f is not None and not Path(f).is_file():
                raise ValueError(f"{f}: no such file")

    def admin_token(self) -> str | None:
        if self.admin_token_file is None:
            return None
        token = Path(self.admin_token_file).read_text().strip()
        if not token:
            raise ValueError(f"{self.admin_token_file} is empty; put the admin token in it")
        return token


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


REQUEST_STATUS = (
    (AdapterPathDenied, grpc.StatusCode.PERMISSION_DENIED),
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (AdapterError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (RequestTooLarge, grpc.StatusCode.INVALID_ARGUMENT),
)


def _status_of(error: Exception) -> _Abort:
    for kind, code in REQUEST_STATUS:
        if isinstance(error, kind):
            return _Abort(code, str(error))
    return _Abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


class LoraFleetService(pb_grpc.LoraFleetServicer):
    def __init__(self, cfg: ServerConfig, loops: list[EngineLoop], tokenizer: Tokenizer | None, metrics: Metrics):
        self.cfg, self.loops, self.tokenizer, self.metrics = cfg, loops, tokenizer, metrics
        self.router = Router(loops, cfg.engine.max_num_seqs)
        self.roots = AdapterRegistry(cfg.engine.adapters_dir)  # path rules only
        self.catalog: dict[str, Path] = {}  # adapters loaded by LoadAdapter, with their folders
        self.unloading: set[str] = set()
        self.admin_token = cfg.admin_token()
        self.engine0 = loops[0].engine
        self.draining = False

    # ------------------------------------------------------------- Generate

    async def Generate(self, request: pb.GenerateRequest, context):
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        adapter = request.adapter_id or None
        try:
            req, stops = self._parse(request, request_id)
            loop = self.router.pick(adapter)
            seq, outputs = await self._submit(loop, req)
        except _Abort as a:
            known = adapter is None or any(lp.engine.registry.known(adapter) for lp in self.loops)
            self.metrics.requests.labels(adapter_label(adapter) if known else "__unknown__", a.code.name.lower()).inc()
            await context.abort(a.code, a.message)
            return
        status, first_token = "cancelled", None
        try:
            async for message, finished in self._stream(req, stops, seq, outputs, loop):
                if first_token is None and message.token_ids:
                    first_token = time.monotonic()
                yield message
                if finished:
                    status = "ok" if message.finish_reason != "error" else "error"
                    break
        finally:
            loop.forget(seq.seq_id)
            if status == "cancelled":  # the client went away or its deadline passed
                loop.call(lambda e: e.abort(seq))
            self.metrics.observe_finished(adapter, status, started, first_token, time.monotonic(), len(seq.output_ids))

    def _parse(self, r: pb.GenerateRequest, request_id: str) -> tuple[Request, list[str]]:
        if self.draining:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        given = [f for f, present in (("prompt", bool(r.prompt)), ("prompt_token_ids", len(r.prompt_token_ids) > 0),
                                      ("messages", len(r.messages) > 0)) if present]
        if len(given) != 1:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "give exactly one of prompt, prompt_token_ids or messages" + (f" (got {', '.join(given)})" if given else " (the prompt is empty)"))
        if given[0] != "prompt_token_ids" and self.tokenizer is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{given[0]} needs a tokenizer.json in the model folder; send prompt_token_ids")
        if given[0] == "prompt":
            prompt_ids = self.tokenizer.encode(r.prompt)
        elif given[0] == "messages":
            try:
                prompt_ids = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in r.messages])
            except ValueError as e:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"messages: {e}") from e
        else:
            prompt_ids = list(r.prompt_token_ids)
        if len(r.stop) > MAX_STOP_STRINGS or any(not s or len(s) > 256 for s in r.stop):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"stop: at most {MAX_STOP_STRINGS} non-empty strings of up to 256 characters")
        if r.stop and self.tokenizer is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "stop strings need a tokenizer; use stop_token_ids")
        if r.adapter_id and r.adapter_id in self.unloading:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"adapter {r.adapter_id!r} is being unloaded")
        waiting = sum(len(loop.engine.scheduler.waiting) for loop in self.loops)
        if waiting >= self.cfg.engine.max_queue:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the queue is full ({waiting} requests waiting); retry later")
        return Request(
            request_id=request_id, prompt_ids=prompt_ids,
            max_new_tokens=r.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, adapter=r.adapter_id or None,
            sampling=SamplingParams(
                temperature=r.temperature, top_p=r.top_p if r.HasField("top_p") else 1.0, top_k=r.top_k,
                seed=r.seed if r.HasField("seed") else None),
            stop_token_ids=tuple(r.stop_token_ids), ignore_eos=r.ignore_eos,
        ), list(r.stop)

    async def _submit(self, loop: EngineLoop, req: Request):
        outputs: asyncio.Queue[Output] = asyncio.Queue()
        path = self.catalog.get(req.adapter) if req.adapter else None

        def add(engine: Engine):
            if req.adapter is not None:  # registered above; again only if it was unloaded meanwhile
                engine.ensure_adapter(req.adapter, str(path) if path else None)
            seq = engine.add(req)
            loop.listen(seq.seq_id, outputs.put_nowait)
            return seq

        try:
            if req.adapter is not None:  # read off the engine thread: running requests keep streaming
                await loop.ensure_adapter(req.adapter, str(path) if path else None)
            seq = await loop.call(add)
        except Exception as e:  # noqa: BLE001 - every failure becomes a status with its message
            raise _status_of(e) from e
        return seq, outputs

    async def _stream(self, req: Request, stops: list[str], seq, outputs: asyncio.Queue, loop: EngineLoop):
        """Yields (GenerateResponse, finished); holds back text that could start a stop string."""
        decoder = IncrementalDecoder(self.tokenizer) if self.tokenizer else None
        hold = max((len(s) for s in stops), default=1) - 1
        pending_text, sent_tokens = "", 0
        while True:
            batch = [await outputs.get()]
            while not outputs.empty():
                batch.append(outputs.get_nowait())
            finished = batch[-1].finished
            if finished and batch[-1].token < 0:
                yield pb.GenerateResponse(finish_reason="error", request_id=req.request_id), True
                return
            tokens = [o.token for o in batch]
            sent_tokens += len(tokens)
            if decoder is not None:
                pending_text += decoder.push(tokens)
                if finished:
                    pending_text += decoder.flush()
            reason = seq.finish_reason if finished else None
            cut = _find_stop(pending_text, stops)
            if cut is not None:
                pending_text, reason, finished = pending_text[:cut], "stop", True
                if seq.finish_reason is None:
                    loop.call(lambda e: e.abort(seq, reason="stop"))
            if finished:
                text, pending_text = pending_text, ""
            else:
                keep = min(hold, len(pending_text))
                text, pending_text = pending_text[:len(pending_text) - keep], pending_text[len(pending_text) - keep:]
            message = pb.GenerateResponse(token_ids=tokens, text=text, request_id=req.request_id)
            if finished:
                message.finish_reason = reason or "stop"
                message.usage.prompt_tokens = len(req.prompt_ids)
                message.usage.completion_tokens = sent_tokens
            yield message, finished
            if finished:
                return

    # ------------------------------------------------------------- adapters

    def _authorize(self, context) -> None:
        if self.admin_token is not None:
            auth = dict(context.invocation_metadata()).get("authorization", "")
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.admin_token}".encode()):
                raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "admin calls need 'authorization: Bearer <token>' with the server's admin token")
            return
        peer = context.peer() or ""
        if not (peer.startswith("ipv4:127.") or peer.startswith("ipv6:[::1]") or peer.startswith("unix:")):
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED,
                         "admin calls are accepted from loopback only unless the server has --admin-token-file")

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context):
        try:
            self._authorize(context)
            name = request.name
            folder = self.roots.resolve(name, request.path or None)
            if name in self.unloading:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"adapter {name!r} is being unloaded; load it again when that finishes")
            known = self.catalog.get(name) or next((lp.engine.registry.entries[name].path for lp in self.loops if lp.engine.registry.known(name)), None)
            if known is not None and known != folder:
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, f"adapter {name!r} is already loaded from {known}; unload it first")
            await asyncio.gather(*(loop.ensure_adapter(name, str(folder)) for loop in self.loops))
            self.catalog[name] = folder
            return pb.LoadAdapterResponse(adapter=self._adapter_info(name))
        except _Abort as a:
            await context.abort(a.code, a.message)
        except Exception as e:  # noqa: BLE001
            a = _status_of(e)
            await context.abort(a.code, a.message)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context):
        name = request.name
        try:
            self._authorize(context)
            if name not in self.catalog and not any(lp.engine.registry.known(name) for lp in self.loops):
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"adapter {name!r} is not loaded")
            if name in self.unloading:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"adapter {name!r} is already being unloaded")
        except _Abort as a:
            await context.abort(a.code, a.message)
            return
        self.unloading.add(name)
        try:
            drained = sum(lp.engine.adapter_users(name) for lp in self.loops)
            deadline = time.monotonic() + self.cfg.unload_timeout
            while any(lp.engine.adapter_users(name) for lp in self.loops):
                if time.monotonic() > deadline:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"requests with {name!r} did not finish within {self.cfg.unload_timeout:.0f}s")
                    return
                await asyncio.sleep(0.02)
            for loop in self.loops:
                await loop.call(lambda e: e.unload_adapter(name) if e.registry.known(name) else None)
            self.catalog.pop(name, None)
            return pb.UnloadAdapterResponse(requests_drained=drained)
        finally:
            self.unloading.discard(name)

    async def ListAdapters(self, request, context):
        names = set(self.catalog)
        for loop in self.loops:
            names |= set(loop.engine.registry.entries)
        cached = set()
        for loop in self.loops:
            cached |= set(await loop.call(lambda e: e.host_cached_adapters()))
        infos = [self._adapter_info(n, cached) for n in sorted(names)]
        if self.roots.root is not None:
            for summary in disk_adapter_summary(self.roots.root, exclude=names):
                infos.append(pb.AdapterInfo(name=summary["name"], rank=summary["rank"], targets=summary["targets"], residence="disk"))
        return pb.ListAdaptersResponse(adapters=infos)

    def _adapter_info(self, name: str, host_cached: set[str] | None = None) -> pb.AdapterInfo:
        entries = [lp.engine.registry.entries[name] for lp in self.loops if lp.engine.registry.known(name)]
        replicas = [lp.index for lp in self.loops if lp.engine.scheduler.plan.is_resident(name)]
        if replicas:
            residence = "device_pool"
        elif entries and (host_cached is None or name in host_cached):
            residence = "host_cache"
        else:
            residence = "disk"
        e = entries[0] if entries else None
        return pb.AdapterInfo(
            name=name, rank=e.rank if e else 0, targets=list(e.targets) if e else [], residence=residence,
            requests=sum(x.requests for x in entries), pool_pages=e.num_pages if e else 0, replicas=replicas)

    async def GetServerInfo(self, request, context):
        e = self.engine0
        return pb.ServerInfo(
            model=str(Path(self.cfg.engine.model_dir).name), dtype=self.cfg.engine.dtype, tp=self.cfg.engine.tp,
            replicas=len(self.loops), max_lora_rank=self.cfg.engine.max_lora_rank,
            max_model_len=e.scheduler.cfg.max_model_len, max_num_seqs=self.cfg.engine.max_num_seqs,
            max_batched_tokens=self.cfg.engine.max_batched_tokens, pool_pages=e.scheduler.plan.num_pages,
            vocab_size=e.model.vocab_size, version=_version())


def _find_stop(text: str, stops: list[str]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def _version() -> str:
    from importlib.metadata import version

    return version("lorafleet")


class LoraFleetServer:
    """Builds the replicas, serves gRPC (with health and reflection) and metrics, shuts down gracefully."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.loops: list[EngineLoop] = []
        self.engines: list[Engine] = []
        self.server: grpc.aio.Server | None = None
        self.metrics = Metrics()
        self.port = self.metrics_port = None
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._build_engines)
        self.loops = [EngineLoop(i, e, loop) for i, e in enumerate(self.engines)]
        for engine_loop in self.loops:
            engine_loop.start()
        tokenizer = self.engines[0].tokenizer
        self.service = LoraFleetService(self.cfg, self.loops, tokenizer, self.metrics)
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_LoraFleetServicer_to_server(self.service, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{self.cfg.host}:{self.cfg.port}"
        if self.cfg.tls_cert:
            creds = grpc.ssl_server_credentials([(Path(self.cfg.tls_key).read_bytes(), Path(self.cfg.tls_cert).read_bytes())])
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.cfg.host, self.cfg.metrics_port)
        self._tasks.append(asyncio.create_task(self._watch()))

    def _build_engines(self) -> None:
        from ..worker.executor import RayWorkerGroup

        cfg = self.cfg.engine
        use_ray = cfg.tp > 1 or self.cfg.replicas > 1 or cfg.ray_address is not None
        cpus = max(0.1, min(1.0, (os.cpu_count() or 1) / (cfg.tp * self.cfg.replicas)))
        try:
            for _ in range(self.cfg.replicas):
                executor = RayWorkerGroup(cfg.worker_config(), cfg.tp, cfg.ray_address, cpus_per_rank=cpus) if use_ray else None
                self.engines.append(Engine(cfg, executor))
        except BaseException:
            self._shutdown_engines()
            raise

    async def _watch(self) -> None:
        """Keeps the gauges fresh and notices a dead engine."""
        while not self._stopped.is_set():
            for lp in self.loops:
                plan = lp.engine.scheduler.plan
                self.metrics.observe_replica(lp.index, len(lp.engine.scheduler.waiting), len(lp.engine.scheduler.running),
                                             plan.kv_pages, plan.adapter_pages, plan.free_pages)
                if lp.error is not None:
                    await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            pooled = set().union(*(set(lp.engine.scheduler.plan.adapters) for lp in self.loops))
            registered = set().union(*(set(lp.engine.registry.entries) for lp in self.loops))
            on_disk = len(disk_adapter_summary(self.service.roots.root, registered)) if self.service.roots.root else 0
            self.metrics.observe_tiers(len(pooled), len(registered - pooled), on_disk)
            try:
                await asyncio.wait_for(self._stopped.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass

    def ready_line(self) -> str:
        return json.dumps({"event": "ready", "host": self.cfg.host, "port": self.port, "metrics_port": self.metrics_port,
                           "tp": self.cfg.engine.tp, "replicas": self.cfg.replicas})

    async def stop(self) -> None:
        """Stops accepting, lets in-flight requests finish within the grace period, then stops the workers."""
        if self.server is None:
            return
        self.service.draining = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.cfg.shutdown_grace)
        self._stopped.set()
        for task in self._tasks:
            await task
        for lp in self.loops:
            lp.stop()
        await asyncio.to_thread(self._shutdown_engines)
        self.metrics.close()
        self.server = None

    def _shutdown_engines(self) -> None:
        for engine in reversed(self.engines):  # the first started Ray; it stops last
            engine.shutdown()
        self.engines = []

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(cfg: ServerConfig, announce=print) -> None:
    """Runs until SIGINT or SIGTERM, then shuts down gracefully."""
    server = LoraFleetServer(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        await server.start()
        # after start: Ray's core worker installs its own SIGTERM handler, which aborts the process
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        announce(server.ready_line())
        await stop.wait()
    finally:
        await server.stop()
