"""The SDK, the load generator and the client CLI against a fake lorafleet server.

The fake implements the public proto with canned behaviour chosen by the adapter name:
tokens streamed with a delay, gRPC errors before or during the stream, a slow adapter for
deadlines and cancellation. It is a grpc.aio server on 127.0.0.1:0 in a child process (as the
real server is: grpc.aio binds to one event loop per process, and the tests run clients on
several), and it logs what it receives as JSON lines that the tests read back.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from lorafleet.client.cli import add_client_commands
from lorafleet.client.loadtest import LoadTestConfig, format_summary, run_loadtest
from lorafleet.client.sdk import AdapterInfo, AsyncClient, Client, LoraFleetError, Usage
from lorafleet.client.workload import SyntheticWorkload, TraceWorkload, WorkloadRequest
from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc

TOKEN = "s3cret"
VOCAB_SIZE = 1000
TOKEN_DELAY = {"paced": 0.1, "slow": 30.0}  # seconds per token; every other adapter 2 ms
ERRORS = {"missing": (grpc.StatusCode.NOT_FOUND, "adapter 'missing' is not loaded"),
          "full": (grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full")}
SERVER_LIFETIME_S = 600  # the child exits by itself after this, or as soon as its parent is gone


class FakeLoraFleet(pb_grpc.LoraFleetServicer):
    """Token i of a generation is id 100 + i with text f"t{i} "; the prompt's length is its words.

    Logs {"event": "generate", "request": base64}, {"event": "cancelled"} and
    {"event": "<admin method>", "authorization": ...} lines to `log`.
    """

    def __init__(self, log):
        self.log = log

    def _event(self, event: str, **fields) -> None:
        self.log.write(json.dumps({"event": event, **fields}) + "\n")
        self.log.flush()

    async def Generate(self, request, context):
        self._event("generate", request=base64.b64encode(request.SerializeToString()).decode())
        if request.adapter_id in ERRORS:
            await context.abort(*ERRORS[request.adapter_id])
        # A client's cancel lands in our sleep, or in grpc's write of the message just yielded; in
        # the second case this generator is closed only when it is garbage-collected. The done
        # callback sees both at once: the call ended before its last message or abort.
        ended = []
        context.add_done_callback(lambda _: ended or self._event("cancelled"))
        count = request.max_new_tokens or 16
        for i in range(count):
            await asyncio.sleep(TOKEN_DELAY.get(request.adapter_id, 0.002))
            if request.adapter_id == "breaks" and i == 2:
                ended.append("abort")
                await context.abort(grpc.StatusCode.INTERNAL, "a worker died")
            if i == count - 1:
                ended.append("last")
            yield self._response(request, i, last=i == count - 1)

    def _response(self, request, i: int, last: bool) -> pb.GenerateResponse:
        response = pb.GenerateResponse(token_ids=[100 + i], text=f"t{i} ", request_id=request.request_id or "gen-1")
        if last:
            words = len(request.prompt.split()) + sum(len(m.content.split()) for m in request.messages)
            response.finish_reason = "length"
            response.usage.CopyFrom(pb.Usage(prompt_tokens=len(request.prompt_token_ids) or words,
                                             completion_tokens=i + 1))
        return response

    async def _admin(self, method: str, context) -> None:
        authorization = dict(context.invocation_metadata()).get("authorization")
        self._event(method, authorization=authorization)
        if authorization != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "admin calls need the bearer token")

    async def LoadAdapter(self, request, context):
        await self._admin("LoadAdapter", context)
        info = pb.AdapterInfo(name=request.name, rank=8, targets=["q_proj", "v_proj"], residence="host_cache",
                              replicas=[0, 1])
        return pb.LoadAdapterResponse(adapter=info)

    async def UnloadAdapter(self, request, context):
        await self._admin("UnloadAdapter", context)
        if request.name != "sql":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no adapter {request.name!r}")
        return pb.UnloadAdapterResponse(requests_drained=2)

    async def ListAdapters(self, request, context):
        self._event("ListAdapters", authorization=dict(context.invocation_metadata()).get("authorization"))
        return pb.ListAdaptersResponse(adapters=[
            pb.AdapterInfo(name="sql", rank=16, targets=["q_proj"], residence="device_pool", requests=3,
                           pool_pages=40, replicas=[0]),
            pb.AdapterInfo(name="chat", rank=8, targets=["q_proj", "k_proj"], residence="disk"),
        ])

    async def GetServerInfo(self, request, context):
        return pb.ServerInfo(model="fake-llama", dtype="float32", tp=2, replicas=1, max_lora_rank=64,
                             max_model_len=2048, max_num_seqs=64, max_batched_tokens=2048, pool_pages=4096,
                             vocab_size=VOCAB_SIZE, version="0.0-fake")


async def serve_fake(log_path: str, port_path: str, cert: str | None = None, key: str | None = None) -> None:
    """The child process: serve (TLS when given a PEM cert and key) until the parent is gone or
    SERVER_LIFETIME_S passed."""
    parent = os.getppid()
    with open(log_path, "a", encoding="utf-8") as log:
        server = grpc.aio.server()
        pb_grpc.add_LoraFleetServicer_to_server(FakeLoraFleet(log), server)
        if cert:
            credentials = grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
            port = server.add_secure_port("127.0.0.1:0", credentials)
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_path + ".tmp").write_text(str(port))
        os.replace(port_path + ".tmp", port_path)
        for _ in range(SERVER_LIFETIME_S * 4):
            if os.getppid() != parent:
                break
            await asyncio.sleep(0.25)
        await server.stop(None)


class FakeServer:
    """The parent's handle on the child: its target and what it has logged since `mark()`."""

    def __init__(self, tmp: Path, tls: tuple[str, str] = ()):
        self.log_path, port_path = tmp / "fake.jsonl", tmp / "port"
        self.log_path.touch()
        self.process = subprocess.Popen([sys.executable, __file__, str(self.log_path), str(port_path), *tls])
        for _ in range(200):
            if port_path.exists() or self.process.poll() is not None:
                break
            time.sleep(0.05)
        assert port_path.exists(), "the fake server did not start within 10 s"
        self.target = f"127.0.0.1:{port_path.read_text()}"
        self.start = 0

    def _lines(self) -> list[str]:
        """The complete lines of the log (a line being written has no newline yet)."""
        return self.log_path.read_text(encoding="utf-8").split("\n")[:-1]

    def events(self, kind: str | None = None) -> list[dict]:
        events = [json.loads(line) for line in self._lines()[self.start:]]
        return [e for e in events if kind is None or e["event"] == kind]

    def mark(self) -> None:
        self.start = len(self._lines())

    @property
    def requests(self) -> list[pb.GenerateRequest]:
        return [pb.GenerateRequest.FromString(base64.b64decode(e["request"])) for e in self.events("generate")]

    @property
    def cancelled(self) -> int:
        return len(self.events("cancelled"))

    def admin_tokens(self) -> list[tuple[str, str | None]]:
        return [(e["event"], e["authorization"]) for e in self.events() if "authorization" in e]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fake = FakeServer(tmp_path_factory.mktemp("fake-lorafleet"))
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """(fake server over TLS, the PEM file of its self-signed certificate for 127.0.0.1)."""
    tmp = tmp_path_factory.mktemp("fake-lorafleet-tls")
    cert, key = str(tmp / "cert.pem"), str(tmp / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    fake = FakeServer(tmp, (cert, key))
    yield fake, cert
    fake.stop()


@pytest.fixture
def fake(server):
    """The fake server, with only this test's events in view."""
    server.mark()
    return server


@pytest.fixture
def target(server):
    return server.target


def wait_for(condition, seconds: float = 5.0) -> bool:
    """Polls `condition` every 20 ms for at most `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ---- the blocking client ---------------------------------------------------------------------

def test_generate_streams_chunks_as_they_arrive(fake, target):
    with Client(target) as client:
        arrived = [(time.monotonic(), chunk) for chunk in client.generate(adapter="paced", prompt="a b",
                                                                         max_new_tokens=4)]
    chunks = [chunk for _, chunk in arrived]
    assert [c.token_ids for c in chunks] == [(100,), (101,), (102,), (103,)]
    assert [c.text for c in chunks] == ["t0 ", "t1 ", "t2 ", "t3 "]
    assert [c.finish_reason for c in chunks] == ["", "", "", "length"]
    assert chunks[-1].usage == Usage(prompt_tokens=2, completion_tokens=4) and chunks[0].usage is None
    assert arrived[-1][0] - arrived[0][0] > 0.2, "chunks come as the server sends them, not all at the end"


def test_complete_collects_the_stream(fake, target):
    with Client(target) as client:
        done = client.complete(adapter="sql", prompt_token_ids=[1, 2, 3], max_new_tokens=3, request_id="r-7")
    assert done.text == "t0 t1 t2 " and done.token_ids == (100, 101, 102)
    assert done.finish_reason == "length" and done.usage == Usage(3, 3) and done.request_id == "r-7"


def test_every_parameter_reaches_the_server(fake, target):
    with Client(target) as client:
        client.complete(messages=[{"role": "system", "content": "be brief"}, ("user", "hi")], max_new_tokens=2,
                        temperature=0.7, top_k=40, seed=7, stop=["\n\n"], stop_token_ids=[2], ignore_eos=True)
        client.complete(adapter="sql", prompt="x", top_p=0.9, max_new_tokens=1)
    first, second = fake.requests
    assert first.adapter_id == "" and [(m.role, m.content) for m in first.messages] == [("system", "be brief"),
                                                                                      ("user", "hi")]
    assert first.temperature == pytest.approx(0.7) and first.top_k == 40 and first.seed == 7
    assert list(first.stop) == ["\n\n"] and list(first.stop_token_ids) == [2] and first.ignore_eos
    assert not first.HasField("top_p"), "unset top_p stays unset (the server's default applies)"
    assert second.adapter_id == "sql" and second.top_p == pytest.approx(0.9) and not second.HasField("seed")


@pytest.mark.parametrize("kwargs", [{}, {"prompt": "a", "prompt_token_ids": [1]}, {"prompt": "a", "stop": "x"}])
def test_generate_needs_exactly_one_prompt(target, kwargs):
    with Client(target) as client, pytest.raises(ValueError):
        client.generate(**kwargs)


def test_admin_calls_send_the_bearer_token(fake, target):
    with Client(target, admin_token=TOKEN) as client:
        info = client.load_adapter("sql", "adapters/sql")
        assert client.unload_adapter("sql") == 2
        client.list_adapters()
    assert info == AdapterInfo(name="sql", rank=8, targets=("q_proj", "v_proj"), residence="host_cache",
                               requests=0, pool_pages=0, replicas=(0, 1))
    assert fake.admin_tokens() == [("LoadAdapter", f"Bearer {TOKEN}"), ("UnloadAdapter", f"Bearer {TOKEN}"),
                                   ("ListAdapters", None)]


def test_admin_calls_without_the_token_are_refused(fake, target):
    with Client(target) as client, pytest.raises(LoraFleetError) as caught:
        client.load_adapter("sql")
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert str(caught.value) == "PERMISSION_DENIED: admin calls need the bearer token"


def test_list_adapters_and_server_info(fake, target):
    with Client(target) as client:
        adapters, info = client.list_adapters(), client.server_info()
    assert [(a.name, a.rank, a.residence, a.replicas) for a in adapters] == [("sql", 16, "device_pool", (0,)),
                                                                             ("chat", 8, "disk", ())]
    assert info.model == "fake-llama" and info.vocab_size == VOCAB_SIZE and info.tp == 2


@pytest.mark.parametrize("adapter", sorted(ERRORS))
def test_errors_keep_the_grpc_status(fake, target, adapter):
    code, message = ERRORS[adapter]
    with Client(target) as client, pytest.raises(LoraFleetError) as caught:
        client.complete(adapter=adapter, prompt="x")
    assert (caught.value.code, caught.value.message) == (code, message)


def test_an_error_mid_stream_follows_the_chunks_already_sent(fake, target):
    received = []
    with Client(target) as client, pytest.raises(LoraFleetError) as caught:
        for chunk in client.generate(adapter="breaks", prompt="x", max_new_tokens=8):
            received.append(chunk.text)
    assert received == ["t0 ", "t1 "] and caught.value.code == grpc.StatusCode.INTERNAL


def test_the_timeout_is_a_deadline(fake, target):
    start = time.monotonic()
    with Client(target, timeout=0.3) as client, pytest.raises(LoraFleetError) as caught:
        client.complete(adapter="slow", prompt="x")
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 3
    assert wait_for(lambda: fake.cancelled == 1), "the deadline ended the server's work too"


def test_leaving_the_stream_early_cancels_the_request(fake, target):
    with Client(target) as client:
        for _ in client.generate(adapter="paced", prompt="x", max_new_tokens=100):
            break
        assert wait_for(lambda: fake.cancelled == 1), "the server saw the cancellation"


def test_a_closed_client_makes_no_calls(target):
    with Client(target) as client:
        client.server_info()
    with pytest.raises(ValueError):
        client.server_info()


def test_unreachable_server_is_unavailable():
    with Client("127.0.0.1:1", timeout=2) as client, pytest.raises(LoraFleetError) as caught:
        client.server_info()
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_tls_with_the_servers_ca(tls_server):
    fake, cert = tls_server
    with Client(fake.target, tls_ca=cert) as client:
        assert client.complete(prompt="x", max_new_tokens=2).text == "t0 t1 "

    async def over_asyncio():
        async with AsyncClient(fake.target, tls_ca=cert) as client:
            return (await client.server_info()).model

    assert asyncio.run(over_asyncio()) == "fake-llama"
    with Client(fake.target, timeout=5) as plain, pytest.raises(LoraFleetError) as caught:
        plain.server_info()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE, "a plaintext client cannot talk to a TLS port"


# ---- the asyncio client ------------------------------------------------------------------------

def test_async_client_does_what_the_blocking_one_does(fake, target):
    async def scenario():
        async with AsyncClient(target, admin_token=TOKEN) as client:
            info = await client.server_info()
            names = [a.name for a in await client.list_adapters()]
            chunks = [c async for c in client.generate(adapter="sql", prompt="a b c", max_new_tokens=3)]
            done = await client.complete(prompt_token_ids=[4, 5], max_new_tokens=2)
            loaded = await client.load_adapter("chat")
            drained = await client.unload_adapter("sql")
            with pytest.raises(LoraFleetError) as caught:
                await client.complete(adapter="missing", prompt="x")
        return info, names, chunks, done, loaded, drained, caught.value

    info, names, chunks, done, loaded, drained, error = asyncio.run(scenario())
    assert info.vocab_size == VOCAB_SIZE and names == ["sql", "chat"]
    assert "".join(c.text for c in chunks) == "t0 t1 t2 " and chunks[-1].usage == Usage(3, 3)
    assert done.token_ids == (100, 101) and done.usage == Usage(2, 2)
    assert loaded.name == "chat" and drained == 2
    assert error.code == grpc.StatusCode.NOT_FOUND and error.message == ERRORS["missing"][1]
    assert [token for _, token in fake.admin_tokens()] == [None, f"Bearer {TOKEN}", f"Bearer {TOKEN}"]


def test_cancelling_the_async_task_cancels_the_request(fake, target):
    async def scenario():
        async with AsyncClient(target) as client:
            async def consume():
                async for _ in client.generate(adapter="slow", prompt="x"):
                    pass
            task = asyncio.create_task(consume())
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(asyncio.wait_for(scenario(), 5))
    assert wait_for(lambda: fake.cancelled == 1)


def test_leaving_the_async_stream_early_cancels_the_request(fake, target):
    async def scenario():
        async with AsyncClient(target) as client:
            async for _ in client.generate(adapter="paced", prompt="x", max_new_tokens=100):
                break
            for _ in range(250):  # at most 5 s
                if fake.cancelled:
                    break
                await asyncio.sleep(0.02)
            return fake.cancelled

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == 1, "cancelled while the client was still open"


# ---- the load generator ------------------------------------------------------------------------

REPORT_KEYS = {"config", "server", "elapsed_s", "requests", "throughput", "tokens", "ttft_s", "tpot_s", "e2e_s",
               "slo", "send_lag_s", "errors", "finish_reasons", "per_request"}


def small_workload(adapters=("a", "b", "c"), **kwargs) -> SyntheticWorkload:
    settings = dict(adapters=adapters, alpha=0.5, rate=30.0, cv=1.0, input_range=(2, 6), output_range=(2, 6), seed=1)
    return SyntheticWorkload(**{**settings, **kwargs})


def test_a_short_load_test_completes_with_a_full_report(fake, target):
    workload = small_workload()
    config = LoadTestConfig(target, workload, requests=30, duration=5.0, progress=False)
    report = json.loads(json.dumps(asyncio.run(run_loadtest(config)), allow_nan=False))
    schedule = workload.generate(30, VOCAB_SIZE)

    assert set(report) == REPORT_KEYS
    assert report["requests"] == {"scheduled": 30, "sent": 30, "completed": 30, "failed": 0,
                                  "cancelled_at_duration": 0, "not_sent": 0}
    assert report["errors"] == {} and report["finish_reasons"] == {"length": 30}
    assert report["tokens"]["output"] == sum(r.max_new_tokens for r in schedule), "ignore_eos: lengths as drawn"
    assert report["tokens"]["prompt_of_completed"] == sum(len(r.prompt_token_ids) for r in schedule)
    assert schedule[-1].arrival <= report["elapsed_s"] < schedule[-1].arrival + 1.0
    assert report["throughput"]["requests_per_s"] == pytest.approx(30 / report["elapsed_s"])
    ttft, tpot, e2e = report["ttft_s"], report["tpot_s"], report["e2e_s"]
    assert set(ttft) == set(tpot) == set(e2e) == {"mean", "p50", "p90", "p99"}
    assert 0.002 <= ttft["p50"] <= ttft["p90"] <= ttft["p99"] < 1.0
    assert 0.0015 <= tpot["mean"] < 0.5 and tpot["p50"] <= tpot["p99"]
    assert ttft["p50"] < e2e["mean"] and e2e["p50"] <= e2e["p99"] < 1.0
    assert report["slo"] == {"ttft_s": 6.0, "met": 30, "attainment": 1.0}
    assert report["send_lag_s"]["p99"] < 0.5, "open loop: each request goes out at its arrival time"
    assert report["server"]["model"] == "fake-llama" and report["config"]["workload"]["alpha"] == 0.5
    assert len(report["per_request"]) == 30 and all(r["status"] == "OK" for r in report["per_request"])
    sent = fake.requests
    assert {r.adapter_id for r in sent} <= {"a", "b", "c"} and all(r.ignore_eos for r in sent)
    assert max(max(r.prompt_token_ids) for r in sent) < VOCAB_SIZE, "prompts use the server's vocab_size"
    assert "TTFT" in format_summary(report) and "100.0% of sent requests" in format_summary(report)


def test_requests_outstanding_at_the_duration_are_cancelled_and_counted(fake, target):
    workload = small_workload(adapters=("slow",), rate=20.0, cv=0.0)  # arrivals at 0.05, 0.10, ... s
    config = LoadTestConfig(target, workload, requests=20, duration=0.625, progress=False)
    start = time.monotonic()
    report = asyncio.run(run_loadtest(config))
    assert time.monotonic() - start < 4, "cancelled requests do not hang the run"
    assert report["requests"] == {"scheduled": 20, "sent": 12, "completed": 0, "failed": 0,
                                  "cancelled_at_duration": 12, "not_sent": 8}
    assert report["elapsed_s"] == pytest.approx(0.625, abs=0.1)
    assert report["slo"]["attainment"] == 0.0 and set(report["ttft_s"].values()) == {None}
    assert {r["status"] for r in report["per_request"]} == {"CANCELLED_AT_DURATION"}
    assert wait_for(lambda: fake.cancelled == 12), "the server saw every cancellation"


def test_load_test_counts_errors_by_status(fake, target):
    config = LoadTestConfig(target, small_workload(adapters=("a", "missing", "full"), alpha=1.0), requests=30,
                            duration=5.0, progress=False)
    report = asyncio.run(run_loadtest(config))
    statuses = [r["status"] for r in report["per_request"]]
    assert report["errors"] == {"NOT_FOUND": statuses.count("NOT_FOUND"),
                                "RESOURCE_EXHAUSTED": statuses.count("RESOURCE_EXHAUSTED")}
    assert report["requests"]["failed"] == sum(report["errors"].values()) > 0
    assert report["requests"]["completed"] + report["requests"]["failed"] == 30
    assert report["slo"]["attainment"] == pytest.approx(report["requests"]["completed"] / 30)
    assert "NOT_FOUND" in format_summary(report)


def test_a_trace_is_replayed_at_its_timestamps(fake, target, tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in [
        {"timestamp": 50.4, "adapter": "b", "prompt": "one two three", "output_tokens": 2},
        {"timestamp": 50.0, "adapter": "a", "prompt_tokens": 5, "output_tokens": 3},
        {"timestamp": 50.2, "prompt_token_ids": [7, 8], "output_tokens": 1},
    ]))
    config = LoadTestConfig(target, TraceWorkload(str(trace)), requests=10, duration=5.0, progress=False)
    report = asyncio.run(run_loadtest(config))
    rows = report["per_request"]
    assert [(r["adapter"], r["scheduled"], r["output_tokens"], r["prompt_tokens"]) for r in rows] == [
        ("a", 0.0, 3, 5), (None, pytest.approx(0.2), 1, 2), ("b", pytest.approx(0.4), 2, 3)]
    assert all(0 <= r["sent"] - r["scheduled"] < 0.25 for r in rows)
    assert [r.adapter_id for r in fake.requests] == ["a", "", "b"] and fake.requests[2].prompt == "one two three"


@dataclass(frozen=True)
class TwoRequests:
    """A workload of the load generator's duck type (a benchmark's own): two fixed requests."""

    tokens: int = 4

    def generate(self, count: int, vocab_size: int) -> list[WorkloadRequest]:
        return [WorkloadRequest(0.05 * k, "paced" if k else "a", None, (1, 2, 3), self.tokens, True) for k in range(count)]


def test_any_workload_with_generate_runs_and_token_times_are_kept(fake, target):
    config = LoadTestConfig(target, TwoRequests(), requests=2, duration=5.0, progress=False, token_times=True)
    report = asyncio.run(run_loadtest(config))
    assert report["requests"]["completed"] == 2 and report["config"]["workload"] == {"tokens": 4}
    fast, paced = report["per_request"]
    for row in (fast, paced):
        times = row["token_times"]
        assert len(times) == 4 and times == sorted(times) and times[0] == row["first_token"] and times[-1] == row["last_token"]
    assert min(b - a for a, b in zip(paced["token_times"], paced["token_times"][1:])) >= 0.09, "0.1 s per paced token"
    plain = asyncio.run(run_loadtest(LoadTestConfig(target, TwoRequests(), requests=1, duration=5.0, progress=False)))
    assert "token_times" not in plain["per_request"][0], "off by default: serving.py's reports stay as they were"


def test_an_unreachable_target_fails_fast():
    config = LoadTestConfig("127.0.0.1:1", small_workload(), requests=3, duration=2.0, progress=False)
    start = time.monotonic()
    with pytest.raises(LoraFleetError) as caught:
        asyncio.run(run_loadtest(config))
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - start < 8


@pytest.mark.parametrize("kwargs", [{"requests": 0}, {"duration": 0.0}, {"slo_ttft": -1.0}, {"target": ""},
                                    {"vocab_size": 0}, {"workload": "synthetic"}])
def test_bad_load_test_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        LoadTestConfig(**{"target": "127.0.0.1:1", "workload": small_workload(), **kwargs})


# ---- the CLI -----------------------------------------------------------------------------------

def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lorafleet")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_generate_streams_to_the_terminal(fake, target, capsys):
    assert run_cli("generate", "--target", target, "--adapter", "sql", "--max-new-tokens", "3", "hello world") == 0
    out, err = capsys.readouterr()
    assert out == "t0 t1 t2 \n" and "[length: 2 prompt tokens, 3 generated]" in err
    assert run_cli("generate", "--target", target, "--chat", "--system", "be brief", "hi there") == 0
    assert [(m.role, m.content) for m in fake.requests[-1].messages] == [("system", "be brief"), ("user", "hi there")]


def test_cli_errors_print_the_status(fake, target, capsys):
    assert run_cli("generate", "--target", target, "--adapter", "missing", "hi") == 1
    assert capsys.readouterr().err.strip() == "lorafleet generate: error: NOT_FOUND: adapter 'missing' is not loaded"
    assert run_cli("adapters", "load", "--target", target, "sql") == 1
    assert "lorafleet adapters load: error: PERMISSION_DENIED:" in capsys.readouterr().err


def test_cli_adapters(fake, target, capsys, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert run_cli("adapters", "list", "--target", target) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[1].split() == ["sql", "16", "device_pool", "3", "40", "0", "q_proj"]
    assert run_cli("adapters", "list", "--target", target, "--json") == 0
    assert [a["name"] for a in json.loads(capsys.readouterr().out)] == ["sql", "chat"]
    assert run_cli("adapters", "load", "--target", target, "--admin-token-file", str(token_file), "chat") == 0
    assert "loaded chat: rank 8" in capsys.readouterr().out
    assert run_cli("adapters", "unload", "--target", target, "--admin-token-file", str(token_file), "sql") == 0
    assert "2 running requests" in capsys.readouterr().out


def test_cli_loadtest_writes_the_json_report(fake, target, capsys, tmp_path):
    out_file = tmp_path / "report.json"
    code = run_cli("loadtest", "--target", target, "--num-adapters", "4", "--alpha", "0.3", "--rate", "40",
                   "--input-range", "2:4", "--output-range", "2:3", "--requests", "20", "--duration", "3",
                   "--json", str(out_file), "--no-progress")
    assert code == 0
    report = json.loads(out_file.read_text())
    assert set(report) == REPORT_KEYS and report["requests"]["completed"] == 20
    assert {r.adapter_id for r in fake.requests} <= {f"adapter-{i:03d}" for i in range(4)}
    assert "throughput" in capsys.readouterr().out


def test_cli_loadtest_from_server_adapters_and_bad_options(fake, target, capsys):
    assert run_cli("loadtest", "--target", target, "--adapters-from-server", "--max-adapters", "1", "--rate", "50",
                   "--input-range", "1:2", "--output-range", "1:2", "--requests", "5", "--no-progress") == 0
    assert {r.adapter_id for r in fake.requests} == {"chat"}, "the first of the server's adapters by name"
    assert run_cli("loadtest", "--target", target, "--alpha", "2", "--no-progress") == 2
    assert "lorafleet loadtest: error: alpha must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("loadtest", "--input-range", "512")


if __name__ == "__main__":
    asyncio.run(serve_fake(*sys.argv[1:]))
