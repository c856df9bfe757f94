"""Adapters are read off the replica's thread: a slow first request for an adapter does not stop
running requests, concurrent first requests share one read, errors keep their statuses, and an
engine whose host memory holds few adapters gives the same tokens."""
from __future__ import annotations

import asyncio
import contextlib
import random
import shutil

import grpc
import pytest
from engines import AdapterReads, adapters_root, generate, make_engine
from peers import make_bad_adapter, peft_greedy

from lorafleet.coordinator.adapters import AdapterState
from lorafleet.coordinator.config import EngineConfig
from lorafleet.coordinator.replica import Replica, ReplicaHandle
from lorafleet.coordinator.router import Router
from lorafleet.coordinator.sequence import Request
from lorafleet.coordinator.server import LoraFleetServer, ServerConfig
from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc

WAIT = 60.0  # seconds: the bound of every wait below


@pytest.fixture(scope="module")
def adapters(tiny_models, tiny_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("async_adapters") / "adapters"
    shutil.copytree(adapters_root(tiny_adapters), root)
    shutil.copytree(tiny_adapters["r8_mlp"], root / "slow")
    shutil.copytree(tiny_adapters["r3_attn"], root / "slow2")
    for kind in ("dora", "nan"):
        make_bad_adapter(tiny_models["llama_gqa"], root / f"bad-{kind}", kind)
    return root


@contextlib.asynccontextmanager
async def served(model, root):
    """A stub of an in-process server (one replica, this process's worker) on loopback; stopped on exit."""
    server = LoraFleetServer(ServerConfig(EngineConfig(str(model), str(root), pool_bytes=4 * 2**20, dtype="float32"),
                                          port=0, metrics_port=None, shutdown_grace=1.0))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield pb_grpc.LoraFleetStub(channel)
    finally:
        await server.stop()


class Stream:
    """One Generate call consumed in the background; `tokens` grows as they arrive."""

    def __init__(self, stub, **fields):
        self.tokens: list[int] = []
        self.last = None
        self.task = asyncio.create_task(self._run(stub, fields))

    async def _run(self, stub, fields):
        async for msg in stub.Generate(pb.GenerateRequest(**fields)):
            self.tokens += list(msg.token_ids)
            self.last = msg
        return self.tokens

    async def until(self, n: int) -> None:
        """Waits (bounded) until at least n tokens have arrived."""
        for _ in range(int(WAIT / 0.01)):
            if len(self.tokens) >= n:
                return
            if self.task.done():
                await self.task
                break
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.tokens)} tokens arrived, waited for {n}")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=5 * WAIT))


def test_slow_registration_does_not_stop_running_requests(tiny_models, adapters, monkeypatch):
    """While three first requests for an adapter wait on its (held) read, a running request keeps
    receiving tokens; the adapter is then read once and all three get PEFT's tokens."""
    model = tiny_models["llama_gqa"]
    reads = AdapterReads(monkeypatch, WAIT)
    reads.hold("slow")
    prompt = [5, 9, 14]

    async def go():
        async with served(model, adapters) as stub:
            long = Stream(stub, adapter_id="r16_all", prompt_token_ids=[7, 8], max_new_tokens=300, ignore_eos=True)
            await long.until(2)
            firsts = [Stream(stub, adapter_id="slow", prompt_token_ids=prompt, max_new_tokens=6, ignore_eos=True) for _ in range(3)]
            await reads.entered_read("slow")
            before = len(long.tokens)
            await long.until(before + 10)  # the engine steps while the read is held
            assert not reads.held["slow"].is_set() and not any(f.task.done() for f in firsts)
            reads.held["slow"].set()
            outs = await asyncio.gather(*(f.task for f in firsts))
            await long.task
            return outs, long.tokens

    outs, long_tokens = run(go())
    assert reads.count("slow") == 1
    want = peft_greedy(model, adapters / "slow", prompt, 6)
    assert outs == [want] * 3
    assert len(long_tokens) == 300
    assert any(t.startswith("adapter-loader") for t in reads.threads)


def test_errors_keep_their_status_while_others_run(tiny_models, adapters, monkeypatch):
    """Bad adapters (two concurrent first requests sharing one failed read), unknown names and bad
    paths get today's statuses and messages; a running request is untouched; a good adapter then loads."""
    model = tiny_models["llama_gqa"]
    reads = AdapterReads(monkeypatch, WAIT)
    reads.hold("bad-nan")

    async def status(coro):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await coro
        return err.value.code(), err.value.details()

    async def go():
        async with served(model, adapters) as stub:
            long = Stream(stub, prompt_token_ids=[3, 4], max_new_tokens=200, ignore_eos=True)
            await long.until(1)
            nans = [Stream(stub, adapter_id="bad-nan", prompt_token_ids=[1, 2], max_new_tokens=3) for _ in range(2)]
            await reads.entered_read("bad-nan")
            await long.until(len(long.tokens) + 5)
            reads.held["bad-nan"].set()
            results = [await status(s.task) for s in nans]
            results.append(await status(Stream(stub, adapter_id="bad-dora", prompt_token_ids=[1], max_new_tokens=2).task))
            results.append(await status(Stream(stub, adapter_id="no-such-adapter", prompt_token_ids=[1]).task))
            results.append(await status(stub.LoadAdapter(pb.LoadAdapterRequest(name="esc", path="../../x"))))
            results.append(await status(stub.LoadAdapter(pb.LoadAdapterRequest(name="dora2", path="bad-dora"))))
            loaded = await stub.LoadAdapter(pb.LoadAdapterRequest(name="extra", path="r2_q"))
            good = Stream(stub, adapter_id="extra", prompt_token_ids=[3, 4], max_new_tokens=5, ignore_eos=True)
            good_tokens = await good.task
            await long.task
            return results, loaded, good_tokens, long.tokens

    results, loaded, good_tokens, long_tokens = run(go())
    assert reads.count("bad-nan") == 1
    (c1, m1), (c2, m2), (c3, m3), (c4, m4), (c5, m5), (c6, m6) = results
    assert c1 == c2 == grpc.StatusCode.INVALID_ARGUMENT and "NaN or Inf" in m1 and m1 == m2
    assert c3 == grpc.StatusCode.INVALID_ARGUMENT and "DoRA" in m3
    assert c4 == grpc.StatusCode.NOT_FOUND and "not found" in m4
    assert c5 == grpc.StatusCode.PERMISSION_DENIED and "outside the adapters folder" in m5
    assert c6 == grpc.StatusCode.INVALID_ARGUMENT and "DoRA" in m6
    assert (loaded.adapter.name, loaded.adapter.rank) == ("extra", 2)
    assert good_tokens == peft_greedy(model, adapters / "r2_q", [3, 4], 5)
    assert len(long_tokens) == 200


