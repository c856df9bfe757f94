"""The OpenAI-compatible HTTP API, driven by the real `openai` client and by raw HTTP: completions
and chat (streamed and not) equal gRPC's and PEFT's greedy tokens; n with a seed; logprobs against
PEFT's log-softmax; /v1/models; adapter admin; every error case in OpenAI's shape; a client that
disconnects frees its pages; the SSE framing on the wire."""
from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest
import torch
from engines import adapters_root
from peers import decode, peft_greedy, peft_logits

import lorafleet.worker.worker as worker_module
from lorafleet.coordinator.config import EngineConfig
from lorafleet.coordinator.server import LoraFleetServer, ServerConfig
from lorafleet.coordinator.tokenizer import Tokenizer
from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc

WAIT = 60.0  # seconds: the bound of every wait below
KEY = "sk-test-key"
ADMIN = "admin-token"
BASE = "tiny-base"
ADAPTERS = ["r1_v", "r3_attn", "r8_mlp", "r16_all"]


class Served:
    """A LoraFleetServer with its HTTP API on 127.0.0.1 (ephemeral ports), its event loop on a thread."""

    def __init__(self, cfg: ServerConfig):
        self.server = LoraFleetServer(cfg)
        self.loop = asyncio.new_event_loop()
        self._stop = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)
        self.thread.start()
        if not self._ready.wait(WAIT * 3) or self._error is not None:
            raise RuntimeError(f"the server did not start: {self._error!r}")
        self.base_url = f"http://127.0.0.1:{self.server.http_port}"
        self.grpc_target = f"127.0.0.1:{self.server.port}"

    async def _main(self):
        self._stop = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.server.stop()

    def stop(self):
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(WAIT)
        assert not self.thread.is_alive()

    @property
    def snapshot(self):
        return self.server.handles[0].snapshot

    def metric(self, name: str, **labels) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=10).read().decode()
        total = 0.0
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            if (head.startswith(name + "{") or head == name) and all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def client(self, key: str = KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=key, max_retries=0, timeout=WAIT)


def config(model, root, token_file=None, **engine) -> ServerConfig:
    return ServerConfig(EngineConfig(str(model), str(root), dtype="float32", pool_bytes=4 * 2**20, **engine), port=0, metrics_port=0,
                        http_port=0, api_key=KEY, served_model_name=BASE, admin_token_file=token_file,
                        shutdown_grace=1.0)


@pytest.fixture(scope="module")
def root(tiny_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai") / "adapters"
    shutil.copytree(adapters_root(tiny_adapters), root)
    return root


@pytest.fixture(scope="module")
def served(tiny_models, root, tmp_path_factory):
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text(ADMIN)
    srv = Served(config(tiny_models["llama_gqa"], root, str(token)))
    srv.model, srv.root = tiny_models["llama_gqa"], root
    yield srv
    srv.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=3 * WAIT))


def ids_of(logprobs_tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in logprobs_tokens)
    return [int(t.split(":")[1]) for t in logprobs_tokens]


def grpc_greedy(target: str, adapter: str | None, **fields) -> list[int]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.LoraFleetStub(channel)
        return [t for m in stub.Generate(pb.GenerateRequest(adapter_id=adapter or "", **fields), timeout=WAIT)
                for t in m.token_ids]


# ------------------------------------------------------------- generation

