"""Fuzzing what crosses the trust boundary: random GenerateRequests against a live server, and random or
damaged adapter folders against the reader. Every case ends with a clear status or refusal, the server
keeps serving, and nothing is unpickled."""
from __future__ import annotations

import asyncio
import itertools
import json
import pickle
import shutil
import threading

import grpc
import pytest
from engines import adapters_root, make_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.coordinator.config import EngineConfig
from lorafleet.coordinator.server import LoraFleetServer, ServerConfig
from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc
from lorafleet.worker.adapters import AdapterError

CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
         grpc.StatusCode.RESOURCE_EXHAUSTED}
UNPICKLED: list[str] = []  # what a decoy pickle would record if anything loaded it


@pytest.fixture(scope="module")
def server(tiny_models, tiny_adapters):
    """A live server on its own event loop thread, for a synchronous client."""
    loop = asyncio.new_event_loop()
    cfg = EngineConfig(str(tiny_models["llama_gqa"]), str(adapters_root(tiny_adapters)), dtype="float32",
                       pool_bytes=4 * 2**20, max_model_len=128)
    srv = LoraFleetServer(ServerConfig(cfg, port=0, metrics_port=None, shutdown_grace=1.0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(srv.start(), loop).result(120)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    yield pb_grpc.LoraFleetStub(channel)
    channel.close()
    asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(120)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


text = st.text(max_size=24)
request = st.builds(
    pb.GenerateRequest,
    adapter_id=st.one_of(st.just(""), st.sampled_from(["r1_v", "r8_k", "nope", "../r8_k", "r1_v/..", " "]), text),
    prompt=st.one_of(st.just(""), text),
    prompt_token_ids=st.lists(st.integers(-3, 260), max_size=12),
    messages=st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["user", "assistant", "system", "", "tool"]),
                                content=text), max_size=3),
    max_new_tokens=st.one_of(st.integers(0, 6), st.just(2**32 - 1)),
    temperature=st.one_of(st.just(0.0), st.floats(-1, 200, width=32), st.just(float("nan"))),
    top_p=st.one_of(st.floats(-1, 2, width=32), st.just(float("nan"))),
    top_k=st.integers(0, 2**32 - 1), seed=st.integers(0, 2**64 - 1),
    stop=st.lists(st.text(max_size=300), max_size=20), stop_token_ids=st.lists(st.integers(-3, 260), max_size=4),
    ignore_eos=st.booleans(), request_id=text,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=request)
def test_any_generate_request_gets_a_clear_answer(server, r):
    try:
        for _ in server.Generate(r, timeout=60):
            pass
    except grpc.RpcError as e:
        assert e.code() in CLEAR, (e.code(), e.details(), r)
        assert e.details()


def test_the_server_still_serves_after_the_fuzzing(server):
    tokens = [t for msg in server.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2], max_new_tokens=3), timeout=60)
              for t in msg.token_ids]
    assert len(tokens) == 3


# ------------------------------------------------------------- adapter folders

class _Decoy:
    def __reduce__(self):
        return (UNPICKLED.append, ("a pickle was loaded",))


NAMES = itertools.count()
json_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10, 300), st.floats(allow_nan=True),
                                    st.text(max_size=10)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                          max_leaves=6)
damage = st.one_of(
    st.tuples(st.just("config"), st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type", "use_dora",
                                                                    "rank_pattern", "alpha_pattern", "bias", "use_rslora",
                                                                    "modules_to_save", "fan_in_fan_out"]), json_value, min_size=1)),
    st.tuples(st.just("config_text"), st.text(max_size=40)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("header"), json_value),
    st.tuples(st.just("pickle"), st.just(None)),
)


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_adapters")
    e = make_engine(tiny_models["llama_gqa"], root)
    yield e, root
    e.shutdown()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(d=damage)
def test_any_damaged_adapter_is_refused_with_a_reason(engine, tiny_adapters, d):
    eng, root = engine
    name = f"f{next(NAMES)}"
    folder = root / name
    shutil.copytree(tiny_adapters["r8_k"], folder)
    st_file, cfg_file = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    kind, value = d
    if kind == "config":
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **value}))
    elif kind == "config_text":
        cfg_file.write_text(value)
    elif kind == "truncate":
        data = st_file.read_bytes()
        st_file.write_bytes(data[: int(len(data) * value)])
    elif kind == "flip":
        data = bytearray(st_file.read_bytes())
        for where, byte in value:
            data[min(len(data) - 1, int(len(data) * where))] = byte
        st_file.write_bytes(bytes(data))
    elif kind == "header":
        header = json.dumps(value).encode()
        st_file.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    else:
        st_file.unlink()
        (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Decoy()))
    try:
        entry = eng.ensure_adapter(name)
        assert entry.info.rank >= 1  # a harmless change (e.g. an unknown key): it reads as an adapter
    except AdapterError as e:
        assert str(e).startswith(f"adapter '{name}': ")
    assert not UNPICKLED
