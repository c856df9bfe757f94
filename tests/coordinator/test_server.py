"""A real server (Ray, tp=2, two replicas, CPU, 127.0.0.1, ephemeral ports) driven through the
generated stubs: exact streaming, cancellation, bad input, adapter admin, health, reflection, metrics."""
from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import time

import grpc
import pytest
from engines import adapters_root
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from servers import LORAFLEET, ServerProcess

from lorafleet.coordinator.tokenizer import Tokenizer
from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
TOKEN = "s3cret-admin-token"
ADAPTERS = ["r1_v", "r3_attn", "r8_mlp", "r4_o_down", "r16_all", "r8_rslora_all"]


@pytest.fixture(scope="module")
def server(tiny_models, tiny_adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    root = tmp / "adapters"
    shutil.copytree(adapters_root(tiny_adapters), root)
    (tmp / "outside").mkdir()
    shutil.copytree(tiny_adapters["r2_q"], tmp / "outside" / "escaped")
    (root / "link").symlink_to(tmp / "outside" / "escaped")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    srv = ServerProcess("--model", str(tiny_models["llama_gqa"]), "--adapters", str(root), "--tp", "2", "--replicas", "2",
                        "--dtype", "float32", "--pool-bytes", "4MiB", "--admin-token-file", str(token_file), "--max-num-seqs", "16")
    srv.root, srv.model, srv.tmp = root, tiny_models["llama_gqa"], tmp
    yield srv
    assert srv.stop() == 0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def _stream(stub, **fields):
    tokens, text, last = [], "", None
    async for msg in stub.Generate(pb.GenerateRequest(**fields)):
        tokens += list(msg.token_ids)
        text += msg.text
        last = msg
    return tokens, text, last


def _admin():
    return (("authorization", f"Bearer {TOKEN}"),)


def test_concurrent_streams_equal_lorafleet_run(server, tmp_path):
    rng = random.Random(11)
    cases = [(ADAPTERS[i % 6] if i % 8 != 7 else None, [rng.randrange(8, 250) for _ in range(rng.randrange(2, 24))],
              rng.randrange(4, 20)) for i in range(16)]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"id": i, "adapter": a, "prompt_token_ids": p, "max_new_tokens": n, "ignore_eos": True}) + "\n"
                                for i, (a, p, n) in enumerate(cases)))
    out = tmp_path / "results.jsonl"
    subprocess.run([LORAFLEET, "run", "--model", str(server.model), "--adapters", str(server.root), "--input", str(requests),
                    "--output", str(out), "--quiet", "--dtype", "float32"], check=True, timeout=300)
    offline = [json.loads(line) for line in out.read_text().splitlines()]

    async def go():
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.LoraFleetStub(ch)
            return await asyncio.gather(*(_stream(stub, adapter_id=a or "", prompt_token_ids=p, max_new_tokens=n, ignore_eos=True)
                                          for a, p, n in cases))

    tok = Tokenizer(server.model)
    for (tokens, text, last), want, (_, prompt, n) in zip(run(go()), offline, cases):
        assert tokens == want["token_ids"]
        assert text == tok.decode(tokens) == want["text"]
        assert last.finish_reason == "length"
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), n)


