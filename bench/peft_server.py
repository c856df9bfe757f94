"""The S-LoRA paper's Hugging Face PEFT baseline, behind lorafleet's gRPC API (for bench/serving.py).

One base model (transformers) wrapped by PEFT serves every adapter. Requests wait in
arrival order. One loop, over and over:

1. take the adapter of the oldest waiting request, and up to `--batch` waiting requests
   of that adapter (in arrival order);
2. activate the adapter: `load_adapter` (if it is not loaded) + `set_adapter`; at most
   `--max-loaded` adapters stay loaded, the least recently used one is deleted first;
3. run the batch as one greedy `generate`, left padded, to the batch's longest
   `max_new_tokens`; each request gets only its own tokens;
4. answer each request with all its tokens in one message, when the batch ends.

No continuous batching: a request that arrives while a batch runs waits for the batch
to end, and requests of other adapters wait for their group's turn. That is the
baseline's point.

    python bench/peft_server.py --model DIR --adapters DIR [--port 0] [--batch 64] [--max-loaded 4]

It prints one JSON line, {"event": "ready", "host": ..., "port": ...}, on stdout when it
serves; SIGTERM or SIGINT stops it (the running batch is cut short), and it prints
{"event": "stopped", "batches", "requests", "adapter_loads", "swap_s", "generate_s"} last:
what it ran, and the seconds spent activating adapters and generating. It implements
`Generate` (streaming, one message per request) and `GetServerInfo` of
`lorafleet.v1.LoraFleet`; the other methods answer UNIMPLEMENTED. Greedy decoding only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402
from peft_baseline import DTYPES, PeftAdapters, load_base  # noqa: E402  (bench/ is this script's folder)

from lorafleet.coordinator.request import InvalidRequest, RequestParser, fields_from_proto  # noqa: E402
from lorafleet.coordinator.tokenizer import Tokenizer  # noqa: E402
from lorafleet.v1 import lorafleet_pb2 as pb  # noqa: E402
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("peft_server")


@dataclass(frozen=True)
class PeftServerConfig:
    model: str
    adapters: str
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port
    batch: int = 64  # requests in one generate call at most
    max_loaded: int = 4  # adapters kept loaded in the PEFT model at most
    max_queue: int = 4096
    dtype: str = "float32"
    shutdown_grace: float = 5.0

    def __post_init__(self):
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"--model {self.model}: no config.json there")
        if not Path(self.adapters).is_dir():
            raise ValueError(f"--adapters {self.adapters}: no such folder")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        for name in ("batch", "max_loaded", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


class BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Pending:
    """One request waiting for, or in, a batch. `done` gets (token ids, finish reason)."""

    adapter: str | None
    prompt_ids: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int]  # end the answer at the first of these (eos unless ignore_eos, and stop_token_ids)
    request_id: str
    done: asyncio.Future
    cancelled: bool = False


# ---------------------------------------------------------------- the model side (blocking, one thread)


class PeftRunner:
    """The shared PEFT baseline (peft_baseline.py), with a flag that cuts the running batch short."""

    def __init__(self, cfg: PeftServerConfig):
        self.peft = PeftAdapters(load_base(cfg.model, cfg.dtype), cfg.adapters, cfg.max_loaded)
        self.stopping = threading.Event()

    def run(self, adapter: str | None, batch: list[Pending]) -> list[list[int]]:
        """Greedy tokens of each request (its own max_new_tokens), the batch generated together."""
        return self.peft.generate(adapter, [p.prompt_ids for p in batch], [p.max_new_tokens for p in batch],
                                  should_stop=lambda: self.stopping.is_set() or all(p.cancelled for p in batch))


def cut_at_stop(tokens: list[int], p: Pending) -> tuple[list[int], str]:
    """The answer up to and including its first stop token, and the finish reason."""
    for i, token in enumerate(tokens):
        if token in p.stop_ids:
            return tokens[:i + 1], "stop"
    return tokens, "length"


# ---------------------------------------------------------------- the batching loop (asyncio)


@dataclass
class BatchLoop:
    """Waiting requests in arrival order; batches of one adapter at a time, run on a worker thread."""

    runner: PeftRunner
    batch: int
    waiting: deque[Pending] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    def submit(self, p: Pending) -> None:
        self.waiting.append(p)
        self.wakeup.set()

    def next_batch(self) -> tuple[str | None, list[Pending]]:
        """The oldest live request's adapter and up to `batch` live requests of it; drops cancelled ones."""
        while self.waiting and self.waiting[0].cancelled:
            self.waiting.popleft()
        if not self.waiting:
            return None, []
        adapter = self.waiting[0].adapter
        picked = [p for p in self.waiting if p.adapter == adapter and not p.cancelled][:self.batch]
        chosen = set(map(id, picked))
        self.waiting = deque(p for p in self.waiting if id(p) not in chosen and not p.cancelled)
        return adapter, picked

    async def run(self) -> None:
        while True:
            adapter, picked = self.next_batch()
            if not picked:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.runner.run, adapter, picked)
            except Exception as e:  # noqa: BLE001 - the batch's requests get the error, the loop goes on
                log.exception("batch of %d requests for %s failed", len(picked), adapter)
                for p in picked:
                    if not p.done.done():
                        p.done.set_exception(e)
                continue
            for p, tokens in zip(picked, outputs):
                if not p.done.done():
                    p.done.set_result(cut_at_stop(tokens, p))


