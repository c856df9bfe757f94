"""The OpenAI-compatible HTTP front end: /v1/completions, /v1/chat/completions, /v1/models,
/v1/load_lora_adapter, /v1/unload_lora_adapter and /health, served by uvicorn on the gRPC
server's event loop, over the same Fleet (replicas, router, request model, admin rules, metrics).

`model` names an adapter (a subfolder of --adapters, loaded on first use) or the base model
(--served-model-name). Streams are server-sent events ending with `data: [DONE]`; a client
that goes away cancels its requests, which frees their pages. Errors are OpenAI's error
object with the HTTP status that matches the replica's Code.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
import uuid
from dataclasses import replace

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..worker.step import TokenLogprobs
from .messages import Code
from .output import Chunk, OutputProcessor
from .replica import RequestFailed, RequestStream
from .request import ADAPTER_NAME, InvalidRequest, OpenAIFields, fields_from_openai

log = logging.getLogger(__name__)

CHAT_MAX_TOKENS = 1024  # a chat request without max_tokens: the rest of the context, at most this
MAX_BODY = 8 * 2**20  # bytes of one request body

STATUS = {
    Code.INVALID_ARGUMENT: 400, Code.UNAUTHENTICATED: 401, Code.PERMISSION_DENIED: 403, Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409, Code.FAILED_PRECONDITION: 409, Code.RESOURCE_EXHAUSTED: 429, Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503, Code.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable_error", 504: "timeout_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def of(cls, error: RequestFailed | InvalidRequest) -> ApiError:
        if isinstance(error, InvalidRequest):
            return cls(400, str(error), error.param, Code.INVALID_ARGUMENT.value)
        return cls(STATUS[error.code], error.message, None, error.code.value)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"), "param": self.param,
                          "code": self.code}}


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), e.status)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's shape."""
    return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), e.status_code, headers=e.headers)


