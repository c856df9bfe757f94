"""The replica core's boundary: snapshots agree with the replica's state under random message
sequences; a malformed adapter folder leaves listing, metrics and health working; a read in flight
never makes a step wait; a failed step ends its streams with UNAVAILABLE; undecodable requests
and `lorafleet run` stop strings are handled."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from engines import AdapterReads, adapters_root, make_engine
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import peft_greedy

import lorafleet.worker.worker as worker_module
from lorafleet.coordinator.config import EngineConfig
from lorafleet.coordinator.messages import Abort, AddRequest, Failed, LoadAdapter, Reply, Tokens, UnloadAdapter
from lorafleet.coordinator.replica import Replica
from lorafleet.coordinator.run import run_batch
from lorafleet.coordinator.sequence import Request
from lorafleet.coordinator.server import SERVICE, LoraFleetServer, ServerConfig
from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc

WAIT = 60.0  # seconds: the bound of every wait below
IDS = itertools.count()
NAMES = ["r1_v", "r2_q", "r8_k", "r16_all", "nope", "bad-nan"]


@pytest.fixture(scope="module")
def root(tiny_models, tiny_adapters, tmp_path_factory):
    from peers import make_bad_adapter

    root = tmp_path_factory.mktemp("replica") / "adapters"
    shutil.copytree(adapters_root(tiny_adapters), root)
    make_bad_adapter(tiny_models["llama_gqa"], root / "bad-nan", "nan")
    return root


# ------------------------------------------------------------- snapshots (property-based)

def check_snapshot(replica: Replica) -> None:
    """The published snapshot says what the replica's own objects say."""
    snap, engine = replica.snapshot, replica.engine
    s, plan, table = engine.scheduler, engine.scheduler.plan, engine.adapters
    plan.check()
    assert (snap.waiting, snap.running, snap.steps, snap.step_adapters) == (len(s.waiting), len(s.running), engine.steps,
                                                                            engine.step_adapters)
    assert (snap.kv_pages, snap.adapter_pages, snap.cache_pages, snap.free_pages) == \
        (plan.kv_pages, plan.adapter_pages, plan.cache_pages, plan.free_pages)
    assert snap.kv_pages + snap.adapter_pages + snap.cache_pages + snap.free_pages == snap.num_pages == plan.num_pages
    assert snap.prefix_tokens == {a: tuple(c) for a, c in s.prefix_tokens.items()}
    assert set(snap.adapters) == set(table.entries)
    for name, view in snap.adapters.items():
        entry = table.entries[name]
        resident = plan.is_resident(name)
        assert view.state == ("resident" if resident and entry.state.value == "host_ready" else entry.state.value)
        assert view.users >= entry.users == sum(1 for q in list(s.waiting) + s.running if q.adapter == name)
        if resident:
            assert view.num_pages == len(plan.adapters[name].pages)
    # the workers hold every host-ready adapter, and otherwise only copies on their way in or out: a
    # read may finish after its adapter was unloaded, and its copy is dropped once its report comes
    worker = set(engine.executor.worker.host_adapters())
    by_state = lambda *states: {n for n, e in table.entries.items() if e.state.value in states}  # noqa: E731
    assert by_state("host_ready") <= worker
    # the table's running sums (kept as states change) equal a walk over its entries
    assert table.host_bytes == sum(table.entries[n].info.host_bytes for n in by_state("host_ready"))
    assert table.reading_bytes == sum(table.expected_bytes(table.entries[n]) for n in by_state("reading"))
    assert worker <= by_state("host_ready", "unloading", "reading") | set(engine._dropped) | set(replica._reading)


op = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(NAMES + [None]), st.integers(1, 12), st.integers(1, 6)),
    st.tuples(st.just("abort"), st.integers(0, 40)),
    st.tuples(st.just("load"), st.sampled_from(NAMES)),
    st.tuples(st.just("unload"), st.sampled_from(NAMES)),
    st.tuples(st.just("turn"), st.integers(1, 3)),
)