# ---------------------------------------------------------------- the gRPC service


class PeftService(pb_grpc.LoraFleetServicer):
    def __init__(self, cfg: PeftServerConfig, runner: PeftRunner, loop: BatchLoop, tokenizer):
        self.cfg, self.runner, self.loop, self.tokenizer = cfg, runner, loop, tokenizer
        self.parser = RequestParser(tokenizer, runner.peft.vocab_size)
        self.draining = False

    async def Generate(self, request: pb.GenerateRequest, context):
        request_id = request.request_id or uuid.uuid4().hex
        try:
            p = self._parse(request, request_id)
        except BadRequest as e:
            await context.abort(e.code, e.message)
            return
        self.loop.submit(p)
        try:
            tokens, reason = await p.done
        except Exception as e:  # noqa: BLE001
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
            return
        finally:
            p.cancelled = True  # a request still waiting (client gone) leaves the queue
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
        message = pb.GenerateResponse(token_ids=tokens, text=text, finish_reason=reason, request_id=request_id)
        message.usage.prompt_tokens = len(p.prompt_ids)
        message.usage.completion_tokens = len(tokens)
        yield message

    def _parse(self, r: pb.GenerateRequest, request_id: str) -> Pending:
        """lorafleet's request model, then what the baseline cannot do."""
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if self.draining:
            raise BadRequest(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if len(self.loop.waiting) >= self.cfg.max_queue:
            raise BadRequest(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the queue is full ({self.cfg.max_queue}); retry later")
        try:
            req = self.parser.parse(fields_from_proto(r, request_id))
        except InvalidRequest as e:
            raise BadRequest(invalid, str(e)) from e
        if req.adapter is not None and not (Path(self.cfg.adapters) / req.adapter / "adapter_config.json").is_file():
            raise BadRequest(grpc.StatusCode.NOT_FOUND, f"adapter {req.adapter!r}: no such folder with adapter_config.json "
                                                        f"in {self.cfg.adapters}")
        if req.sampling.temperature != 0 or req.stop:
            raise BadRequest(invalid, "the PEFT baseline decodes greedily only (temperature 0, no stop strings)")
        peft = self.runner.peft
        if len(req.prompt_ids) + req.max_new_tokens > peft.max_len:
            raise BadRequest(invalid, f"prompt ({len(req.prompt_ids)}) + max_new_tokens ({req.max_new_tokens}) exceeds "
                                      f"the model's context of {peft.max_len} tokens")
        stop_ids = frozenset(req.stop_token_ids) | (frozenset() if req.ignore_eos else peft.eos_ids)
        done = asyncio.get_running_loop().create_future()
        return Pending(req.adapter, req.prompt_ids, req.max_new_tokens, stop_ids, request_id, done)

    async def GetServerInfo(self, request, context):
        import peft
        import transformers

        return pb.ServerInfo(
            model=Path(self.cfg.model).name, dtype=self.cfg.dtype, tp=1, replicas=1,
            max_model_len=self.runner.peft.max_len, max_num_seqs=self.cfg.batch, vocab_size=self.runner.peft.vocab_size,
            version=f"peft-baseline (transformers {transformers.__version__}, peft {peft.__version__})")


def load_tokenizer(model_dir: str) -> Tokenizer | None:
    return Tokenizer(model_dir) if Tokenizer.exists(model_dir) else None


async def serve(cfg: PeftServerConfig) -> None:
    """Serves until SIGTERM or SIGINT; then stops accepting, cuts the running batch short, exits."""
    runner = await asyncio.to_thread(PeftRunner, cfg)
    tokenizer = await asyncio.to_thread(load_tokenizer, cfg.model)
    batches = BatchLoop(runner, cfg.batch)
    service = PeftService(cfg, runner, batches, tokenizer)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_LoraFleetServicer_to_server(service, server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if not port:
        raise OSError(f"cannot listen on {cfg.host}:{cfg.port}")
    await server.start()
    worker = asyncio.create_task(batches.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"event": "ready", "host": cfg.host, "port": port}), flush=True)
    try:
        await stop.wait()
    finally:
        service.draining = True
        runner.stopping.set()
        await server.stop(cfg.shutdown_grace)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        print(json.dumps({"event": "stopped", **runner.peft.stats}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--adapters", required=True, help="folder whose subfolders are PEFT adapters")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0 picks a free one)")
    p.add_argument("--batch", type=int, default=64, help="requests of one adapter in one generate call at most")
    p.add_argument("--max-loaded", type=int, default=4, help="adapters kept loaded at most")
    p.add_argument("--max-queue", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = PeftServerConfig(model=args.model, adapters=args.adapters, host=args.host, port=args.port,
                               batch=args.batch, max_loaded=args.max_loaded, max_queue=args.max_queue, dtype=args.dtype)
        asyncio.run(serve(cfg))
    except (ValueError, OSError) as e:
        print(f"peft_server: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
