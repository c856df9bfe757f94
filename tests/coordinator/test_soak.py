"""Soak: many requests with random adapters, client cancellations and deadlines while adapters are
loaded and unloaded; afterwards nothing is held or leaked. `make test` runs 500 requests; `make soak`
runs LORAFLEET_SOAK_REQUESTS (10,000) and prints the same figures."""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import threading
import time

import grpc
import psutil
from engines import adapters_root

from lorafleet.coordinator.config import EngineConfig
from lorafleet.coordinator.server import LoraFleetServer, ServerConfig
from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc

REQUESTS = int(os.environ.get("LORAFLEET_SOAK_REQUESTS", "500"))
CLIENTS = 16
RSS_BOUND = 200 * 2**20  # bytes the process may grow by over the soak (stated bound)
ADAPTERS = ["r1_v", "r2_q", "r8_k", "r3_attn", "r8_mlp", "r16_all"]


def test_soak(tiny_models, tiny_adapters, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(adapters_root(tiny_adapters), root)
    cfg = EngineConfig(str(tiny_models["llama_gqa"]), str(root), dtype="float32", pool_bytes=2 * 2**20,
                       host_cache_bytes=400_000, max_num_seqs=8)
    rng = random.Random(0)
    outcomes: dict[str, int] = {}
    process = psutil.Process()

    async def go():
        server = LoraFleetServer(ServerConfig(cfg, port=0, metrics_port=None, shutdown_grace=1.0))
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.LoraFleetStub(channel)
                await one(stub, "r1_v", 0.0, None)  # warm-up: the loader's and the watchers' threads start
                await asyncio.sleep(1.0)
                threads, tasks, rss = threading.active_count(), len(asyncio.all_tasks()), process.memory_info().rss
                started = time.monotonic()
                queue = asyncio.Queue()
                for i in range(REQUESTS):
                    queue.put_nowait(i)
                admin = asyncio.create_task(churn(stub))
                await asyncio.gather(*(client(stub, queue) for _ in range(CLIENTS)))
                admin.cancel()
                await asyncio.gather(admin, return_exceptions=True)
                seconds = time.monotonic() - started
                for name in ADAPTERS + ["churn"]:  # every adapter out: its pages must come back
                    with_status = stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), timeout=60)
                    try:
                        await with_status
                    except grpc.aio.AioRpcError as e:
                        assert e.code() == grpc.StatusCode.NOT_FOUND, e
                for _ in range(500):  # the last steps hand the finished requests back (bounded)
                    snap = server.handles[0].snapshot
                    if snap.kv_pages == 0 and snap.adapter_pages == 0 and not snap.running and not snap.waiting:
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.5)  # tasks of finished calls wind down
                return (server.handles[0].snapshot, threading.active_count() - threads, len(asyncio.all_tasks()) - tasks,
                        process.memory_info().rss - rss, seconds)
        finally:
            await server.stop()

    async def client(stub, queue):
        while not queue.empty():
            queue.get_nowait()
            adapter = rng.choice(ADAPTERS + [None, "churn"])
            cancel_after = rng.random() < 0.1 and rng.randint(1, 3)
            deadline = rng.uniform(0.01, 0.3) if rng.random() < 0.1 else None
            await one(stub, adapter, cancel_after, deadline)

    async def one(stub, adapter, cancel_after, deadline):
        call = stub.Generate(pb.GenerateRequest(adapter_id=adapter or "", prompt_token_ids=[rng.randrange(1, 250) for _ in range(rng.randint(1, 24))],
                                                max_new_tokens=rng.randint(1, 12), ignore_eos=True), timeout=deadline or 60)
        got = 0
        try:
            async for msg in call:
                got += len(msg.token_ids)
                if cancel_after and got >= cancel_after:
                    call.cancel()
                    break
            status = "cancelled" if cancel_after and got >= cancel_after else "ok"
        except grpc.aio.AioRpcError as e:
            status = e.code().name.lower()
        outcomes[status] = outcomes.get(status, 0) + 1

    async def churn(stub):
        """Loads and unloads one adapter over and over while the requests run."""
        while True:
            for call in (stub.LoadAdapter(pb.LoadAdapterRequest(name="churn", path="r2_up")),
                         stub.UnloadAdapter(pb.UnloadAdapterRequest(name="churn"))):
                try:
                    await call
                except grpc.aio.AioRpcError as e:
                    assert e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), e
            await asyncio.sleep(0.05)

    snap, threads, tasks, rss, seconds = asyncio.run(asyncio.wait_for(go(), timeout=max(600, REQUESTS * 0.5)))
    print(f"soak: {REQUESTS} requests in {seconds:.0f} s, outcomes {outcomes}; afterwards kv pages {snap.kv_pages}, "
          f"adapter pages {snap.adapter_pages}, threads {threads:+d}, asyncio tasks {tasks:+d}, RSS {rss / 2**20:+.0f} MiB")
    assert snap.healthy and snap.kv_pages == 0 and snap.adapter_pages == 0
    assert threads <= 0 and tasks <= 0, (threads, tasks)
    assert rss < RSS_BOUND
    assert sum(outcomes.values()) == REQUESTS + 1
    assert set(outcomes) <= {"ok", "cancelled", "deadline_exceeded", "not_found"}, outcomes
    assert outcomes.get("ok", 0) > REQUESTS // 2