async def _all(coros) -> list:
    """gather, but a failure cancels the others instead of leaving them waiting on closed streams."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


class _Choice:
    """One choice of a response: one request in a replica, its output processor and what it produced."""

    def __init__(self, fleet, index: int, fields: OpenAIFields, request, stream: RequestStream, processor: OutputProcessor):
        self.fleet, self.index, self.fields, self.request, self.stream = fleet, index, fields, request, stream
        self.processor = processor
        self.first_token: float | None = None
        self.failure: RequestFailed | None = None
        self.completion_tokens = 0

    async def next_chunk(self) -> tuple[Chunk, list[TokenLogprobs]]:
        try:
            self.stream, batch = await self.fleet.next_batch(self.stream, self.request, self.processor.sent_tokens)
        except RequestFailed as f:
            self.failure = f
            raise
        tokens = [t for m in batch for t in m.token_ids]
        logprobs = [lp for m in batch for lp in (m.logprobs or ())]
        chunk = self.processor.push(tokens, batch[-1].finish_reason)
        if self.processor.stopped_by_string:
            self.stream.close("stop")
        if self.first_token is None and tokens:
            self.first_token = time.monotonic()
        self.completion_tokens = chunk.completion_tokens or self.processor.sent_tokens
        return chunk, logprobs

    @property
    def status(self) -> str:
        if self.processor.finished:
            return "ok"
        return self.failure.code.value if self.failure is not None else "cancelled"


class _Logprobs:
    """Renders TokenLogprobs in the shape of completions (tokens, token_logprobs, top_logprobs,
    text_offset) or of chat (content: [{token, logprob, bytes, top_logprobs}])."""

    def __init__(self, tokenizer, fields: OpenAIFields, chat: bool):
        self.tokenizer, self.top, self.chat, self.as_ids = tokenizer, fields.logprobs, chat, fields.tokens_as_ids

    def token(self, token_id: int) -> str:
        if self.as_ids or self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def render(self, token_ids: list[int], logprobs: list[TokenLogprobs], offset: int) -> dict | None:
        if self.top is None:
            return None
        names = [self.token(t) for t in token_ids]
        if self.chat:
            return {"content": [{"token": name, "logprob": lp.logprob, "bytes": list(name.encode()),
                                 "top_logprobs": [{"token": self.token(i), "logprob": v, "bytes": list(self.token(i).encode())}
                                                  for i, v in zip(lp.top_ids[:self.top], lp.top_logprobs[:self.top])]}
                                for name, lp in zip(names, logprobs)]}
        offsets = []
        for name in names:
            offsets.append(offset)
            offset += len(name)
        return {"tokens": names, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self.token(i): v for i, v in zip(lp.top_ids[:self.top], lp.top_logprobs[:self.top])}
                                 for lp in logprobs],
                "text_offset": offsets}

    @staticmethod
    def merge(parts: list[dict | None]) -> dict | None:
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        return {key: [x for p in parts for x in p[key]] for key in parts[0]}


class OpenAIApi:
    """The routes, over the server's Fleet."""

    def __init__(self, fleet, model_name: str, api_key: str | None):
        self.fleet, self.model_name, self.api_key = fleet, model_name, api_key
        self.created = int(time.time())

    def app(self) -> FastAPI:
        app = FastAPI(title="lorafleet", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(ApiError, _api_error)
        app.add_exception_handler(HTTPException, _http_error)
        v1 = APIRouter(prefix="/v1", dependencies=[Depends(self._check_key)])
        v1.add_api_route("/completions", self.completions, methods=["POST"])
        v1.add_api_route("/chat/completions", self.chat_completions, methods=["POST"])
        v1.add_api_route("/models", self.models, methods=["GET"])
        v1.add_api_route("/load_lora_adapter", self.load_lora_adapter, methods=["POST"])
        v1.add_api_route("/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"])
        app.include_router(v1)
        app.add_api_route("/health", self.health, methods=["GET"])
        return app

    # ------------------------------------------------------------- access

    async def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        keys = [self.api_key] + ([self.fleet.admin_token] if request.url.path.endswith("_lora_adapter")
                                 and self.fleet.admin_token else [])
        if not any(hmac.compare_digest(given, f"Bearer {k}".encode()) for k in keys):
            raise ApiError(401, "this server needs 'Authorization: Bearer <key>' with its --api-key", None, "invalid_api_key")

    def _check_admin(self, request: Request) -> None:
        host = request.client.host if request.client else ""
        try:
            self.fleet.authorize(request.headers.get("authorization", ""), host.startswith("127.") or host == "::1")
        except RequestFailed as f:
            raise ApiError.of(f) from f

    @staticmethod
    async def _json(request: Request):
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
        body = await request.body()
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from e

    # ------------------------------------------------------------- completions

    async def completions(self, request: Request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool):
        started = time.monotonic()
        body = await self._json(request)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            self.fleet.check_open()
            fields = fields_from_openai(body, chat, rid, self.model_name)
        except (InvalidRequest, RequestFailed) as e:
            raise ApiError.of(e) from e
        adapter = None if fields.model == self.model_name else fields.model
        if adapter is not None and not ADAPTER_NAME.match(adapter):
            raise ApiError(404, f"the model {fields.model!r} does not exist; GET /v1/models lists them", "model",
                           "model_not_found")
        choices = self._submit(fields, chat)
        streaming = False
        try:
            # the first tokens of every choice before answering: a refusal still gets its HTTP status
            firsts = await _all(c.next_chunk() for c in choices)
            if fields.stream:
                response = StreamingResponse(self._stream(rid, fields, chat, choices, firsts, started),
                                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
                streaming = True
                return response
            return JSONResponse(await self._whole(rid, fields, chat, choices, firsts))
        except RequestFailed as f:
            raise ApiError.of(f) from f
        finally:
            if not streaming:  # else the stream's own finally does it
                self._finish(choices, started)

    def _submit(self, fields: OpenAIFields, chat: bool) -> list[_Choice]:
        """Parses and routes every choice, then submits them all (none if one is refused)."""
        try:
            requests = [self.fleet.parser.parse(f) for f in fields.choices]
            if chat and not fields.max_tokens_given:
                room = self.fleet.facts.max_model_len - len(requests[0].prompt_ids)
                requests = [replace(r, max_new_tokens=max(1, min(CHAT_MAX_TOKENS, room))) for r in requests]
            replicas = [self.fleet.route(r.adapter) for r in requests]
        except (InvalidRequest, RequestFailed) as e:
            raise ApiError.of(e) from e
        return [_Choice(self.fleet, i, fields, r, h.submit(r), OutputProcessor(self.fleet.tokenizer, r))
                for i, (r, h) in enumerate(zip(requests, replicas))]

    def _finish(self, choices: list[_Choice], started: float) -> None:
        for c in choices:
            c.stream.close()  # a choice that has not ended (the client left, a sibling failed): free its pages
            self.fleet.observe("http", c.request.adapter, c.status, started, c.first_token, c.completion_tokens)

    def _usage(self, choices: list[_Choice]) -> dict:
        prompt = sum(len(c.request.prompt_ids) for c in choices if c.index % choices[0].fields.n == 0)
        completion = sum(c.completion_tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _whole(self, rid: str, fields: OpenAIFields, chat: bool, choices: list[_Choice], firsts) -> dict:
        async def drain(c: _Choice, first) -> dict:
            render = _Logprobs(self.fleet.tokenizer, fields, chat)
            text, parts, chunk = "", [], None
            pending = first
            while True:
                chunk, logprobs = pending
                parts.append(render.render(chunk.token_ids, logprobs, len(text)))
                text += chunk.text
                if c.processor.finished:
                    break
                pending = await c.next_chunk()
            out = {"index": c.index, "logprobs": _Logprobs.merge(parts), "finish_reason": chunk.finish_reason}
            if chat:
                return {**out, "message": {"role": "assistant", "content": text}}
            return {**out, "text": text}

        rendered = await _all(drain(c, f) for c, f in zip(choices, firsts))
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": fields.model, "choices": rendered, "usage": self._usage(choices)}

    async def _stream(self, rid: str, fields: OpenAIFields, chat: bool, choices: list[_Choice], firsts, started: float):
        """The SSE body: one event per choice per batch of tokens, then usage (when asked), then [DONE]."""
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": fields.model}
        renders = [_Logprobs(self.fleet.tokenizer, fields, chat) for _ in choices]
        offsets = [0] * len(choices)
        usage = {"usage": None} if fields.include_usage else {}

        def event(c: _Choice, chunk: Chunk, logprobs) -> str:
            lp = renders[c.index].render(chunk.token_ids, logprobs, offsets[c.index])
            offsets[c.index] += len(chunk.text)
            body = {"delta": {"content": chunk.text}} if chat else {"text": chunk.text}
            return _sse({**head, "choices": [{"index": c.index, **body, "logprobs": lp,
                                              "finish_reason": chunk.finish_reason}], **usage})

        pending: dict[asyncio.Task, _Choice] = {}
        try:
            if chat:
                for c in choices:
                    yield _sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}], **usage})
            for c, (chunk, logprobs) in zip(choices, firsts):
                yield event(c, chunk, logprobs)
            pending = {asyncio.ensure_future(c.next_chunk()): c for c in choices if not c.processor.finished}
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    c = pending.pop(task)
                    chunk, logprobs = task.result()  # a RequestFailed ends the stream with an error event
                    yield event(c, chunk, logprobs)
                    if not c.processor.finished:
                        pending[asyncio.ensure_future(c.next_chunk())] = c
            if fields.include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage(choices)})
        except RequestFailed as f:
            yield _sse(ApiError.of(f).body())
        finally:
            for task in pending:
                task.cancel()
            self._finish(choices, started)
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------- models and adapters

    async def models(self):
        e = self.fleet.cfg.engine
        base = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lorafleet",
                "root": e.model_dir, "parent": None, "max_model_len": self.fleet.facts.max_model_len, "loaded": True}
        listings = await asyncio.to_thread(self.fleet.adapters)
        adapters = [{"id": a.name, "object": "model", "created": self.created, "owned_by": "lorafleet", "root": a.name,
                     "parent": self.model_name, "loaded": a.residence in ("device_pool", "host_cache"),
                     "residence": a.residence, "rank": a.rank} for a in listings if a.residence != "refused"]
        return {"object": "list", "data": [base] + adapters}

    async def load_lora_adapter(self, request: Request):
        self._check_admin(request)
        body = await self._json(request)
        name, path = self._lora_fields(body, "lora_name"), body.get("lora_path")
        if path is not None and not isinstance(path, str):
            raise ApiError(400, "lora_path must be a string: a folder inside the server's --adapters", "lora_path")
        try:
            listing = await self.fleet.load_adapter(name, path)
        except RequestFailed as f:
            raise ApiError.of(f) from f
        return {"object": "lora_adapter", "id": name, "parent": self.model_name, "residence": listing.residence,
                "rank": listing.rank, "message": f"adapter {name!r} is loaded"}

    async def unload_lora_adapter(self, request: Request):
        self._check_admin(request)
        name = self._lora_fields(await self._json(request), "lora_name")
        try:
            drained = await self.fleet.unload_adapter(name)
        except RequestFailed as f:
            raise ApiError.of(f) from f
        return {"object": "lora_adapter", "id": name, "requests_drained": drained,
                "message": f"adapter {name!r} is unloaded"}

    @staticmethod
    def _lora_fields(body, key: str) -> str:
        if not isinstance(body, dict) or not isinstance(body.get(key), str) or not body[key]:
            raise ApiError(400, f"{key} is required: the adapter's name", key)
        return body[key]

    async def health(self):
        if self.fleet.serving():
            return {"status": "serving"}
        return JSONResponse({"status": "not_serving"}, 503)


