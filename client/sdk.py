"""The Python SDK of lorafleet: a blocking `Client` and an asyncio `AsyncClient`.

    with Client("127.0.0.1:50051") as client:
        for chunk in client.generate(adapter="sql", prompt="SELECT", max_new_tokens=32):
            print(chunk.text, end="", flush=True)
        print(client.complete(prompt="Hello", max_new_tokens=8).text)

Both clients speak the public gRPC API (`lorafleet.v1.LoraFleet`) and return plain
dataclasses, never protobuf messages. Every failed call raises `LoraFleetError`,
which keeps the gRPC status code. Times are in seconds.
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc

from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc


class LoraFleetError(Exception):
    """A call that the server (or the channel) ended with a non-OK gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> LoraFleetError:
        """Wraps a grpc.RpcError (a grpc.Call or grpc.aio.AioRpcError)."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Chunk:
    """One streamed message: the new tokens and their text; the last one has finish_reason and usage."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "" until the last chunk, then "length", "stop" or "cancelled"
    usage: Usage | None  # set on the last chunk
    request_id: str


@dataclass(frozen=True)
class Completion:
    """A whole generation: the chunks of one stream joined."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage | None
    request_id: str


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    rank: int
    targets: tuple[str, ...]
    residence: str  # "device_pool", "host_cache" or "disk"
    requests: int  # requests served with it since it was loaded
    pool_pages: int  # pages it takes in a device pool
    replicas: tuple[int, ...]  # replicas whose pool holds it now


@dataclass(frozen=True)
class ServerInfo:
    model: str
    dtype: str
    tp: int
    replicas: int
    max_lora_rank: int
    max_model_len: int  # tokens
    max_num_seqs: int
    max_batched_tokens: int
    pool_pages: int  # per replica
    vocab_size: int
    version: str
    prefix_cache: bool = True  # KV of shared prefixes reused per adapter
    adapter_affinity: int = 0  # steps a request may wait for ones whose adapter is in the batch


def _plain(cls, message):
    """The dataclass `cls` filled from the same-named fields of a protobuf message."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(message, f.name)
        values[f.name] = value if isinstance(value, (str, int, float, bool)) else tuple(value)
    return cls(**values)


def _chunk(message: pb.GenerateResponse) -> Chunk:
    usage = _plain(Usage, message.usage) if message.HasField("usage") else None
    return Chunk(text=message.text, token_ids=tuple(message.token_ids), finish_reason=message.finish_reason,
                 usage=usage, request_id=message.request_id)


def _completion(chunks: Iterable[Chunk]) -> Completion:
    text, token_ids, finish_reason, usage, request_id = [], [], "", None, ""
    for chunk in chunks:
        text.append(chunk.text)
        token_ids.extend(chunk.token_ids)
        finish_reason = chunk.finish_reason or finish_reason
        usage = chunk.usage or usage
        request_id = chunk.request_id or request_id
    return Completion("".join(text), tuple(token_ids), finish_reason, usage, request_id)


def _chat_message(message) -> pb.ChatMessage:
    if isinstance(message, Mapping):
        return pb.ChatMessage(role=message["role"], content=message["content"])
    role, content = message
    return pb.ChatMessage(role=role, content=content)