@pytest.fixture(scope="module")
def replica(tiny_models, root):
    """One replica driven by the test (run_once) instead of its thread; small host memory and pool."""
    engine = make_engine(tiny_models["llama_gqa"], root, pool_bytes=160_000, host_cache_bytes=60_000, max_num_seqs=4)
    r = Replica(0, engine)
    yield r
    r.stop()
    engine.shutdown()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=40))
def test_snapshot_agrees_with_the_replica(replica, ops):
    out: list = []
    replica.outbox = out.extend
    keys, replies, aborted = [], [], set()  # ids are unique per replica, across examples too
    for o in ops:
        if o[0] == "add":
            keys.append(next(IDS))
            replica.send(AddRequest(keys[-1], Request(str(keys[-1]), [5] * o[2], o[3], o[1], ignore_eos=True)))
        elif o[0] == "abort" and keys:
            aborted.add(keys[o[1] % len(keys)])
            replica.send(Abort(keys[o[1] % len(keys)]))
        elif o[0] == "load":
            replies.append(next(IDS))
            replica.send(LoadAdapter(replies[-1], o[1]))
        elif o[0] == "unload":
            replies.append(next(IDS))
            replica.send(UnloadAdapter(replies[-1], o[1], timeout=5.0))
        else:
            for _ in range(o[1]):
                replica.run_once()
                check_snapshot(replica)
    deadline = time.monotonic() + WAIT
    ended = set()
    while time.monotonic() < deadline:  # drain: every request and command gets its answer
        assert replica.run_once()
        check_snapshot(replica)
        ended = {m.key for m in out if isinstance(m, Failed) or (isinstance(m, Tokens) and m.finish_reason)}
        answered = {m.reply for m in out if isinstance(m, Reply)}
        if ended | aborted >= set(keys) and answered >= set(replies) and not replica.engine.busy():
            break
        time.sleep(0.005)
    else:
        raise AssertionError("the replica did not answer every message")
    assert replica.snapshot.kv_pages == 0
    for m in out:
        if isinstance(m, Failed):
            assert m.message and m.code.name in ("NOT_FOUND", "INVALID_ARGUMENT"), m


# ------------------------------------------------------------- an in-process server

@contextlib.asynccontextmanager
async def served(model, root, **engine):
    server = LoraFleetServer(ServerConfig(EngineConfig(str(model), str(root), pool_bytes=4 * 2**20, **{"dtype": "float32", **engine}),
                                          port=0, metrics_port=0, shutdown_grace=1.0))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, channel
    finally:
        await server.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=5 * WAIT))


async def health_of(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)).status


def test_the_server_shortens_the_gil_switch_interval_while_it_serves(tiny_models, root):
    from lorafleet.coordinator.server import GIL_SWITCH_S

    before = sys.getswitchinterval()
    assert before != GIL_SWITCH_S

    async def go():
        async with served(tiny_models["llama_gqa"], root):
            return sys.getswitchinterval()

    assert run(go()) == GIL_SWITCH_S
    assert sys.getswitchinterval() == before


def test_malformed_folders_while_serving(tiny_models, root, tmp_path):
    """Folders whose config is not an object, or whose r disagrees with its tensors, appear while
    the server runs: listing shows them as refused with the reason, metrics and health keep working,
    and a request for one gets INVALID_ARGUMENT."""
    folder = tmp_path / "adapters"
    shutil.copytree(root, folder)

    async def go():
        async with served(tiny_models["llama_gqa"], folder) as (server, channel):
            stub = pb_grpc.LoraFleetStub(channel)
            (folder / "listy").mkdir()
            (folder / "listy" / "adapter_config.json").write_text("[1, 2, 3]")
            shutil.copytree(folder / "r8_k", folder / "liar")
            config = json.loads((folder / "liar" / "adapter_config.json").read_text())
            (folder / "liar" / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
            await asyncio.sleep(1.5)  # the folder watcher and the gauges run several rounds
            listing = {a.name: a for a in (await stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10)).adapters}
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(pb.GenerateRequest(adapter_id="liar", prompt_token_ids=[1, 2])):
                    pass
            metrics = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode())
            assert all(not task.done() for task in server._tasks)  # the background tasks survived
            return listing, err.value, metrics, await health_of(channel), await health_of(channel, SERVICE)

    listing, err, metrics, h0, h1 = run(go())
    assert listing["listy"].residence == "refused" and "not a JSON object" in listing["listy"].error
    assert listing["r8_k"].residence == "disk" and listing["r8_k"].rank == 8
    assert listing["liar"].residence == "refused" and "says r=3 for k_proj" in listing["liar"].error
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "says r=3 for k_proj" in err.details()
    assert 'lorafleet_adapters_resident{tier="disk"}' in metrics
    assert h0 == h1 == health_pb2.HealthCheckResponse.SERVING


