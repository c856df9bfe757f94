"""The `lorafleet` command."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'512MiB', '2G', '1048576' -> bytes (K/M/G/T are powers of 1024)."""
    m = SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 512MiB, 2GiB or a number of bytes")
    return int(float(m[1]) * 1024 ** " KMGT".index(m[2].upper() or " "))


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--adapters", default=None, help="folder whose subfolders are PEFT LoRA adapters")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (default): bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, float32 on other CPUs")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start an embedded one when --tp > 1)")
    p.add_argument("--placement-strategy", default="PACK", type=str.upper,
                   choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                   help="how Ray places each replica's tp workers (default PACK: as few nodes as possible, since the "
                        "ranks all-reduce every layer; SPREAD: one node each where it can)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max-lora-rank", type=int, default=256)
    p.add_argument("--pool-bytes", type=parse_bytes, default=parse_bytes("512MiB"),
                   help="unified page pool size per worker (KV cache + adapters), e.g. 2GiB")
    p.add_argument("--pool-fraction", type=float, default=None,
                   help="on CUDA: size the pool as this fraction of free device memory instead of --pool-bytes")
    p.add_argument("--host-cache-bytes", type=parse_bytes, default=parse_bytes("2GiB"),
                   help="CPU memory for loaded adapters, least recently used out first")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one batch at most")
    p.add_argument("--max-batched-tokens", type=int, default=2048, help="tokens in one step at most; longer prompts are prefilled in chunks")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="recompute every prompt instead of reusing the KV of prefixes cached per adapter")
    p.add_argument("--adapter-affinity", type=int, default=0, metavar="STEPS",
                   help="admit queued requests whose adapter is already in the batch before older ones whose adapter "
                        "is not, passing a request over in at most STEPS steps (0: first come, first served)")
    p.add_argument("--step-timeout", type=float, default=60.0,
                   help="seconds one step may take; past it the replica is declared failed (and rebuilt by serve)")


def engine_config(args):
    from .config import EngineConfig

    return EngineConfig(
        model_dir=args.model, adapters_dir=args.adapters, dtype=args.dtype, device=args.device, tp=args.tp,
        pool_bytes=None if args.pool_fraction is not None else args.pool_bytes,
        pool_fraction=args.pool_fraction or 0.9, host_cache_bytes=args.host_cache_bytes, max_lora_rank=args.max_lora_rank,
        max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens, ray_address=args.ray_address,
        placement_strategy=args.placement_strategy, step_timeout=args.step_timeout,
        max_queue=getattr(args, "max_queue", None), prefix_cache=args.prefix_cache,
        adapter_affinity=args.adapter_affinity,
    )


