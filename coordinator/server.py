"""The gRPC front end: the public LoraFleet service over one or more replica cores, and the
server that runs it beside the OpenAI-compatible HTTP front end (openai_api.py).

Both front ends share one Fleet: they parse requests with the one request model, route them
from the replicas' snapshots, send messages to the chosen replica and stream what the one
output processor makes of its tokens. Neither touches a replica's scheduler, page plan or
adapter table.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..v1 import lorafleet_pb2 as pb
from .adapters import DiskCatalog
from .config import EngineConfig
from .engine import Engine
from .messages import Code, ReplicaSnapshot
from .metrics import Metrics
from .openai_api import OpenAIServer
from .pages import PagePlan
from .output import OutputProcessor
from .replica import Replica, ReplicaHandle, RequestFailed, RequestStream
from .request import InvalidRequest, RequestParser, check_adapter_name, fields_from_proto
from .router import Router

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["LoraFleet"].full_name
MAX_MESSAGE = 4 * 2**20  # bytes of one gRPC message either way (the README says so)
# The replicas' threads let the GIL go at every torch op; a thread that takes it then (the adapter
# loader checking a file, the event loop) keeps it until it lets go itself or the switch interval
# (5 ms by default) runs out. 1 ms while serving: bench/serving.py's n = 1000 phase, run alternately
# with each setting, +1.7%, +3.2% and +4.0% in three pairs against 5 ms (the loader reads about 14
# adapters a second there).
GIL_SWITCH_S = 0.001
RETRIES = 2  # times a request whose replica failed before its first token is sent to another one


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    metrics_port: int | None = 9400  # 0 picks a free port, None turns metrics off
    admin_token_file: str | None = None
    http_port: int | None = None  # the OpenAI-compatible HTTP API; 0 picks a free port, None turns it off
    api_key: str | None = None  # when set, every /v1 HTTP call must send "Authorization: Bearer <key>"
    served_model_name: str | None = None  # the base model's id in the HTTP API; None: the model folder's name
    tls_cert: str | None = None
    tls_key: str | None = None
    shutdown_grace: float = 10.0
    unload_timeout: float = 300.0
    max_restarts: int = 5  # per replica; restarts wait 1, 2, 4 ... up to 30 s after each failure

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0, got {self.max_restarts}")
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


@dataclass(frozen=True)
class ModelFacts:
    """What GetServerInfo tells, fixed when the replicas are built."""

    vocab_size: int
    max_model_len: int
    pool_pages: int


def queue_limit(cfg: EngineConfig, pool_pages: int, replicas: int) -> int:
    """--max-queue, or by default what the pools could take in: every replica's pages at 64 tokens a
    request, and at least 4 batches; requests past it get RESOURCE_EXHAUSTED instead of memory."""
    if cfg.max_queue is not None:
        return cfg.max_queue
    return max(4 * cfg.max_num_seqs, replicas * pool_pages // 64)


@dataclass(frozen=True)
class AdapterListing:
    """One adapter as the listing calls show it (the fields of lorafleet.v1.AdapterInfo)."""

    name: str
    rank: int = 0
    targets: tuple[str, ...] = ()
    residence: str = "disk"  # device_pool, host_cache, reading, unloading, failed, disk or refused
    requests: int = 0
    pool_pages: int = 0
    replicas: tuple[int, ...] = ()  # where it is resident
    error: str = ""


def check_admin(admin_token: str | None, authorization: str, loopback: bool) -> None:
    """The admin rule of every front end: the server's token as "Bearer <token>" when it has one,
    else a caller on loopback. Raises RequestFailed (UNAUTHENTICATED or PERMISSION_DENIED)."""
    if admin_token is not None:
        if not hmac.compare_digest(authorization.encode(), f"Bearer {admin_token}".encode()):
            raise RequestFailed(Code.UNAUTHENTICATED,
                                "admin calls need 'authorization: Bearer <token>' with the server's admin token")
    elif not loopback:
        raise RequestFailed(Code.PERMISSION_DENIED,
                            "admin calls are accepted from loopback only unless the server has --admin-token-file")


class Fleet:
    """What every front end shares: the replicas' handles and snapshots, the router, the one request
    parser, the adapter folder's catalog, the admin calls and the request metrics."""

    def __init__(self, cfg: ServerConfig, replicas: list[ReplicaHandle], parser: RequestParser, facts: ModelFacts,
                 metrics: Metrics):
        self.cfg, self.replicas, self.parser, self.facts, self.metrics = cfg, replicas, parser, facts, metrics
        self.tokenizer = parser.tokenizer
        self.router = Router(replicas, cfg.engine.max_num_seqs)
        self.catalog = DiskCatalog(Path(cfg.engine.adapters_dir).resolve() if cfg.engine.adapters_dir else None)
        self.admin_token = cfg.admin_token()
        self.max_queue = queue_limit(cfg.engine, facts.pool_pages, len(replicas))
        self.draining = False

    def snapshots(self) -> list[ReplicaSnapshot]:
        return [r.snapshot for r in self.replicas]

    def serving(self) -> bool:
        return not self.draining and any(s.healthy for s in self.snapshots())

    def authorize(self, authorization: str, loopback: bool) -> None:
        check_admin(self.admin_token, authorization, loopback)

    def check_open(self) -> None:
        if self.draining:
            raise RequestFailed(Code.UNAVAILABLE, "the server is shutting down; retry on another replica")

    def route(self, adapter: str | None) -> ReplicaHandle:
        """The replica for a request; RequestFailed UNAVAILABLE when none serves, RESOURCE_EXHAUSTED when the queue is full."""
        replica = self.router.pick(adapter)
        if replica is None:
            raise RequestFailed(Code.UNAVAILABLE, "no replica is serving; the request may be retried")
        queued = sum(r.in_flight for r in self.replicas) - sum(s.running for s in self.snapshots())
        if queued >= self.max_queue:
            raise RequestFailed(Code.RESOURCE_EXHAUSTED, f"the queue is full ({queued} requests waiting); retry later")
        return replica

    async def next_batch(self, stream: RequestStream, request, sent_tokens: int) -> tuple[RequestStream, list]:
        """The next tokens of a request (and the stream they came on): a request whose replica failed
        before its first token is sent to another healthy replica, at most RETRIES times."""
        for attempt in range(RETRIES + 1):
            try:
                return stream, await stream.next_batch()
            except RequestFailed as f:
                retry = f.code == Code.UNAVAILABLE and not sent_tokens and attempt < RETRIES and not self.draining
                other = self.router.pick(request.adapter) if retry else None
                if other is None:
                    raise
                stream = other.submit(request)
        raise AssertionError("unreachable")

    def observe(self, frontend: str, adapter: str | None, status: str, started: float, first_token: float | None,
                tokens: int) -> None:
        """One finished request in the metrics; an adapter no replica knows counts as __unknown__."""
        known = adapter is None or any(adapter in s.adapters for s in self.snapshots())
        self.metrics.observe_finished(frontend, adapter if known else "__unknown__", status, started, first_token,
                                      time.monotonic(), tokens)

    # ------------------------------------------------------------- adapters

    def _admin_replicas(self, name: str) -> list[ReplicaHandle]:
        try:
            check_adapter_name(name)
        except InvalidRequest as e:
            raise RequestFailed(Code.INVALID_ARGUMENT, str(e)) from e
        replicas = self.router.healthy()
        if not replicas:
            raise RequestFailed(Code.UNAVAILABLE, "no replica is serving; retry later")
        return replicas

    async def load_adapter(self, name: str, path: str | None) -> AdapterListing:
        """Loads (or reloads) an adapter on every healthy replica; the caller checked the admin rule."""
        replicas = self._admin_replicas(name)
        await asyncio.gather(*(h.load_adapter(name, path or None) for h in replicas))
        return self.adapter(name, self.snapshots())

    async def unload_adapter(self, name: str) -> int:
        """Unloads an adapter from every replica that holds it; returns the requests drained."""
        replicas = self._admin_replicas(name)
        results = await asyncio.gather(*(h.unload_adapter(name, self.cfg.unload_timeout) for h in replicas),
                                       return_exceptions=True)
        failures = [e for e in results if isinstance(e, BaseException)]
        real = [e for e in failures if not (isinstance(e, RequestFailed) and e.code == Code.NOT_FOUND)]
        if real:
            raise real[0]
        if len(failures) == len(results):
            raise RequestFailed(Code.NOT_FOUND, f"adapter {name!r} is not loaded")
        return sum(n for n in results if isinstance(n, int))

    def adapters(self) -> list[AdapterListing]:
        """Every adapter a replica holds, then every other folder of the adapters folder."""
        snapshots = self.snapshots()
        names = set().union(*(s.adapters for s in snapshots))
        listings = [self.adapter(n, snapshots) for n in sorted(names)]
        for item in self.catalog.items():
            if item["name"] not in names:
                listings.append(AdapterListing(name=item["name"], rank=item["rank"], targets=tuple(item["targets"]),
                                               residence="refused" if item["error"] else "disk", error=item["error"] or ""))
        return listings

    @staticmethod
    def adapter(name: str, snapshots: list[ReplicaSnapshot]) -> AdapterListing:
        views = [(s.index, s.adapters[name]) for s in snapshots if name in s.adapters]
        states = {v.state for _, v in views}
        residence = next((label for state, label in (("resident", "device_pool"), ("host_ready", "host_cache"),
                                                     ("reading", "reading"), ("unloading", "unloading"),
                                                     ("failed", "failed")) if state in states), "disk")
        known = next((v for _, v in views if v.rank), views[0][1] if views else None)
        return AdapterListing(
            name=name, rank=known.rank if known else 0, targets=tuple(known.targets) if known else (), residence=residence,
            requests=sum(v.requests for _, v in views), pool_pages=known.num_pages if known else 0,
            replicas=tuple(i for i, v in views if v.state == "resident"),
            error=next((v.reason for _, v in views if v.reason), ""))


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _status(code: Code) -> grpc.StatusCode:
    return grpc.StatusCode[code.name]