def generate_request(
    adapter: str | None = None,
    prompt: str | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    messages: Sequence | None = None,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    request_id: str = "",
) -> pb.GenerateRequest:
    """The GenerateRequest for `generate`'s arguments; exactly one of prompt, prompt_token_ids, messages."""
    given = [name for name, value in (("prompt", prompt), ("prompt_token_ids", prompt_token_ids),
                                      ("messages", messages)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, prompt_token_ids or messages (got {given or 'none'})")
    if isinstance(stop, str):
        raise ValueError("stop is a list of strings, not one string")
    request = pb.GenerateRequest(
        adapter_id=adapter or "", max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos, request_id=request_id,
    )
    if prompt is not None:
        request.prompt = prompt
    if prompt_token_ids is not None:
        request.prompt_token_ids.extend(prompt_token_ids)
    if messages is not None:
        request.messages.extend(_chat_message(m) for m in messages)
    if top_p is not None:
        request.top_p = top_p
    if seed is not None:
        request.seed = seed
    return request


class _Settings:
    """What both clients share: target, credentials, admin metadata, default deadline."""

    def __init__(self, target: str, tls_ca: str | None, admin_token: str | None, timeout: float | None):
        if not target:
            raise ValueError("target must be HOST:PORT")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout}")
        self.target = target
        self.timeout = timeout
        self.credentials = None
        if tls_ca is not None:
            with open(tls_ca, "rb") as f:
                self.credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        self.admin_metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()


class Client:
    """A blocking client. `target` is HOST:PORT; `tls_ca` a PEM file of the CA that signed the
    server's certificate (TLS when given); `admin_token` is sent as `authorization: Bearer <token>`
    on LoadAdapter and UnloadAdapter; `timeout` is each call's deadline in seconds (None: none).
    """

    def __init__(self, target: str, *, tls_ca: str | None = None, admin_token: str | None = None,
                 timeout: float | None = None):
        self._settings = _Settings(target, tls_ca, admin_token, timeout)
        if self._settings.credentials is None:
            self._channel = grpc.insecure_channel(target)
        else:
            self._channel = grpc.secure_channel(target, self._settings.credentials)
        self._stub = pb_grpc.LoraFleetStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, adapter: str | None = None, prompt: str | None = None,
                 prompt_token_ids: Sequence[int] | None = None, messages: Sequence | None = None,
                 max_new_tokens: int = 0, temperature: float = 0.0, top_p: float | None = None, top_k: int = 0,
                 seed: int | None = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 ignore_eos: bool = False, request_id: str = "") -> Iterator[Chunk]:
        """Streams the chunks of one generation as the server sends them.

        adapter: None or "" for the base model. Exactly one of prompt (text), prompt_token_ids or
        messages (dicts with "role" and "content", or (role, content) pairs). max_new_tokens: 0 is
        the server's default. temperature 0 is greedy. Leaving the loop early cancels the request.
        """
        request = generate_request(adapter, prompt, prompt_token_ids, messages, max_new_tokens, temperature,
                                   top_p, top_k, seed, stop, stop_token_ids, ignore_eos, request_id)
        return self._stream(request)

    def _stream(self, request: pb.GenerateRequest) -> Iterator[Chunk]:
        call = self._stub.Generate(request, timeout=self._settings.timeout)
        try:
            for message in call:
                yield _chunk(message)
        except grpc.RpcError as e:
            raise LoraFleetError.from_rpc(e) from None
        finally:
            call.cancel()

    def complete(self, *args, **kwargs) -> Completion:
        """Takes `generate`'s arguments and returns the whole generation at once."""
        return _completion(self.generate(*args, **kwargs))

    def load_adapter(self, name: str, path: str = "") -> AdapterInfo:
        """Registers the adapter folder `path` (relative to the server's adapters root; "" is `name`)."""
        response = self._call(self._stub.LoadAdapter, pb.LoadAdapterRequest(name=name, path=path), admin=True)
        return _plain(AdapterInfo, response.adapter)

    def unload_adapter(self, name: str) -> int:
        """Removes an adapter; returns how many requests still running with it finished first."""
        response = self._call(self._stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name), admin=True)
        return response.requests_drained

    def list_adapters(self) -> list[AdapterInfo]:
        response = self._call(self._stub.ListAdapters, pb.ListAdaptersRequest())
        return [_plain(AdapterInfo, a) for a in response.adapters]

    def server_info(self) -> ServerInfo:
        return _plain(ServerInfo, self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest()))

    def _call(self, method, request, admin: bool = False):
        metadata = self._settings.admin_metadata if admin else ()
        try:
            return method(request, timeout=self._settings.timeout, metadata=metadata)
        except grpc.RpcError as e:
            raise LoraFleetError.from_rpc(e) from None


class AsyncClient:
    """The asyncio twin of `Client` (same arguments, same results, awaitable), over grpc.aio.

    Create it inside a running event loop; close it with `await client.close()` or
    `async with AsyncClient(...) as client:`.
    """

    def __init__(self, target: str, *, tls_ca: str | None = None, admin_token: str | None = None,
                 timeout: float | None = None):
        self._settings = _Settings(target, tls_ca, admin_token, timeout)
        if self._settings.credentials is None:
            self._channel = grpc.aio.insecure_channel(target)
        else:
            self._channel = grpc.aio.secure_channel(target, self._settings.credentials)
        self._stub = pb_grpc.LoraFleetStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def generate(self, adapter: str | None = None, prompt: str | None = None,
                 prompt_token_ids: Sequence[int] | None = None, messages: Sequence | None = None,
                 max_new_tokens: int = 0, temperature: float = 0.0, top_p: float | None = None, top_k: int = 0,
                 seed: int | None = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 ignore_eos: bool = False, request_id: str = "") -> AsyncIterator[Chunk]:
        """Like `Client.generate`, as an async iterator. Cancelling the task that iterates (or
        leaving the loop early) cancels the request on the server."""
        request = generate_request(adapter, prompt, prompt_token_ids, messages, max_new_tokens, temperature,
                                   top_p, top_k, seed, stop, stop_token_ids, ignore_eos, request_id)
        return self._stream(request)

    async def _stream(self, request: pb.GenerateRequest) -> AsyncIterator[Chunk]:
        call = self._stub.Generate(request, timeout=self._settings.timeout)
        try:
            async for message in call:
                yield _chunk(message)
        except grpc.RpcError as e:
            raise LoraFleetError.from_rpc(e) from None
        finally:
            call.cancel()

    async def complete(self, *args, **kwargs) -> Completion:
        """Takes `generate`'s arguments and returns the whole generation at once."""
        return _completion([chunk async for chunk in self.generate(*args, **kwargs)])

    async def load_adapter(self, name: str, path: str = "") -> AdapterInfo:
        response = await self._call(self._stub.LoadAdapter, pb.LoadAdapterRequest(name=name, path=path), admin=True)
        return _plain(AdapterInfo, response.adapter)

    async def unload_adapter(self, name: str) -> int:
        response = await self._call(self._stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name), admin=True)
        return response.requests_drained

    async def list_adapters(self) -> list[AdapterInfo]:
        response = await self._call(self._stub.ListAdapters, pb.ListAdaptersRequest())
        return [_plain(AdapterInfo, a) for a in response.adapters]

    async def server_info(self) -> ServerInfo:
        return _plain(ServerInfo, await self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest()))

    async def _call(self, method, request, admin: bool = False):
        metadata = self._settings.admin_metadata if admin else ()
        try:
            return await method(request, timeout=self._settings.timeout, metadata=metadata)
        except grpc.RpcError as e:
            raise LoraFleetError.from_rpc(e) from None