def cmd_run(args) -> int:
    from .engine import Engine
    from .run import read_jsonl, run_batch

    objs = read_jsonl(args.input)
    engine = Engine(engine_config(args))
    try:
        results = run_batch(engine, objs, progress=not args.quiet)
    finally:
        engine.shutdown()
    with open(args.output, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    errors = sum(1 for r in results if "error" in r)
    print(f"lorafleet run: {len(results)} requests, {errors} errors -> {args.output}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    import asyncio

    from .server import ServerConfig, serve

    cfg = ServerConfig(
        engine=engine_config(args), replicas=args.replicas, host=args.host, port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port, admin_token_file=args.admin_token_file,
        tls_cert=args.tls_cert, tls_key=args.tls_key, shutdown_grace=args.shutdown_grace, max_restarts=args.max_restarts,
        http_port=None if args.http_port < 0 else args.http_port, api_key=api_key(args),
        served_model_name=args.served_model_name,
    )

    def announce(line: str) -> None:
        print(line, flush=True)
        info = json.loads(line)
        print(f"lorafleet: serving {args.model} on {info['host']}:{info['port']}"
              + (f", metrics on http://{info['host']}:{info['metrics_port']}/metrics" if info["metrics_port"] else ""), file=sys.stderr)
        me = own_command()
        print(f"  try: {me} generate --target {info['host']}:{info['port']} --chat \"What is the capital of France?\"", file=sys.stderr)
        print(f"       {me} adapters list --target {info['host']}:{info['port']}", file=sys.stderr)
        if info.get("http_port"):
            print(f"lorafleet: OpenAI-compatible API on http://{info['host']}:{info['http_port']}/v1", file=sys.stderr)
            print(f"  try: curl http://{info['host']}:{info['http_port']}/v1/models", file=sys.stderr)

    asyncio.run(serve(cfg, announce, **({"page_plan": args.page_plan} if args.page_plan else {})))
    return 0


def api_key(args) -> str | None:
    """--api-key, or the first line of --api-key-file (which keeps it out of the process list)."""
    if args.api_key_file is None:
        return args.api_key or None
    from pathlib import Path

    key = Path(args.api_key_file).read_text().strip()
    if not key:
        raise ValueError(f"{args.api_key_file} is empty; put the API key in it")
    return key


def own_command() -> str:
    """This `lorafleet` as a user would type it here: `.venv/bin/lorafleet` in a checkout (as the README
    writes it), `lorafleet` where that is the one on PATH (the image)."""
    import os
    import shutil

    invoked = os.path.abspath(sys.argv[0])
    on_path = shutil.which("lorafleet")
    if on_path and os.path.abspath(on_path) == invoked:
        return "lorafleet"
    relative = os.path.relpath(invoked)
    return relative if not relative.startswith("..") else invoked


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(engine_config(args))


def cmd_finetune(args) -> int:
    from ..finetune.cli import run  # torch, transformers and peft load only when training starts

    return run(args)


def main(argv: list[str] | None = None, page_plan=None) -> int:
    """page_plan: the page accounting `serve` builds (bench/ablations.py injects its variants)."""
    parser = argparse.ArgumentParser(prog="lorafleet", description="Serve one base LLM with thousands of LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="offline batch: JSONL requests in, JSONL results out")
    add_engine_args(run)
    run.add_argument("--input", required=True, help="requests.jsonl")
    run.add_argument("--output", required=True, help="results.jsonl")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    srv = sub.add_parser("serve", help="serve the gRPC API (and the OpenAI-compatible HTTP API with --http-port)")
    add_engine_args(srv)
    srv.add_argument("--replicas", type=int, default=1, help="tensor-parallel groups to route between")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=50051, help="gRPC port (0 picks a free one)")
    srv.add_argument("--metrics-port", type=int, default=9400, help="Prometheus port (0 picks a free one, -1 turns it off)")
    srv.add_argument("--http-port", type=int, default=-1,
                     help="port of the OpenAI-compatible HTTP API (0 picks a free one; default -1: off; `make serve` uses 8000)")
    key = srv.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, help="every /v1 HTTP call must send 'Authorization: Bearer KEY'")
    key.add_argument("--api-key-file", default=None, help="as --api-key, the key read from this file")
    srv.add_argument("--served-model-name", default=None,
                     help="the base model's id in the HTTP API (`model`); default: the model folder's name")
    srv.add_argument("--admin-token-file", default=None, help="file holding the bearer token admin calls must send")
    srv.add_argument("--tls-cert", default=None)
    srv.add_argument("--tls-key", default=None)
    srv.add_argument("--shutdown-grace", type=float, default=10.0,
                     help="on SIGTERM: seconds running requests get to finish; the rest end with UNAVAILABLE")
    srv.add_argument("--max-queue", type=int, default=None,
                     help="requests waiting at most before RESOURCE_EXHAUSTED (default: sized from the pools)")
    srv.add_argument("--max-restarts", type=int, default=5,
                     help="times a failed replica is rebuilt (after 1, 2, 4 ... 30 s) before it stays down")
    srv.set_defaults(func=cmd_serve)

    from ..client.cli import add_client_commands  # generate, adapters, loadtest: they talk to a server

    add_client_commands(sub)

    demo = sub.add_parser("demo", help="answer a few prompts with each demo adapter")
    add_engine_args(demo)
    demo.set_defaults(func=cmd_demo)

    from ..finetune.cli import add_finetune_args  # argparse only

    ft = sub.add_parser("finetune", help="train a LoRA or sparse-LoRA adapter on a JSONL file (needs lorafleet[train])")
    add_finetune_args(ft)
    ft.set_defaults(func=cmd_finetune)

    args = parser.parse_args(argv)
    args.page_plan = page_plan
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"lorafleet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