def _wait_idle(server, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.metric("lorafleet_pool_pages", use="kv") == 0 and server.metric("lorafleet_running_batch_size") == 0:
            return True
        time.sleep(0.2)
    return False


def test_cancel_and_deadline_free_pages(server):
    async def cancel_mid_stream():
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.LoraFleetStub(ch)
            call = stub.Generate(pb.GenerateRequest(adapter_id="r16_all", prompt_token_ids=[9] * 20, max_new_tokens=400, ignore_eos=True))
            got = 0
            async for msg in call:
                got += len(msg.token_ids)
                if got >= 3:
                    break
            for _ in range(100):  # the gauges are refreshed twice a second: wait for one that saw the stream
                running = await asyncio.to_thread(server.metric, "lorafleet_pool_pages", use="kv")
                if running > 0:
                    break
                await asyncio.sleep(0.05)
            call.cancel()
            return running

    assert run(cancel_mid_stream()) > 0
    assert _wait_idle(server), "pages still held after cancellation"

    async def deadline():
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.LoraFleetStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(pb.GenerateRequest(prompt_token_ids=[5] * 10, max_new_tokens=400, ignore_eos=True), timeout=1.0):
                    pass
            return err.value.code()

    assert run(deadline()) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_idle(server), "pages still held after a deadline"


BAD = [
    (dict(adapter_id="no-such-adapter", prompt_token_ids=[1, 2]), grpc.StatusCode.NOT_FOUND, "not found"),
    (dict(adapter_id="../r16_all", prompt_token_ids=[1, 2]), grpc.StatusCode.INVALID_ARGUMENT, "not valid"),
    (dict(adapter_id="link", prompt_token_ids=[1, 2]), grpc.StatusCode.PERMISSION_DENIED, "outside the adapters folder"),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty"),
    (dict(prompt="hi", prompt_token_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT, "exactly one of"),
    (dict(prompt_token_ids=[1, 99999]), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    (dict(prompt_token_ids=[1] * 600), grpc.StatusCode.INVALID_ARGUMENT, "exceeds the model's context"),
    (dict(prompt_token_ids=[1], max_new_tokens=5000), grpc.StatusCode.INVALID_ARGUMENT, "exceeds the model's context"),
    (dict(prompt_token_ids=[1], temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(prompt_token_ids=[1], top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(prompt_token_ids=[1], stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    (dict(prompt_token_ids=[1], stop_token_ids=[-3]), grpc.StatusCode.INVALID_ARGUMENT, "stop token id"),
]


def test_bad_input_gets_status_and_server_keeps_serving(server, tmp_path):
    bad_root = server.root / "dora-adapter"
    import peers

    peers.make_bad_adapter(server.model, bad_root, "dora")

    async def go():
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.LoraFleetStub(ch)
            for fields, code, words in BAD + [(dict(adapter_id="dora-adapter", prompt_token_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT, "DoRA")]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _stream(stub, **fields)
                assert err.value.code() == code, (fields, err.value.details())
                assert words in err.value.details(), (fields, err.value.details())
            tokens, _, last = await _stream(stub, adapter_id="r8_mlp", prompt_token_ids=[3, 4, 5], max_new_tokens=4, ignore_eos=True)
            assert len(tokens) == 4 and last.finish_reason == "length"

    run(go())


def test_stop_strings_and_stop_tokens(server):
    async def go():
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.LoraFleetStub(ch)
            tokens, text, _ = await _stream(stub, prompt="abc", max_new_tokens=12, ignore_eos=True)
            stop_tok = tokens[3]
            t2, _, last = await _stream(stub, prompt="abc", max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_tok])
            assert t2 == tokens[:tokens.index(stop_tok) + 1] and last.finish_reason == "stop"
            visible = text.strip("\x00")
            if len(visible) >= 4:
                stop = visible[2:4]
                _, t3, last = await _stream(stub, prompt="abc", max_new_tokens=12, ignore_eos=True, stop=[stop])
                assert t3 == text[:text.index(stop)] and last.finish_reason == "stop"

    run(go())


def test_adapter_admin_while_serving(server):
    async def go():
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.LoraFleetStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LoadAdapter(pb.LoadAdapterRequest(name="extra", path="r2_q"))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.UnloadAdapter(pb.UnloadAdapterRequest(name="r2_q"), metadata=(("authorization", "Bearer wrong"),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            for path in ("../outside/escaped", str(server.tmp / "outside" / "escaped"), "link"):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.LoadAdapter(pb.LoadAdapterRequest(name="esc", path=path), metadata=_admin())
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, path

            # a long request keeps running while the adapter is loaded, listed, unloaded and reloaded
            long_run = asyncio.create_task(_stream(stub, adapter_id="r16_all", prompt_token_ids=[7] * 5, max_new_tokens=120, ignore_eos=True))
            loaded = await stub.LoadAdapter(pb.LoadAdapterRequest(name="extra", path="r2_q"), metadata=_admin())
            assert (loaded.adapter.name, loaded.adapter.rank, list(loaded.adapter.targets)) == ("extra", 2, ["q_proj"])
            tokens, _, _ = await _stream(stub, adapter_id="extra", prompt_token_ids=[3, 4], max_new_tokens=5, ignore_eos=True)
            listed = {a.name: a for a in (await stub.ListAdapters(pb.ListAdaptersRequest())).adapters}
            assert listed["extra"].residence == "device_pool" and listed["extra"].requests == 1
            assert listed["r16_all"].residence == "device_pool"
            assert listed["r64_all"].residence == "disk" and listed["r64_all"].rank == 64
            in_flight = asyncio.create_task(_stream(stub, adapter_id="extra", prompt_token_ids=[3, 4], max_new_tokens=60, ignore_eos=True))
            await asyncio.sleep(0.3)
            unloaded = await stub.UnloadAdapter(pb.UnloadAdapterRequest(name="extra"), metadata=_admin())
            assert unloaded.requests_drained == 1
            drained_tokens, _, last = await in_flight
            assert len(drained_tokens) == 60 and last.finish_reason == "length"  # it finished first
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _stream(stub, adapter_id="extra", prompt_token_ids=[3, 4], max_new_tokens=2)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            await stub.LoadAdapter(pb.LoadAdapterRequest(name="extra", path="r2_q"), metadata=_admin())
            again, _, _ = await _stream(stub, adapter_id="extra", prompt_token_ids=[3, 4], max_new_tokens=5, ignore_eos=True)
            assert again == tokens
            long_tokens, _, last = await long_run
            assert len(long_tokens) == 120 and last.finish_reason == "length"

    run(go())


def test_routing_prefers_the_replica_holding_the_adapter(server):
    async def go():
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.LoraFleetStub(ch)
            await _stream(stub, adapter_id="r1_v", prompt_token_ids=[1, 2, 3], max_new_tokens=2)
            first = {a.name: list(a.replicas) for a in (await stub.ListAdapters(pb.ListAdaptersRequest())).adapters}["r1_v"]
            assert len(first) == 1
            for _ in range(3):
                await asyncio.gather(*(_stream(stub, adapter_id="r1_v", prompt_token_ids=[i, 2, 3], max_new_tokens=3) for i in range(4)))
            after = {a.name: list(a.replicas) for a in (await stub.ListAdapters(pb.ListAdaptersRequest())).adapters}["r1_v"]
            assert after == first
            info = await stub.GetServerInfo(pb.GetServerInfoRequest())
            assert (info.tp, info.replicas, info.vocab_size, info.prefix_cache, info.adapter_affinity) == (2, 2, 264, True, 0)

    run(go())


def test_health_reflection_metrics(server):
    async def go():
        async with grpc.aio.insecure_channel(server.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "lorafleet.v1.LoraFleet"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            names = []
            async for reply in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
                names += [s.name for s in reply.list_services_response.service]
            assert "lorafleet.v1.LoraFleet" in names and "grpc.health.v1.Health" in names
            before = server.metric("lorafleet_requests_total", adapter="r8_mlp", status="ok")
            stub = pb_grpc.LoraFleetStub(ch)
            for _ in range(3):
                await _stream(stub, adapter_id="r8_mlp", prompt_token_ids=[1, 2], max_new_tokens=2)
            assert server.metric("lorafleet_requests_total", adapter="r8_mlp", status="ok") == before + 3
            assert server.metric("lorafleet_time_to_first_token_seconds_count", adapter="r8_mlp") >= 3
            assert server.metric("lorafleet_requests_total", adapter="__unknown__") >= 1  # from the bad-input test

            # the prefix cache: the same 20-token prompt three times finds 19 tokens cached at least once
            queried = server.metric("lorafleet_prefix_cache_queried_tokens_total", adapter="r4_o_down")
            hits = server.metric("lorafleet_prefix_cache_hit_tokens_total", adapter="r4_o_down")
            for _ in range(3):
                await _stream(stub, adapter_id="r4_o_down", prompt_token_ids=list(range(10, 30)), max_new_tokens=2)
            for _ in range(50):  # the counters follow the replicas' snapshots every 0.5 s
                if server.metric("lorafleet_prefix_cache_queried_tokens_total", adapter="r4_o_down") >= queried + 60:
                    break
                await asyncio.sleep(0.1)
            assert server.metric("lorafleet_prefix_cache_queried_tokens_total", adapter="r4_o_down") == queried + 60
            assert server.metric("lorafleet_prefix_cache_hit_tokens_total", adapter="r4_o_down") >= hits + 19
            assert server.metric("lorafleet_pool_pages", use="cache") >= 19

    run(go())


def test_loopback_rule_without_token():
    """Without --admin-token-file, admin calls from anywhere but loopback are PERMISSION_DENIED."""
    from lorafleet.coordinator.server import LoraFleetService, _Abort

    class Context:
        def __init__(self, peer):
            self._peer = peer

        def peer(self):
            return self._peer

        def invocation_metadata(self):
            return ()

    service = LoraFleetService.__new__(LoraFleetService)
    service.admin_token = None
    for peer in ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000"):
        service._authorize(Context(peer))
    for peer in ("ipv4:10.1.2.3:5000", "ipv6:[2001:db8::1]:5000"):
        with pytest.raises(_Abort) as err:
            service._authorize(Context(peer))
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_graceful_shutdown_finishes_in_flight(tiny_models, tmp_path):
    srv = ServerProcess("--model", str(tiny_models["llama_gqa"]), "--pool-bytes", "4MiB", "--shutdown-grace", "20")

    async def go():
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LoraFleetStub(ch)
            task = asyncio.create_task(_stream(stub, prompt_token_ids=[5, 6], max_new_tokens=200, ignore_eos=True))
            await asyncio.sleep(0.5)
            srv.proc.send_signal(__import__("signal").SIGTERM)
            tokens, _, last = await task
            return len(tokens), last.finish_reason

    assert run(go()) == (200, "length")
    assert srv.stop() == 0


def test_tls(tiny_models, tmp_path):
    """--tls-cert/--tls-key: a TLS client with the server's certificate as CA gets answers; plaintext does not."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    srv = ServerProcess("--model", str(tiny_models["llama_gqa"]), "--pool-bytes", "4MiB", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        async def go():
            creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(srv.target, creds) as ch:
                tokens, _, last = await _stream(pb_grpc.LoraFleetStub(ch), prompt_token_ids=[4, 5], max_new_tokens=3, ignore_eos=True)
                assert len(tokens) == 3 and last.finish_reason == "length"
            async with grpc.aio.insecure_channel(srv.target) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await pb_grpc.LoraFleetStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        run(go())
    finally:
        assert srv.stop() == 0


def test_prompts_up_to_the_context_through_both_front_ends(tiny_models):
    """--max-batched-tokens 16: a 300-token prompt streams over gRPC while a short one decodes,
    both equal PEFT; the OpenAI completions API gives the same completion for the long prompt;
    prompt + max_new_tokens beyond the context (512) is INVALID_ARGUMENT."""
    import httpx
    from peers import peft_greedy

    model = tiny_models["llama_gqa"]
    srv = ServerProcess("--model", str(model), "--pool-bytes", "4MiB", "--dtype", "float32", "--max-batched-tokens", "16",
                        "--http-port", "0")
    rng = random.Random(18)
    long, short = [rng.randrange(8, 250) for _ in range(300)], [5, 6, 7]

    async def go():
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LoraFleetStub(ch)
            both = await asyncio.gather(_stream(stub, prompt_token_ids=short, max_new_tokens=30, ignore_eos=True),
                                        _stream(stub, prompt_token_ids=long, max_new_tokens=5, ignore_eos=True))
            plain = await _stream(stub, prompt_token_ids=long, max_new_tokens=5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _stream(stub, prompt_token_ids=long + long, max_new_tokens=5)
            return both, plain, err.value

    try:
        ((short_tokens, _, _), (long_tokens, _, last)), (_, plain_text, _), err = run(go())
        assert short_tokens == peft_greedy(model, None, short, 30)
        assert long_tokens == peft_greedy(model, None, long, 5)
        assert last.usage.prompt_tokens == 300
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "context of 512" in err.details()
        reply = httpx.post(f"http://127.0.0.1:{srv.info['http_port']}/v1/completions", timeout=120,
                           json={"model": model.name, "prompt": long, "max_tokens": 5, "temperature": 0}).json()
        assert reply["usage"]["prompt_tokens"] == 300
        assert reply["choices"][0]["text"] == plain_text != ""
    finally:
        assert srv.stop() == 0