async def collect(stub, **fields):
    tokens = []
    async for msg in stub.Generate(pb.GenerateRequest(**fields)):
        tokens += list(msg.token_ids)
    return tokens


def test_a_read_in_flight_never_makes_a_step_wait(tiny_models, root, monkeypatch):
    """While the read of a new adapter is held for two seconds, the running stream's steps go on:
    many steps finish during the hold and none of them lasts as long as the hold."""
    model = tiny_models["llama_gqa"]
    reads = AdapterReads(monkeypatch, WAIT)
    reads.hold("r16_all")
    hold = 2.0
    durations: list[float] = []
    real = worker_module.Worker.execute

    def timed(self, step):
        started = time.monotonic()
        try:
            return real(self, step)
        finally:
            durations.append(time.monotonic() - started)

    monkeypatch.setattr(worker_module.Worker, "execute", timed)

    async def go():
        async with served(model, root) as (server, channel):
            stub = pb_grpc.LoraFleetStub(channel)
            long = asyncio.create_task(collect(stub, prompt_token_ids=[3, 4], max_new_tokens=400, ignore_eos=True))
            waiting = asyncio.create_task(collect(stub, adapter_id="r16_all", prompt_token_ids=[5, 6], max_new_tokens=4, ignore_eos=True))
            await reads.entered_read("r16_all")
            before = len(durations)
            await asyncio.sleep(hold)
            during = durations[before:]
            reads.held["r16_all"].set()
            return during, await waiting, await long

    during, tokens, long_tokens = run(go())
    assert len(during) >= 10, f"only {len(during)} steps ran while the read was held"
    assert max(during) < hold / 2
    assert tokens == peft_greedy(model, root / "r16_all", [5, 6], 4)
    assert len(long_tokens) == 400


def test_reads_queue_up_on_the_loader_between_turns(tiny_models, root, monkeypatch):
    """Requests for four adapters not read yet arrive together: one turn of the loop queues all four
    reads (READS_AHEAD), so the loader runs them back to back while steps run, instead of one read
    per turn; the next turn admits every request, and the tokens are PEFT's."""
    reads = AdapterReads(monkeypatch, WAIT)
    names = ["r1_v", "r2_q", "r8_k", "r16_all"]
    engine = make_engine(tiny_models["llama_gqa"], root)
    r = Replica(0, engine)
    out: list = []
    r.outbox = out.extend
    try:
        for i, name in enumerate(names):
            r.send(AddRequest(i, Request(str(i), [5, 6], 3, name, ignore_eos=True)))
        r.run_once()
        deadline = time.monotonic() + WAIT
        while len(reads.calls) < len(names) and time.monotonic() < deadline:  # no turn of the loop meanwhile
            time.sleep(0.01)
        assert sorted(n for n, _ in reads.calls) == sorted(names)
        while r._reading and time.monotonic() < deadline:
            r.run_once()
        for _ in range(50):
            if not r.engine.busy():
                break
            r.run_once()
        tokens = {m.key: [] for m in out if isinstance(m, Tokens)}
        for m in out:
            if isinstance(m, Tokens):
                tokens[m.key] += list(m.token_ids)
        for i, name in enumerate(names):
            assert tokens[i] == peft_greedy(tiny_models["llama_gqa"], root / name, [5, 6], 3)
    finally:
        r.stop()
        engine.shutdown()