def test_completions_and_chat_equal_grpc_and_peft(served):
    """Base and four adapters at once, completions and chat, streamed and not: the same greedy tokens
    as gRPC and as transformers + PEFT; streamed text equals the whole text; usage adds up."""
    tok = Tokenizer(served.model)
    models = [None] + ADAPTERS
    prompts = [[9 + 13 * i + j for j in range(3 + i)] for i in range(len(models))]
    chat = [{"role": "user", "content": f"say {i}"} for i in range(len(models))]
    extra = {"ignore_eos": True, "return_tokens_as_token_ids": True}

    async def go():
        c = served.client()
        jobs = []
        for m, p in zip(models, prompts):
            jobs.append(c.completions.create(model=m or BASE, prompt=p, max_tokens=8, temperature=0, logprobs=1, extra_body=extra))
            jobs.append(c.completions.create(model=m or BASE, prompt=p, max_tokens=8, temperature=0, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        for m, msg in zip(models, chat):
            jobs.append(c.chat.completions.create(model=m or BASE, messages=[msg], max_tokens=6, temperature=0, logprobs=True,
                                                  extra_body=extra))
            jobs.append(c.chat.completions.create(model=m or BASE, messages=[msg], max_tokens=6, temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True}))
        results = await asyncio.gather(*jobs)
        streamed = []
        for r in results[1::2]:
            streamed.append([chunk async for chunk in r])
        return results[0::2], streamed

    whole, streamed = run(go())
    n = len(models)
    for i, (m, p) in enumerate(zip(models, prompts)):
        adapter_dir = served.root / m if m else None
        r = whole[i]
        tokens = ids_of(r.choices[0].logprobs.tokens)
        assert tokens == peft_greedy(served.model, adapter_dir, p, 8) == grpc_greedy(
            served.grpc_target, m, prompt_token_ids=p, max_new_tokens=8, ignore_eos=True)
        assert r.model == (m or BASE) and r.object == "text_completion" and r.choices[0].finish_reason == "length"
        assert r.choices[0].text == decode(tokens)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(p), 8)
        chunks = streamed[i]
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    for i, (m, msg) in enumerate(zip(models, chat)):
        adapter_dir = served.root / m if m else None
        r = whole[n + i]
        prompt = tok.apply_chat_template([msg])
        tokens = ids_of([t.token for t in r.choices[0].logprobs.content])
        assert tokens == peft_greedy(served.model, adapter_dir, prompt, 6) == grpc_greedy(
            served.grpc_target, m, messages=[pb.ChatMessage(**msg)], max_new_tokens=6, ignore_eos=True)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == decode(tokens)
        assert r.usage.prompt_tokens == len(prompt)
        chunks = streamed[n + i]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "length"
    assert served.metric("lorafleet_requests_total", frontend="http", adapter="r16_all", status="ok") >= 4
    assert served.metric("lorafleet_requests_total", frontend="grpc", adapter="r16_all", status="ok") >= 2


def test_n_with_a_seed_is_reproducible(served):
    """n=2 with a seed: the same two samples every time, different from each other; choice 0 is what
    n=1 with that seed gives; a list of string prompts gives one choice per prompt and sample."""
    async def go():
        c = served.client()
        ask = dict(model="r3_attn", prompt="hello there", max_tokens=12, temperature=3.0, seed=1234,
                   extra_body={"ignore_eos": True})
        first, second, single = await asyncio.gather(c.completions.create(n=2, **ask), c.completions.create(n=2, **ask),
                                                     c.completions.create(n=1, **ask))
        multi = await c.completions.create(model=BASE, prompt=["ab", "cd"], n=2, max_tokens=3, temperature=0,
                                           extra_body={"ignore_eos": True})
        return first, second, single, multi

    first, second, single, multi = run(go())
    texts = [ch.text for ch in first.choices]
    assert [ch.index for ch in first.choices] == [0, 1]
    assert texts == [ch.text for ch in second.choices]
    assert texts[0] != texts[1]
    assert single.choices[0].text == texts[0]
    assert [ch.index for ch in multi.choices] == [0, 1, 2, 3]
    assert multi.choices[0].text == multi.choices[1].text and multi.usage.prompt_tokens == 4
    assert multi.usage.completion_tokens == 12


def test_logprobs_agree_with_peft(served):
    """Greedy with top-5 logprobs: the chosen token's logprob is the largest of the top ones, and the
    top candidates and their values are PEFT's log-softmax within float32 tolerance; chat's
    top_logprobs have the asked count and the same property."""
    prompt = [40, 41, 42, 43]
    adapter = "r8_mlp"

    async def go():
        c = served.client()
        comp = await c.completions.create(model=adapter, prompt=prompt, max_tokens=5, temperature=0, logprobs=5,
                                          extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        chat = await c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                               temperature=0, logprobs=True, top_logprobs=3)
        return comp, chat

    comp, chat = run(go())
    lp = comp.choices[0].logprobs
    tokens = ids_of(lp.tokens)
    logits = peft_logits(served.model, served.root / adapter, prompt + tokens[:-1])[len(prompt) - 1:]
    reference = torch.log_softmax(logits.float(), dim=-1)
    for t, (token, value, top) in enumerate(zip(tokens, lp.token_logprobs, lp.top_logprobs)):
        assert len(top) == 5 and value == max(top.values())
        assert top[f"token_id:{token}"] == value
        expected = torch.topk(reference[t], 5)
        assert [int(k.split(":")[1]) for k in top] == expected.indices.tolist()
        torch.testing.assert_close(torch.tensor(list(top.values())), expected.values, atol=1e-4, rtol=0)
    assert lp.text_offset[0] == 0
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == max(t.logprob for t in item.top_logprobs)
        assert item.top_logprobs[0].token == item.token


# ------------------------------------------------------------- models and adapters

def test_models_list_adapters_with_parent(served):
    models = run(served.client().models.list()).data
    by_id = {m.id: m for m in models}
    assert models[0].id == BASE and models[0].parent is None
    assert set(ADAPTERS) <= set(by_id)
    for name in ADAPTERS:
        assert by_id[name].parent == BASE and by_id[name].model_extra["loaded"] in (True, False)


