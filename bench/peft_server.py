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
import time
import uuid
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402
import torch  # noqa: E402

from lorafleet.v1 import lorafleet_pb2 as pb  # noqa: E402
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("peft_server")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_NEW_TOKENS = 16  # as lorafleet


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


class _StopWhen:
    """A generate stopping criterion: every row stops once `should_stop()` is true."""

    def __init__(self, should_stop):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool)


class PeftRunner:
    """The base model and the PEFT adapters loaded into it; `run` generates one batch."""

    def __init__(self, cfg: PeftServerConfig):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        self.cfg = cfg
        self.base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=DTYPES[cfg.dtype]).eval()
        self.model = None  # the PeftModel, once the first adapter is loaded
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.stopping = threading.Event()
        config = self.base.config
        self.vocab_size = config.vocab_size
        self.max_len = config.max_position_embeddings
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        eos = self.base.generation_config.eos_token_id
        self.eos_ids = frozenset(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        self.stats = {"batches": 0, "requests": 0, "adapter_loads": 0, "swap_s": 0.0, "generate_s": 0.0}

    def activate(self, name: str) -> None:
        """load_adapter (when not loaded) + set_adapter; deletes the least recently used beyond max_loaded."""
        from peft import PeftModel

        path = str(Path(self.cfg.adapters) / name)
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
            self.stats["adapter_loads"] += 1
        elif name not in self.loaded:
            self.model.load_adapter(path, adapter_name=name)
            self.stats["adapter_loads"] += 1
        self.model.set_adapter(name)
        self.loaded[name] = None
        self.loaded.move_to_end(name)
        while len(self.loaded) > self.cfg.max_loaded:
            old = next(iter(self.loaded))
            self.model.delete_adapter(old)
            del self.loaded[old]

    def run(self, adapter: str | None, batch: list[Pending]) -> list[list[int]]:
        """Greedy tokens of each request (its own max_new_tokens), the batch generated together."""
        started = time.perf_counter()
        if adapter is not None:
            self.activate(adapter)
        activated = time.perf_counter()
        outputs = self._generate_with(adapter, batch)
        self.stats["swap_s"] += activated - started
        self.stats["generate_s"] += time.perf_counter() - activated
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        return outputs

    def _generate_with(self, adapter: str | None, batch: list[Pending]) -> list[list[int]]:
        if adapter is not None:
            return self._generate(self.model, batch)
        if self.model is None:
            return self._generate(self.base, batch)
        with self.model.disable_adapter():
            return self._generate(self.model, batch)

    def _generate(self, model, batch: list[Pending]) -> list[list[int]]:
        width = max(len(p.prompt_ids) for p in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p.prompt_ids):] = torch.tensor(p.prompt_ids)
            mask[row, width - len(p.prompt_ids):] = 1
        steps = max(p.max_new_tokens for p in batch)
        stop = _StopWhen(lambda: self.stopping.is_set() or all(p.cancelled for p in batch))
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                 eos_token_id=None, pad_token_id=self.pad_id,  # None: eos does not stop a row
                                 stopping_criteria=[stop])
        return [out[row, width:width + p.max_new_tokens].tolist() for row, p in enumerate(batch)]


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
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if self.draining:
            raise BadRequest(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if len(self.loop.waiting) >= self.cfg.max_queue:
            raise BadRequest(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the queue is full ({self.cfg.max_queue}); retry later")
        adapter = r.adapter_id or None
        if adapter is not None and not self._adapter_exists(adapter):
            raise BadRequest(grpc.StatusCode.NOT_FOUND, f"adapter {adapter!r}: no such folder with adapter_config.json "
                                                        f"in {self.cfg.adapters}")
        if r.temperature != 0 or r.stop:
            raise BadRequest(invalid, "the PEFT baseline decodes greedily only (temperature 0, no stop strings)")
        prompt_ids = self._prompt_ids(r)
        if not prompt_ids:
            raise BadRequest(invalid, "the prompt is empty")
        if any(not 0 <= t < self.runner.vocab_size for t in list(prompt_ids) + list(r.stop_token_ids)):
            raise BadRequest(invalid, f"token ids must lie in [0, {self.runner.vocab_size})")
        max_new = r.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if len(prompt_ids) + max_new > self.runner.max_len:
            raise BadRequest(invalid, f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new}) exceeds the model's "
                                      f"context of {self.runner.max_len} tokens")
        stop_ids = frozenset(r.stop_token_ids) | (frozenset() if r.ignore_eos else self.runner.eos_ids)
        done = asyncio.get_running_loop().create_future()
        return Pending(adapter, prompt_ids, max_new, stop_ids, request_id, done)

    def _adapter_exists(self, name: str) -> bool:
        if "/" in name or "\\" in name or name in (".", ".."):
            return False
        return (Path(self.cfg.adapters) / name / "adapter_config.json").is_file()

    def _prompt_ids(self, r: pb.GenerateRequest) -> list[int]:
        given = [f for f, present in (("prompt", bool(r.prompt)), ("prompt_token_ids", len(r.prompt_token_ids) > 0),
                                      ("messages", len(r.messages) > 0)) if present]
        if len(given) != 1:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "give exactly one of prompt, prompt_token_ids or messages")
        if given[0] == "prompt_token_ids":
            return list(r.prompt_token_ids)
        if self.tokenizer is None:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "text prompts need a tokenizer in the model folder")
        if given[0] == "prompt":
            return self.tokenizer.encode(r.prompt)
        chat = [{"role": m.role, "content": m.content} for m in r.messages]
        return list(self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))

    async def GetServerInfo(self, request, context):
        import peft
        import transformers

        return pb.ServerInfo(
            model=Path(self.cfg.model).name, dtype=self.cfg.dtype, tp=1, replicas=1,
            max_model_len=self.runner.max_len, max_num_seqs=self.cfg.batch, vocab_size=self.runner.vocab_size,
            version=f"peft-baseline (transformers {transformers.__version__}, peft {peft.__version__})")


def load_tokenizer(model_dir: str):
    if not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


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
        print(json.dumps({"event": "stopped", **runner.stats}), flush=True)


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