def test_a_failed_step_ends_streams_with_unavailable(tiny_models, root, monkeypatch):
    """A worker that fails mid-stream: the client gets UNAVAILABLE with a message it can act on (no Ray
    internals), after the tokens already sent; health turns NOT_SERVING; new requests get UNAVAILABLE at
    once; and `lorafleet generate` exits non-zero."""
    model = tiny_models["llama_gqa"]
    calls = {"n": 0}
    real = worker_module.Worker.execute

    def failing(self, step):
        calls["n"] += 1
        if calls["n"] > 6:
            raise RuntimeError("CUDA error: an illegal memory access (pid 4242, actor 9f3e)")
        return real(self, step)

    monkeypatch.setattr(worker_module.Worker, "execute", failing)

    async def go():
        async with served(model, root) as (server, channel):
            stub = pb_grpc.LoraFleetStub(channel)
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for msg in stub.Generate(pb.GenerateRequest(prompt_token_ids=[3, 4], max_new_tokens=50, ignore_eos=True)):
                    got += list(msg.token_ids)
            for _ in range(int(WAIT / 0.05)):
                if await health_of(channel) == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as later:
                await collect(stub, prompt_token_ids=[1], max_new_tokens=2)
            cli = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "lorafleet"), "generate", "--target", f"127.0.0.1:{server.port}",
                "hello", "--max-new-tokens", "2",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, cli_err = await asyncio.wait_for(cli.communicate(), WAIT)
            return (got, err.value, await health_of(channel), await health_of(channel, SERVICE), later.value,
                    cli.returncode, cli_err.decode())

    got, err, h0, h1, later, code, cli_err = run(go())
    assert err.code() == grpc.StatusCode.UNAVAILABLE and len(got) == 6  # a prefill and 5 decodes, then the failure
    assert "replica 0 failed" in err.details() and "may be retried" in err.details()
    assert "pid" not in err.details() and "actor" not in err.details()
    assert h0 == h1 == health_pb2.HealthCheckResponse.NOT_SERVING
    assert later.code() == grpc.StatusCode.UNAVAILABLE
    assert code == 1 and "UNAVAILABLE" in cli_err


def test_an_undecodable_request_is_invalid_argument(tiny_models, root):
    async def go():
        async with served(tiny_models["llama_gqa"], root) as (server, channel):
            call = channel.unary_stream(f"/{SERVICE}/Generate", request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call(b"\xff\xff\xff"):
                    pass
            return err.value, await collect(pb_grpc.LoraFleetStub(channel), prompt_token_ids=[1, 2], max_new_tokens=2)

    err, tokens = run(go())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid lorafleet.v1.GenerateRequest" in err.details()
    assert len(tokens) == 2  # and the server keeps serving


def test_run_applies_stop_strings(tiny_models, root):
    """`lorafleet run` cuts the text at a stop string, with finish_reason stop, like the gRPC API."""
    engine = make_engine(tiny_models["llama_gqa"], root)
    try:
        line = {"id": "a", "prompt": "abc", "max_new_tokens": 12, "ignore_eos": True}
        (full,) = run_batch(engine, [line], progress=False)
        visible = full["text"]
        assert len(visible) >= 4, visible
        stop = visible[2:4]
        (cut,) = run_batch(engine, [{**line, "stop": [stop]}], progress=False)
        (bad,) = run_batch(engine, [{**line, "stop": 5}], progress=False)
    finally:
        engine.shutdown()
    assert cut["text"] == visible[:visible.index(stop)] and cut["finish_reason"] == "stop"
    assert cut["token_ids"] == full["token_ids"][:len(cut["token_ids"])]
    assert "stop must be a string or a list of strings" in bad["error"]