def test_load_and_unload_need_the_admin_token(served):
    url = served.base_url + "/v1"
    with httpx.Client(timeout=WAIT) as h:
        refused = h.post(url + "/load_lora_adapter", json={"lora_name": "r2_up"}, headers={"Authorization": f"Bearer {KEY}"})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthenticated"
        admin = {"Authorization": f"Bearer {ADMIN}"}
        loaded = h.post(url + "/load_lora_adapter", json={"lora_name": "r2_up", "lora_path": "r2_up"}, headers=admin)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["residence"] in ("host_cache", "device_pool")
        models = {m["id"]: m for m in h.get(url + "/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]}
        assert models["r2_up"]["loaded"] is True and models["r2_up"]["parent"] == BASE
        outside = h.post(url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}, headers=admin)
        assert outside.status_code == 403, outside.text
        assert h.post(url + "/unload_lora_adapter", json={"lora_name": "r2_up"},
                      headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
        unloaded = h.post(url + "/unload_lora_adapter", json={"lora_name": "r2_up"}, headers=admin)
        assert unloaded.status_code == 200, unloaded.text
        again = h.post(url + "/unload_lora_adapter", json={"lora_name": "r2_up"}, headers=admin)
        assert again.status_code == 404 and again.json()["error"]["message"]
        models = {m["id"]: m for m in h.get(url + "/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]}
        assert models["r2_up"]["loaded"] is False


# ------------------------------------------------------------- errors

def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_every_error_has_its_status_and_openai_shape(served):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = served.base_url + "/v1"
    ok = {"model": BASE, "prompt": [5, 6], "max_tokens": 2}
    with httpx.Client(timeout=WAIT) as h:
        post = lambda path, body, headers=auth: h.post(url + path, json=body, headers=headers)  # noqa: E731
        assert _error(post("/completions", ok, {}), 401)["code"] == "invalid_api_key"
        assert _error(post("/completions", ok, {"Authorization": "Bearer wrong"}), 401)["type"] == "authentication_error"
        assert _error(post("/completions", {**ok, "temperature": "hot"}), 400)["param"] == "temperature"
        assert _error(post("/completions", {**ok, "max_tokens": 0}), 400)["param"] == "max_tokens"
        assert _error(post("/completions", {**ok, "echo": True}), 400)["param"] == "echo"
        assert _error(post("/completions", {**ok, "prompt": []}), 400)["param"] == "prompt"
        assert _error(post("/completions", {**ok, "prompt": [999]}), 400)["code"] == "invalid_argument"
        assert _error(post("/completions", {**ok, "n": 0}), 400)["param"] == "n"
        assert _error(post("/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "x"}],
                                                 "logprobs": True, "top_logprobs": 21}), 400)["param"] == "top_logprobs"
        assert _error(post("/chat/completions", {"model": BASE, "messages": "hi"}), 400)["param"] == "messages"
        assert _error(post("/completions", {**ok, "stream_options": {"include_usage": True}}), 400)["param"] == "stream_options"
        assert _error(post("/completions", {k: v for k, v in ok.items() if k != "model"}), 400)["param"] == "model"
        assert _error(post("/completions", {**ok, "model": "no-such-adapter"}), 404)["code"] == "not_found"
        assert _error(post("/completions", {**ok, "model": "no-such-adapter", "stream": True}), 404)
        assert _error(post("/completions", {**ok, "model": "../etc"}), 404)["code"] == "model_not_found"
        too_long = _error(post("/completions", {**ok, "prompt": [5] * 600}), 400)
        assert "context" in too_long["message"]
        assert _error(h.post(url + "/completions", content=b"{not json", headers=auth), 400)
        assert _error(h.get(url + "/nowhere", headers=auth), 404)
        assert _error(h.get(url + "/completions", headers=auth), 405)
        assert h.get(served.base_url + "/health").status_code == 200
        after = post("/completions", {**ok, "extra_field_nobody_knows": 1})  # unknown fields are ignored
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2
    with pytest.raises(openai.NotFoundError):
        run(served.client().completions.create(model="no-such-adapter", prompt="x", max_tokens=1))
    with pytest.raises(openai.AuthenticationError):
        run(served.client("bad").completions.create(model=BASE, prompt="x", max_tokens=1))


def test_queue_full_and_no_replica_serving(tiny_models, root, monkeypatch):
    """A full queue is 429; a replica whose step failed makes requests 503 and /health 503."""
    failing = threading.Event()
    real = worker_module.Worker.execute

    def execute(self, step):
        if failing.is_set():
            raise RuntimeError("the device is gone")
        return real(self, step)

    monkeypatch.setattr(worker_module.Worker, "execute", execute)
    srv = Served(config(tiny_models["llama_gqa"], root, max_queue=1, max_num_seqs=1))
    auth = {"Authorization": f"Bearer {KEY}"}
    long = {"model": BASE, "prompt": [5, 6], "max_tokens": 300, "ignore_eos": True, "stream": True}
    pool = ThreadPoolExecutor(1)
    try:
        with httpx.Client(base_url=srv.base_url, headers=auth, timeout=WAIT) as h, \
                httpx.Client(base_url=srv.base_url, headers=auth, timeout=WAIT) as other:
            with h.stream("POST", "/v1/completions", json=long) as running:
                lines = running.iter_lines()
                assert next(lines).startswith("data: {")  # its first tokens: it runs
                waiting = pool.submit(other.post, "/v1/completions", json={**long, "stream": False})
                for _ in range(int(WAIT / 0.05)):  # bounded: until the second one waits in the queue
                    if srv.server.handles[0].in_flight == 2:
                        break
                    time.sleep(0.05)
                assert _error(h.post("/v1/completions", json={**long, "stream": False}), 429)["type"] == "rate_limit_error"
                failing.set()
                assert _error(waiting.result(WAIT), 503)["code"] == "unavailable"
                rest = [line for line in lines if line]
                assert json.loads(rest[-2][len("data: "):])["error"]["code"] == "unavailable" and rest[-1] == "data: [DONE]"
            assert _error(h.post("/v1/completions", json={**long, "stream": False}), 503)["code"] == "unavailable"
            assert h.get("/health").status_code == 503
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        srv.stop()


# ------------------------------------------------------------- streams on the wire

def _events(raw: bytes) -> list[bytes]:
    """The SSE events of a body; each must be one 'data: ...' line ended by a blank line."""
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events), raw[:500]
    return [e[len(b"data: "):] for e in events]


def test_sse_framing_on_raw_bytes(served):
    conn = http.client.HTTPConnection("127.0.0.1", served.server.http_port, timeout=WAIT)
    body = {"model": "r1_v", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}",
                                                                     "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = _events(response.read())
    conn.close()
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "r1_v" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])