class _Uvicorn(uvicorn.Server):
    def capture_signals(self):
        return contextlib.nullcontext()  # the lorafleet server's own SIGINT/SIGTERM handlers stay in charge


class OpenAIServer:
    """uvicorn on the running event loop, on a socket bound at construction (so the port is known,
    0 picks one, and a busy port fails before the workers start)."""

    def __init__(self, host: str, port: int, grace: float):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.sock = socket.create_server((host, port), family=family)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} for HTTP: {e.strerror}; choose another with --http-port "
                          "(0 picks a free one, -1 turns the HTTP API off)") from e
        self.port = self.sock.getsockname()[1]
        self.grace = grace
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None

    async def start(self, fleet) -> None:
        cfg = fleet.cfg
        name = cfg.served_model_name or _folder_name(cfg.engine.model_dir)
        app = OpenAIApi(fleet, name, cfg.api_key).app()
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=max(1, int(self.grace)))
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]))
        for _ in range(1000):  # bounded: 10 s
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if not self._server.started:
            await self.stop()
            raise OSError(f"the HTTP API did not start on port {self.port}")

    async def stop(self) -> None:
        if self._task is None:
            self.close()
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, timeout=self.grace + 10)
        except asyncio.TimeoutError:
            log.error("the HTTP API did not stop within %.0fs", self.grace + 10)
        self._task = None
        self.close()

    def close(self) -> None:
        self.sock.close()


def _folder_name(model_dir: str) -> str:
    from pathlib import Path

    return Path(model_dir).resolve().name