@dataclass(frozen=True)
class _Undecodable:
    error: str


def _lenient(message_type):
    """A deserializer that hands a request it cannot decode to the handler, which refuses it."""
    def decode(data: bytes):
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError) as e:
            return _Undecodable(f"the request is not a valid {message_type.DESCRIPTOR.full_name}: {e}")
    return decode


class LoraFleetService:
    def __init__(self, fleet: Fleet):
        self.fleet, self.cfg, self.facts = fleet, fleet.cfg, fleet.facts
        self.parser, self.tokenizer = fleet.parser, fleet.tokenizer
        self.admin_token = fleet.admin_token

    def handler(self) -> grpc.GenericRpcHandler:
        methods = pb.DESCRIPTOR.services_by_name["LoraFleet"].methods_by_name
        rpc = {
            "Generate": grpc.unary_stream_rpc_method_handler, "LoadAdapter": grpc.unary_unary_rpc_method_handler,
            "UnloadAdapter": grpc.unary_unary_rpc_method_handler, "ListAdapters": grpc.unary_unary_rpc_method_handler,
            "GetServerInfo": grpc.unary_unary_rpc_method_handler,
        }
        handlers = {}
        for name, make in rpc.items():
            m = methods[name]
            request_type = getattr(pb, m.input_type.name)
            handlers[name] = make(getattr(self, name), request_deserializer=_lenient(request_type),
                                  response_serializer=lambda msg: msg.SerializeToString())
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    # ------------------------------------------------------------- Generate

    async def Generate(self, request, context):
        started = time.monotonic()
        adapter, status, first_token, sent = None, "cancelled", None, 0
        stream = None
        try:
            if isinstance(request, _Undecodable):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
            adapter = request.adapter_id or None
            req = self._parse(request)
            replica = self.fleet.route(req.adapter)
            stream = replica.submit(req)
            processor = OutputProcessor(self.tokenizer, req)
            while not processor.finished:
                stream, batch = await self.fleet.next_batch(stream, req, processor.sent_tokens)
                tokens = [t for m in batch for t in m.token_ids]
                chunk = processor.push(tokens, batch[-1].finish_reason)
                if processor.stopped_by_string:
                    stream.close("stop")
                if first_token is None and tokens:
                    first_token = time.monotonic()
                sent = chunk.completion_tokens or processor.sent_tokens
                message = pb.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text, request_id=req.request_id)
                if chunk.finish_reason is not None:
                    message.finish_reason = chunk.finish_reason
                    message.usage.prompt_tokens, message.usage.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                    status = "ok"
                yield message
        except _Abort as a:
            status = a.code.name.lower()
            await context.abort(a.code, a.message)
        except RequestFailed as f:
            status = f.code.value
            if stream is not None:  # what was streamed before the failure
                context.set_trailing_metadata((("lorafleet-prompt-tokens", str(len(req.prompt_ids))),
                                               ("lorafleet-completion-tokens", str(processor.sent_tokens))))
            await context.abort(_status(f.code), f.message)
        finally:
            if stream is not None:
                stream.close()  # the client went away or its deadline passed: free its pages now
            self.fleet.observe("grpc", adapter, status, started, first_token, sent)

    def _parse(self, r: pb.GenerateRequest):
        self.fleet.check_open()
        try:
            return self.parser.parse(fields_from_proto(r, r.request_id or uuid.uuid4().hex))
        except InvalidRequest as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e

    # ------------------------------------------------------------- adapters

    def _authorize(self, context) -> None:
        peer = context.peer() or ""
        loopback = peer.startswith("ipv4:127.") or peer.startswith("ipv6:[::1]") or peer.startswith("unix:")
        try:
            check_admin(self.admin_token, dict(context.invocation_metadata()).get("authorization", ""), loopback)
        except RequestFailed as f:
            raise _Abort(_status(f.code), f.message) from f

    async def _admin(self, request, context, call):
        try:
            if isinstance(request, _Undecodable):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
            self._authorize(context)
            return await call(request)
        except _Abort as a:
            await context.abort(a.code, a.message)
        except RequestFailed as f:
            await context.abort(_status(f.code), f.message)

    async def LoadAdapter(self, request, context):
        async def load(r):
            return pb.LoadAdapterResponse(adapter=_info(await self.fleet.load_adapter(r.name, r.path or None)))
        return await self._admin(request, context, load)

    async def UnloadAdapter(self, request, context):
        async def unload(r):
            return pb.UnloadAdapterResponse(requests_drained=await self.fleet.unload_adapter(r.name))
        return await self._admin(request, context, unload)

    async def ListAdapters(self, request, context):
        return pb.ListAdaptersResponse(adapters=[_info(a) for a in self.fleet.adapters()])

    async def GetServerInfo(self, request, context):
        e = self.cfg.engine
        return pb.ServerInfo(
            model=str(Path(e.model_dir).name), dtype=e.dtype, tp=e.tp, replicas=len(self.fleet.replicas),
            max_lora_rank=e.max_lora_rank, max_model_len=self.facts.max_model_len, max_num_seqs=e.max_num_seqs,
            max_batched_tokens=e.max_batched_tokens, pool_pages=self.facts.pool_pages,
            vocab_size=self.facts.vocab_size, version=_version(), prefix_cache=e.prefix_cache,
            adapter_affinity=e.adapter_affinity)