def test_a_client_that_disconnects_frees_its_pages(served):
    """Mid-stream, the client closes its connection: the request is cancelled, the KV pages it held
    on its own are free again (in the replica's snapshot and in the pool-pages gauge; the prefix
    cache keeps what it computed, for anyone to reuse or evict), and the metrics count it."""
    before = served.metric("lorafleet_requests_total", frontend="http", status="cancelled")
    steps = served.snapshot.steps
    conn = http.client.HTTPConnection("127.0.0.1", served.server.http_port, timeout=WAIT)
    body = {"model": "r16_all", "prompt": [7, 8, 9], "max_tokens": 500, "temperature": 0, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200
    first = response.read(7)  # the chunked body, decoded
    assert first.startswith(b"data: {")
    assert served.snapshot.kv_pages + served.snapshot.cache_pages > 0  # its prompt's KV joined the prefix cache
    conn.sock.shutdown(2)
    conn.close()
    freed = False
    for _ in range(int(WAIT / 0.1)):  # bounded
        if served.snapshot.kv_pages == 0 and served.snapshot.running == 0 and \
                served.metric("lorafleet_pool_pages", use="kv") == 0:
            freed = True
            break
        time.sleep(0.1)
    assert freed, f"{served.snapshot.kv_pages} KV pages still held"
    assert served.snapshot.steps - steps < 400  # freed by the cancel, not by running to its 500th token
    for _ in range(int(WAIT / 0.1)):
        if served.metric("lorafleet_requests_total", frontend="http", status="cancelled") == before + 1:
            break
        time.sleep(0.1)
    assert served.metric("lorafleet_requests_total", frontend="http", status="cancelled") == before + 1


def test_lorafleet_serve_http_port_and_api_key_file(tiny_models, tmp_path):
    """`lorafleet serve --http-port 0 --api-key-file F`: the ready line gives the HTTP port, the API
    answers beside gRPC, and SIGTERM still shuts the whole server down cleanly."""
    from servers import ServerProcess

    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    srv = ServerProcess("--model", str(tiny_models["llama_gqa"]), "--pool-bytes", "4MiB", "--http-port", "0",
                        "--api-key-file", str(key_file))
    try:
        base = f"http://127.0.0.1:{srv.info['http_port']}"
        with httpx.Client(base_url=base, timeout=WAIT) as h:
            assert h.get("/health").status_code == 200
            models = h.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
            assert models[0]["id"] == tiny_models["llama_gqa"].name
            done = h.post("/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": models[0]["id"], "prompt": [5, 6], "max_tokens": 3, "temperature": 0})
            assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] >= 1
            assert h.get("/v1/models").status_code == 401
    finally:
        assert srv.stop() == 0
