"""The `lorafleet` subcommands that talk to a running server: generate, adapters, loadtest.

`add_client_commands(subparsers)` adds them to the main parser; each sets `func(args) -> exit
code`. A failed call prints `lorafleet <command>: error: <status>: <message>` and returns 1;
a bad option value prints `lorafleet <command>: error: <message>` and returns 2.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
from pathlib import Path

from .loadtest import LoadTestConfig, format_summary, run_loadtest
from .sdk import Client, LoraFleetError
from .workload import SyntheticWorkload, TraceWorkload, numbered_adapters

DEFAULT_TARGET = "127.0.0.1:50051"


def add_client_commands(subparsers) -> None:
    """Adds `generate`, `adapters list|load|unload` and `loadtest` to an argparse subparsers object."""
    _add_generate(subparsers)
    _add_adapters(subparsers)
    _add_loadtest(subparsers)


def _reports_errors(command: str):
    """Turns LoraFleetError into exit code 1 and ValueError / OSError into exit code 2, with a message."""
    def wrap(func):
        @functools.wraps(func)
        def run(args) -> int:
            try:
                return func(args)
            except LoraFleetError as e:
                print(f"lorafleet {command}: error: {e.code.name}: {e.message}", file=sys.stderr)
                return 1
            except (ValueError, OSError) as e:
                print(f"lorafleet {command}: error: {e}", file=sys.stderr)
                return 2
        return run
    return wrap


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, metavar="HOST:PORT",
                   help=f"server HOST:PORT (default {DEFAULT_TARGET})")
    p.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="PEM file of the CA that signed the server's certificate (TLS)")


def _add_admin_args(p: argparse.ArgumentParser) -> None:
    _add_connection_args(p)
    p.add_argument("--admin-token-file", default=None, metavar="FILE",
                   help="file holding the server's admin bearer token")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of the call in seconds (default 60)")


def _admin_client(args) -> Client:
    token = Path(args.admin_token_file).read_text().strip() if args.admin_token_file else None
    return Client(args.target, tls_ca=args.tls_ca, admin_token=token, timeout=args.timeout)


# ---- generate -------------------------------------------------------------------------------

def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream one generation from a server to the terminal")
    _add_connection_args(p)
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--adapter", default=None, help="adapter name (default: the base model)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message first")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=None, help="deadline of the request in seconds")
    p.set_defaults(func=_reports_errors("generate")(cmd_generate))


def _prompt_kwargs(args) -> dict:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not args.chat:
        return {"prompt": text}
    system = [{"role": "system", "content": args.system}] if args.system else []
    return {"messages": system + [{"role": "user", "content": text}]}


def cmd_generate(args) -> int:
    """Prints the text as it arrives, then one line of usage on stderr."""
    completion_tokens, finish, prompt_tokens = 0, "", None
    with Client(args.target, tls_ca=args.tls_ca, timeout=args.timeout) as client:
        stream = client.generate(
            adapter=args.adapter, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
            **_prompt_kwargs(args),
        )
        for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            completion_tokens += len(chunk.token_ids)
            finish = chunk.finish_reason or finish
            prompt_tokens = chunk.usage.prompt_tokens if chunk.usage else prompt_tokens
    sys.stdout.write("\n")
    print(f"[{finish or '?'}: {prompt_tokens if prompt_tokens is not None else '?'} prompt tokens, "
          f"{completion_tokens} generated]", file=sys.stderr)
    return 0


# ---- adapters -------------------------------------------------------------------------------

def _add_adapters(subparsers) -> None:
    p = subparsers.add_parser("adapters", help="list, load or unload a server's adapters")
    actions = p.add_subparsers(dest="adapters_action", required=True)
    listing = actions.add_parser("list", help="the adapters the server knows and where each resides")
    _add_admin_args(listing)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_reports_errors("adapters list")(cmd_adapters_list))
    load = actions.add_parser("load", help="register an adapter folder under a name")
    _add_admin_args(load)
    load.add_argument("name")
    load.add_argument("--path", default="", help="folder relative to the server's adapters root (default: NAME)")
    load.set_defaults(func=_reports_errors("adapters load")(cmd_adapters_load))
    unload = actions.add_parser("unload", help="remove an adapter (running requests finish first)")
    _add_admin_args(unload)
    unload.add_argument("name")
    unload.set_defaults(func=_reports_errors("adapters unload")(cmd_adapters_unload))


def cmd_adapters_list(args) -> int:
    with _admin_client(args) as client:
        adapters = client.list_adapters()
    if args.json:
        print(json.dumps([a.__dict__ for a in adapters], indent=2))
        return 0
    print(f"{'name':<24}{'rank':>6}  {'residence':<12}{'requests':>10}{'pages':>8}  {'replicas':<10}targets")
    for a in adapters:
        replicas = ",".join(map(str, a.replicas)) or "-"
        print(f"{a.name:<24}{a.rank:>6}  {a.residence:<12}{a.requests:>10}{a.pool_pages:>8}  {replicas:<10}"
              f"{','.join(a.targets)}")
    return 0


def cmd_adapters_load(args) -> int:
    with _admin_client(args) as client:
        a = client.load_adapter(args.name, args.path)
    print(f"loaded {a.name}: rank {a.rank}, targets {','.join(a.targets)}, {a.residence}")
    return 0


def cmd_adapters_unload(args) -> int:
    with _admin_client(args) as client:
        drained = client.unload_adapter(args.name)
    print(f"unloaded {args.name} ({drained} running requests finished first)")
    return 0


# ---- loadtest -------------------------------------------------------------------------------

def token_range(text: str) -> tuple[int, int]:
    """'8:512' -> (8, 512), inclusive token counts; an argparse type (the benchmarks use it too)."""
    try:
        lo, hi = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range; write LO:HI, e.g. 8:512") from None
    return lo, hi


def _add_loadtest(subparsers) -> None:
    p = subparsers.add_parser("loadtest", help="drive a server open-loop with the S-LoRA workload or a trace")
    _add_connection_args(p)
    p.add_argument("--requests", type=int, default=100, metavar="N", help="send at most this many requests")
    p.add_argument("--duration", type=float, default=60.0, metavar="SECONDS",
                   help="seconds; later arrivals are not sent and running requests are cancelled")
    p.add_argument("--slo-ttft", type=float, default=6.0, metavar="SECONDS",
                   help="SLO on the time to first token, seconds")
    p.add_argument("--json", default=None, metavar="FILE", help="write the full result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    w = p.add_argument_group("synthetic workload (S-LoRA)")
    names = w.add_mutually_exclusive_group()
    names.add_argument("--adapters", default=None, metavar="A,B,...",
                       help="comma-separated adapter names, most popular first")
    names.add_argument("--num-adapters", type=int, default=None, metavar="N",
                       help="N adapters named by --adapter-format (0: the base model only)")
    names.add_argument("--adapters-from-server", action="store_true",
                       help="the adapters the server lists (the first --max-adapters of them)")
    w.add_argument("--adapter-format", default="adapter-{i:03d}", metavar="FORMAT",
                   help="name of adapter i (default adapter-{i:03d})")
    w.add_argument("--max-adapters", type=int, default=None, metavar="N", help="with --adapters-from-server: at most N")
    w.add_argument("--alpha", type=float, default=1.0, help="popularity exponent in (0, 1]; 1 is uniform")
    w.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second")
    w.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the arrival gaps")
    w.add_argument("--input-range", type=token_range, default=(8, 512), metavar="LO:HI",
                   help="prompt tokens LO:HI (inclusive)")
    w.add_argument("--output-range", type=token_range, default=(8, 512), metavar="LO:HI",
                   help="output tokens LO:HI (inclusive)")
    w.add_argument("--min-token-id", type=int, default=0, metavar="ID", help="random prompt token ids start here")
    w.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="random prompt token ids stay below this (default: the server's vocab_size)")
    w.add_argument("--no-ignore-eos", action="store_true", help="let the model stop at its end-of-sequence token")
    w.add_argument("--seed", type=int, default=0, help="the same seed gives the same requests")
    t = p.add_argument_group("trace replay (instead of the synthetic workload)")
    t.add_argument("--trace", default=None, metavar="FILE.jsonl",
                   help="lines with timestamp, adapter, prompt or prompt_tokens, output_tokens")
    t.add_argument("--speedup", type=float, default=1.0, help="replay the trace this many times faster")
    t.add_argument("--trace-max-new-tokens", type=int, default=128, metavar="N", help="for lines without output_tokens")
    p.set_defaults(func=_reports_errors("loadtest")(cmd_loadtest))


def _adapter_names(args) -> tuple[str, ...]:
    if args.adapters is not None:
        return tuple(name.strip() for name in args.adapters.split(",") if name.strip())
    if args.num_adapters is not None:
        if args.num_adapters < 0:
            raise ValueError(f"--num-adapters must be >= 0, got {args.num_adapters}")
        return numbered_adapters(args.num_adapters, args.adapter_format)
    if args.adapters_from_server:
        with Client(args.target, tls_ca=args.tls_ca, timeout=30.0) as client:
            names = sorted(a.name for a in client.list_adapters())
        return tuple(names[: args.max_adapters])
    return ()


def _workload(args) -> SyntheticWorkload | TraceWorkload:
    ignore_eos = not args.no_ignore_eos
    if args.trace:
        return TraceWorkload(args.trace, speedup=args.speedup, max_new_tokens=args.trace_max_new_tokens,
                             min_token_id=args.min_token_id, ignore_eos=ignore_eos, seed=args.seed)
    return SyntheticWorkload(
        adapters=_adapter_names(args), alpha=args.alpha, rate=args.rate, cv=args.cv,
        input_range=args.input_range, output_range=args.output_range, min_token_id=args.min_token_id,
        ignore_eos=ignore_eos, seed=args.seed,
    )


def cmd_loadtest(args) -> int:
    """Runs the load test, prints the summary table, writes --json; 0 even when requests failed."""
    config = LoadTestConfig(
        target=args.target, workload=_workload(args), requests=args.requests, duration=args.duration,
        slo_ttft=args.slo_ttft, vocab_size=args.vocab_size, tls_ca=args.tls_ca, progress=not args.no_progress,
    )
    report = asyncio.run(run_loadtest(config))
    print(format_summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"full result: {args.json}", file=sys.stderr)
    return 0