def _info(listing: AdapterListing) -> pb.AdapterInfo:
    return pb.AdapterInfo(**asdict(listing))


def _version() -> str:
    from importlib.metadata import version

    return version("lorafleet")


class LoraFleetServer:
    """Binds its ports, builds the replicas, serves gRPC (with health and reflection), the OpenAI
    HTTP API (on the same event loop) and metrics, runs its background tasks under supervision,
    shuts down gracefully."""

    def __init__(self, cfg: ServerConfig, page_plan=PagePlan):
        """page_plan: builds each replica's page accounting (bench/ablations.py injects its variants)."""
        self.cfg, self.page_plan = cfg, page_plan
        self._switch_interval = sys.getswitchinterval()  # set back at stop
        self.replicas: list[Replica] = []
        self.handles: list[ReplicaHandle] = []
        self.engines: list[Engine] = []
        self.server: grpc.aio.Server | None = None
        self.metrics = Metrics()
        self.port = self.metrics_port = self.http_port = None
        self.http: OpenAIServer | None = None
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._restarts: list[int] = []  # per replica, since start
        self._restarting: dict[int, asyncio.Task] = {}
        self.health = health.aio.HealthServicer()
        self._on_disk = 0  # valid adapter folders that no replica holds

    async def start(self) -> None:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_MESSAGE),
                                               ("grpc.max_send_message_length", MAX_MESSAGE)])
        self.port = self._bind()
        if self.cfg.http_port is not None:
            self.http = OpenAIServer(self.cfg.host, self.cfg.http_port, self.cfg.shutdown_grace)
            self.http_port = self.http.port
        if self.cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.cfg.host, self.cfg.metrics_port)
        try:
            await asyncio.to_thread(self._build_engines)
        except BaseException:
            self.metrics.close()
            if self.http is not None:
                self.http.close()
            raise
        loop = asyncio.get_running_loop()
        sys.setswitchinterval(GIL_SWITCH_S)
        engine0 = self.engines[0]
        facts = ModelFacts(engine0.model.vocab_size, engine0.scheduler.cfg.max_model_len, engine0.scheduler.plan.num_pages)
        self.replicas = [Replica(i, e) for i, e in enumerate(self.engines)]
        self.handles = [ReplicaHandle(r, loop) for r in self.replicas]
        for replica in self.replicas:
            replica.start()
        self.fleet = Fleet(self.cfg, self.handles, engine0.parser, facts, self.metrics)
        self.service = LoraFleetService(self.fleet)
        self.server.add_generic_rpc_handlers((self.service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        await self.server.start()
        if self.http is not None:
            await self.http.start(self.fleet)
        await self._set_health(True)
        self._restarts = [0] * len(self.replicas)
        for name, body, interval in (("gauges", self._gauges, 0.5), ("health", self._watch_health, 0.1),
                                     ("adapter folder", self._watch_folder, 0.5), ("replicas", self._watch_replicas, 0.1)):
            self._tasks.append(asyncio.create_task(self._supervise(name, body, interval)))

    def _bind(self) -> int:
        address = f"{self.cfg.host}:{self.cfg.port}"
        try:
            if self.cfg.tls_cert:
                creds = grpc.ssl_server_credentials([(Path(self.cfg.tls_key).read_bytes(), Path(self.cfg.tls_cert).read_bytes())])
                port = self.server.add_secure_port(address, creds)
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if not port:
            raise OSError(f"cannot listen on {address}: the port is in use or the address is not this machine's; "
                          "choose another with --port (0 picks a free one)")
        return port

    def _build_engines(self) -> None:
        try:
            for _ in range(self.cfg.replicas):
                self.engines.append(self._build_engine())
        except BaseException:
            self._shutdown_engines()
            raise

    def _build_engine(self) -> Engine:
        from ..worker.executor import RayWorkerGroup

        cfg = self.cfg.engine
        use_ray = cfg.tp > 1 or self.cfg.replicas > 1 or cfg.ray_address is not None
        cpus = max(0.1, min(1.0, (os.cpu_count() or 1) / (cfg.tp * self.cfg.replicas)))
        executor = RayWorkerGroup(cfg.worker_config(), cfg.tp, cfg.ray_address, cpus_per_rank=cpus) if use_ray else None
        return Engine(cfg, executor, self.page_plan)

    # ------------------------------------------------------------- supervision

    async def _watch_replicas(self) -> None:
        """Starts rebuilding each failed replica, at most --max-restarts times."""
        for handle in self.handles:
            i = handle.index
            if handle.snapshot.healthy or i in self._restarting or self.fleet.draining:
                continue
            if self._restarts[i] >= self.cfg.max_restarts:
                continue  # given up: it stays NOT_SERVING, the others serve
            self._restarting[i] = asyncio.create_task(self._restart(i))
            self._restarting[i].add_done_callback(lambda _t, i=i: self._restarting.pop(i, None))

    async def _restart(self, i: int) -> None:
        """Releases the failed replica's workers and placement group, then builds a new group (empty pool
        and host memory; adapters come back on demand), after a backoff of 1, 2, 4 ... 30 s."""
        handle, old = self.handles[i], self.replicas[i]
        self._restarts[i] += 1
        started = time.monotonic()
        await asyncio.to_thread(self._retire, old)
        await asyncio.sleep(min(30.0, 2.0 ** (self._restarts[i] - 1)))
        try:
            engine = await asyncio.to_thread(self._build_engine)
        except Exception:
            log.exception("replica %d: rebuilding it failed (try %d of %d)", i, self._restarts[i], self.cfg.max_restarts)
            return  # still unhealthy: the next round tries again, within --max-restarts
        adopt = getattr(engine.executor, "adopt_ray", None)
        if adopt is not None and hasattr(old.engine.executor, "adopt_ray"):
            adopt(old.engine.executor)  # whoever started the embedded Ray, the live group stops it at the end
        replica = Replica(i, engine)
        self.replicas[i], self.engines[i] = replica, engine
        handle.replace(replica)
        replica.start()
        log.info("replica %d is serving again, %.1f s after its failure was handled", i, time.monotonic() - started)

    @staticmethod
    def _retire(replica: Replica) -> None:
        replica.engine.executor.abort()
        replica.stop(timeout=5.0)  # a thread stuck in a local step is left behind (daemon)
        replica.engine.shutdown(stop_ray=False)

    # ------------------------------------------------------------- background tasks

    async def _supervise(self, name: str, body, interval: float) -> None:
        """Runs body() every interval until stop; an exception in one round is logged, the next round runs."""
        while not self._stopped.is_set():
            try:
                await body()
            except Exception:
                log.exception("background task %r failed; it runs again in %.1fs", name, interval)
            try:
                await asyncio.wait_for(self._stopped.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass

    async def _gauges(self) -> None:
        snapshots = self.fleet.snapshots()
        for s in snapshots:
            self.metrics.observe_replica(s)
        states = [v.state for s in snapshots for v in s.adapters.values()]
        self.metrics.observe_tiers(states.count("resident"), states.count("host_ready"), self._on_disk)

    async def _watch_folder(self) -> None:
        items = await asyncio.to_thread(self.fleet.catalog.items, False)
        held = set().union(*(s.adapters for s in self.fleet.snapshots()))
        self._on_disk = sum(1 for item in items if item["name"] not in held and not item["error"])

    async def _watch_health(self) -> None:
        await self._set_health(self.fleet.serving())

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    # ------------------------------------------------------------- lifecycle

    def ready_line(self) -> str:
        return json.dumps({"event": "ready", "host": self.cfg.host, "port": self.port, "http_port": self.http_port,
                           "metrics_port": self.metrics_port, "tp": self.cfg.engine.tp, "replicas": self.cfg.replicas})

    async def stop(self) -> None:
        """Graceful drain: health NOT_SERVING and new requests refused; running requests get
        --shutdown-grace to finish, the rest end with UNAVAILABLE; then the workers stop."""
        if self.server is None:
            return
        if hasattr(self, "fleet"):
            self.fleet.draining = True
        await self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + self.cfg.shutdown_grace
        while any(h.in_flight for h in self.handles) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for handle in self.handles:
            handle.fail_all("the server is shutting down; retry on another replica")
        await asyncio.gather(self.server.stop(1.0),  # the streams just ended send their status
                             self.http.stop() if self.http is not None else asyncio.sleep(0))
        self._stopped.set()
        for task in self._restarting.values():
            task.cancel()
        await asyncio.gather(*self._tasks, *self._restarting.values(), return_exceptions=True)
        for replica in self.replicas:
            replica.stop()
        await asyncio.to_thread(self._shutdown_engines)
        self.metrics.close()
        sys.setswitchinterval(self._switch_interval)
        self.server = None

    def _shutdown_engines(self) -> None:
        # the group that started the embedded Ray (the first, or the one that took over from it) stops last
        for engine in sorted(self.engines, key=lambda e: getattr(e.executor, "_owns_ray", False)):
            engine.shutdown()
        self.engines = []

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(cfg: ServerConfig, announce=print, page_plan=PagePlan) -> None:
    """Runs until SIGINT or SIGTERM, then shuts down gracefully."""
    server = LoraFleetServer(cfg, page_plan)
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
