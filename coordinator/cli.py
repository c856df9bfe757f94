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
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start an embedded one when --tp > 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max-lora-rank", type=int, default=256)
    p.add_argument("--pool-bytes", type=parse_bytes, default=parse_bytes("512MiB"),
                   help="unified page pool size per worker (KV cache + adapters), e.g. 2GiB")
    p.add_argument("--host-cache-bytes", type=parse_bytes, default=parse_bytes("2GiB"),
                   help="CPU memory for loaded adapters, least recently used out first")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one batch at most")
    p.add_argument("--max-batched-tokens", type=int, default=2048, help="tokens in one step at most")


def engine_config(args):
    from .config import EngineConfig

    return EngineConfig(
        model_dir=args.model, adapters_dir=args.adapters, dtype=args.dtype, device=args.device, tp=args.tp,
        pool_bytes=args.pool_bytes, host_cache_bytes=args.host_cache_bytes, max_lora_rank=args.max_lora_rank,
        max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens, ray_address=args.ray_address,
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


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(engine_config(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorafleet", description="Serve one base LLM with thousands of LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="offline batch: JSONL requests in, JSONL results out")
    add_engine_args(run)
    run.add_argument("--input", required=True, help="requests.jsonl")
    run.add_argument("--output", required=True, help="results.jsonl")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="answer a few prompts with each demo adapter")
    add_engine_args(demo)
    demo.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"lorafleet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