def test_concurrent_load_and_generate_register_once(tiny_models, adapters, monkeypatch):
    """LoadAdapter and a Generate for the same new adapter, both in flight: one read."""
    model = tiny_models["llama_gqa"]
    reads = AdapterReads(monkeypatch, WAIT)
    reads.hold("slow2")

    async def go():
        async with served(model, adapters) as stub:
            gen = Stream(stub, adapter_id="slow2", prompt_token_ids=[6, 7], max_new_tokens=4, ignore_eos=True)
            await reads.entered_read("slow2")
            load = asyncio.ensure_future(stub.LoadAdapter(pb.LoadAdapterRequest(name="slow2")))
            await asyncio.sleep(0.1)  # let LoadAdapter join the registration in flight
            reads.held["slow2"].set()
            return await gen.task, (await load).adapter

    tokens, info = run(go())
    assert reads.count("slow2") == 1
    assert (info.name, info.rank) == ("slow2", 3)
    assert tokens == peft_greedy(model, adapters / "slow2", [6, 7], 4)


def test_requests_follow_a_registration_in_flight(tiny_models, adapters, monkeypatch):
    """While one replica reads a new adapter, more requests for it go to that replica (even when it
    is a little busier), not to another replica that would read it again."""
    model = tiny_models["llama_gqa"]
    reads = AdapterReads(monkeypatch, WAIT)
    reads.hold("slow")

    async def go():
        loop = asyncio.get_running_loop()
        replicas = [Replica(i, make_engine(model, adapters)) for i in range(2)]
        handles = [ReplicaHandle(r, loop) for r in replicas]
        for r in replicas:
            r.start()
        try:
            router = Router(handles, max_num_seqs=16)
            first = router.pick("slow")
            waiting = first.submit(Request("a", [5, 6], 3, "slow", ignore_eos=True))
            busy = first.submit(Request("busy", [3, 4], 500, ignore_eos=True))  # first is now busier
            await reads.entered_read("slow")
            picks = {router.pick("slow").index for _ in range(4)}
            least = router.pick(None).index
            reads.held["slow"].set()
            tokens = []
            while not waiting.done:
                tokens += [t for m in await waiting.next_batch() for t in m.token_ids]
            busy.close()
            return first.index, picks, least, tokens
        finally:
            for r in replicas:
                r.stop()
                r.engine.shutdown()

    first, picks, least, tokens = run(go())
    assert picks == {first} and least != first
    assert reads.count("slow") == 1
    assert tokens == peft_greedy(model, adapters / "slow", [5, 6], 3)


def test_small_host_memory_gives_the_same_tokens(tiny_models, tiny_adapters, monkeypatch):
    """Host memory for about two adapters and few sequences at once, so host copies keep being dropped
    and read again: the tokens equal an engine that never drops one, and the bound holds."""
    model = tiny_models["llama_gqa"]
    root = adapters_root(tiny_adapters)
    names = ["r1_v", "r2_q", "r8_k", "r2_up", "r3_attn", "r8_mlp", "r4_o_down", "r16_all", "r8_rslora_all"]
    rng = random.Random(8)
    requests = [(names[i % len(names)], [rng.randrange(8, 250) for _ in range(rng.randrange(2, 12))], rng.randrange(3, 9))
                for i in range(24)]
    join_at = [i // 3 for i in range(len(requests))]
    reference = generate(make_engine(model, root), requests, join_at)
    reads = AdapterReads(monkeypatch, WAIT)
    small = make_engine(model, root, host_cache_bytes=200_000, max_num_seqs=3)
    step, peak = small.step, [0]

    def measured_step():
        peak[0] = max(peak[0], small.adapters.host_bytes)
        return step()

    small.step = measured_step
    assert generate(small, requests, join_at) == reference
    assert len(reads.calls) > len(names)  # host copies were dropped and read again
    largest = max(e.info.host_bytes for e in small.adapters.entries.values() if e.info)
    assert peak[0] <= 200_000 + largest  # the bound, passed by at most the one adapter being admitted
    assert sorted(small.executor.worker.host_adapters()) == sorted(
        n for n, e in small.adapters.entries.items() if e.state == AdapterState.HOST_READY)
    for i in (0, 7):
        adapter, prompt, n = requests[i]
        assert reference[i] == peft_greedy(model, tiny_adapters[adapter], prompt, n)
    small.shutdown()
