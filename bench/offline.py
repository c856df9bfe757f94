"""Offline throughput: lorafleet against the S-LoRA paper's PEFT baseline.

The same requests (many adapters, mixed prompt and output lengths, greedy,
`ignore_eos` so every request generates exactly what it asked for) run through

1. lorafleet: every request at once through the engine that `lorafleet run` drives
   (continuous batching, adapters of all requests mixed in one batch);
2. Hugging Face PEFT, as S-LoRA's baseline: one base model, requests grouped by
   adapter; for each adapter in turn `load_adapter` + `set_adapter`, its requests in
   batches of `--peft-batch` (left padded, generated to the batch's longest output,
   only each request's own tokens counted), then `delete_adapter`;
3. lorafleet with the adapters left out (`adapter: null`): the ceiling.

Timing excludes each side's one-time base model load and includes adapter loading
(reading, packing, swapping), which is part of serving many adapters. A few requests
are also run through PEFT one at a time without padding; their greedy tokens must
equal lorafleet's, and the agreement is printed (it does not fail the run).

    python bench/offline.py                 # the demo model, 64 adapters, 128 requests
    python bench/offline.py --quick         # a smoke run, under a minute
    python bench/offline.py --model DIR --targets all --distribution power --json out.json
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from adapter_sets import TARGET_SETS, AdapterSet  # noqa: E402  (bench/ is this script's folder)
from machine import machine_busy_seconds  # noqa: E402
from peft_baseline import DTYPES, PeftAdapters, load_base  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "cache" / "smollm2-135m-instruct"
RANKS = (8, 16)


@dataclass(frozen=True)
class BenchConfig:
    model: str
    workdir: str
    adapters: int = 64
    requests: int = 128
    targets: str = "attn"
    distribution: str = "uniform"  # or "power": adapter i drawn with weight (i + 1) ** -alpha
    alpha: float = 1.0
    prompt_len: tuple[int, int] = (8, 128)
    output_len: tuple[int, int] = (8, 64)
    peft_batch: int = 8
    check: int = 4
    dtype: str = "float32"
    pool_bytes: str = "1GiB"
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    via: str = "inprocess"  # or "cli": time `lorafleet run` as a subprocess, model load included
    threads: int | None = None  # torch threads on both sides; None: torch's default
    seed: int = 0

    def __post_init__(self):
        if not (Path(self.model) / "config.json").is_file():
            raise SystemExit(f"--model {self.model}: no config.json there (run `make demo` for the default model)")
        for name in ("adapters", "requests", "peft_batch", "threads"):
            if (getattr(self, name) or 1) < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise SystemExit(f"--{name.replace('_', '-')} {lo}:{hi}: need 1 <= low <= high")


@dataclass
class Run:
    """One system's pass over the requests."""

    system: str
    requests: int
    tokens: int
    seconds: float
    cpu_seconds: float  # this process's (and its children's) CPU time: steadier than wall time on a busy machine
    others: float | None  # share of the machine's CPU that other processes used meanwhile
    swap_seconds: float | None = None  # PEFT: of `seconds`, the time spent loading, activating, deleting adapters
    outputs: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds


# ---------------------------------------------------------------- timing


def own_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    return sum(os.times()[:4])


class Stopwatch:
    """Wall and CPU time of a block, and how much of the machine other processes took meanwhile.

    Sharing 2 cores with anything else makes throughput meaningless; `others` says so.
    """

    def __enter__(self):
        self.busy, self.own, self.start = machine_busy_seconds(), own_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = own_seconds() - self.own
        busy = machine_busy_seconds()
        self.others = None
        if busy is not None and self.busy is not None:
            other = (busy - self.busy) - self.cpu_seconds
            self.others = max(0.0, other) / (self.seconds * (os.cpu_count() or 1))


# ---------------------------------------------------------------- workload


def adapter_set(cfg: BenchConfig) -> AdapterSet:
    return AdapterSet(cfg.model, TARGET_SETS[cfg.targets], RANKS, cfg.seed)


def make_requests(cfg: BenchConfig, vocab_size: int) -> list[dict]:
    """`lorafleet run` input lines: a seeded draw of adapters, prompts and output lengths."""
    rng = random.Random(cfg.seed + 1)
    names = [AdapterSet.name(i) for i in range(cfg.adapters)]
    if cfg.distribution == "power":
        weights = [(i + 1) ** -cfg.alpha for i in range(cfg.adapters)]
    else:
        weights = [1.0] * cfg.adapters
    chosen = rng.choices(names, weights=weights, k=cfg.requests)
    requests = []
    for i, name in enumerate(chosen):
        prompt = [rng.randrange(10, vocab_size) for _ in range(rng.randint(*cfg.prompt_len))]
        requests.append({
            "id": f"r{i:04d}", "adapter": name, "prompt_token_ids": prompt,
            "max_new_tokens": rng.randint(*cfg.output_len), "temperature": 0, "ignore_eos": True,
        })
    return requests


def without_adapters(requests: list[dict]) -> list[dict]:
    return [{**r, "id": f"base-{r['id']}", "adapter": None} for r in requests]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def requested_tokens(requests: list[dict]) -> int:
    return sum(r["max_new_tokens"] for r in requests)


# ---------------------------------------------------------------- lorafleet


def lorafleet_engine(cfg: BenchConfig, adapters: Path | None):
    from lorafleet.coordinator.cli import parse_bytes
    from lorafleet.coordinator.config import EngineConfig
    from lorafleet.coordinator.engine import Engine

    # no prefix cache: the timed runs send the same prompts again (after a warm-up, repeat after repeat),
    # which must be computed again, as the peers (PEFT, vLLM with enable_prefix_caching=False) compute them
    return Engine(EngineConfig(
        model_dir=cfg.model, adapters_dir=str(adapters) if adapters else None, dtype=cfg.dtype,
        pool_bytes=parse_bytes(cfg.pool_bytes), max_num_seqs=cfg.max_num_seqs,
        max_batched_tokens=cfg.max_batched_tokens, prefix_cache=False,
    ))


def check_results(system: str, requests: list[dict], results: list[dict]) -> dict[str, list[int]]:
    """Each request's generated tokens; stops the benchmark on an error or a short answer."""
    outputs = {}
    for req, res in zip(requests, results, strict=True):
        if "error" in res:
            raise SystemExit(f"{system}: request {req['id']} failed: {res['error']}")
        if len(res["token_ids"]) != req["max_new_tokens"]:
            raise SystemExit(f"{system}: request {req['id']} generated {len(res['token_ids'])} tokens, "
                             f"asked for {req['max_new_tokens']}")
        outputs[req["id"]] = res["token_ids"]
    return outputs


def run_lorafleet_inprocess(engine, system: str, requests: list[dict], profile: str | None) -> Run:
    """Times run_batch (what `lorafleet run` calls) on an engine whose model is loaded."""
    from lorafleet.coordinator.run import run_batch

    profiler = cProfile.Profile() if profile else None
    with Stopwatch() as watch:
        if profiler:
            profiler.enable()
        results = run_batch(engine, requests, progress=False)
        if profiler:
            profiler.disable()
    if profiler:
        profiler.dump_stats(profile)
    outputs = check_results(system, requests, results)
    return Run(system, len(requests), requested_tokens(requests), watch.seconds, watch.cpu_seconds, watch.others,
               outputs=outputs)


def run_lorafleet_cli(cfg: BenchConfig, adapters: Path | None, system: str, requests: list[dict]) -> Run:
    """Times `lorafleet run` as a user runs it: process start and model load included."""
    tag = "adapters" if adapters else "base"
    inp, out = Path(cfg.workdir) / f"cli-{tag}-requests.jsonl", Path(cfg.workdir) / f"cli-{tag}-results.jsonl"
    write_jsonl(inp, requests)
    cmd = [str(Path(sys.executable).parent / "lorafleet"), "run", "--model", cfg.model, "--input", str(inp),
           "--output", str(out), "--dtype", cfg.dtype, "--pool-bytes", cfg.pool_bytes,
           "--max-num-seqs", str(cfg.max_num_seqs), "--max-batched-tokens", str(cfg.max_batched_tokens), "--quiet",
           "--no-prefix-cache"]
    if adapters:
        cmd += ["--adapters", str(adapters)]
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)} if cfg.threads else None
    with Stopwatch() as watch:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    results = [json.loads(line) for line in out.read_text().splitlines()]
    outputs = check_results(system, requests, results)
    return Run(system, len(requests), requested_tokens(requests), watch.seconds, watch.cpu_seconds, watch.others,
               outputs=outputs)


def run_lorafleet(cfg: BenchConfig, adapters: Path, requests: list[dict], profile: str | None) -> list[Run]:
    """lorafleet with adapters, then the same requests without them."""
    base_requests = without_adapters(requests)
    if cfg.via == "cli":
        return [run_lorafleet_cli(cfg, adapters, "lorafleet", requests),
                run_lorafleet_cli(cfg, None, "lorafleet (no adapters)", base_requests)]
    from lorafleet.coordinator.run import run_batch

    engine = lorafleet_engine(cfg, adapters)
    try:
        run_batch(engine, [{**base_requests[0], "id": "warm-up", "max_new_tokens": 2}], progress=False)
        return [run_lorafleet_inprocess(engine, "lorafleet", requests, profile),
                run_lorafleet_inprocess(engine, "lorafleet (no adapters)", base_requests, None)]
    finally:
        engine.shutdown()


# ---------------------------------------------------------------- PEFT


def grouped_by_adapter(requests: list[dict]) -> dict[str, list[dict]]:
    """Requests per adapter, adapters in order of first arrival."""
    groups: dict[str, list[dict]] = {}
    for r in requests:
        groups.setdefault(r["adapter"], []).append(r)
    return groups


def peft_batches(requests: list[dict], size: int) -> list[list[dict]]:
    """Batches of similar output length, so the padding to the longest wastes little."""
    ordered = sorted(requests, key=lambda r: (r["max_new_tokens"], len(r["prompt_token_ids"])))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def peft_generate(peft: PeftAdapters, adapter: str | None, batch: list[dict]) -> list[list[int]]:
    return peft.generate(adapter, [r["prompt_token_ids"] for r in batch], [r["max_new_tokens"] for r in batch])


def run_peft(cfg: BenchConfig, peft: PeftAdapters, requests: list[dict]) -> Run:
    """Adapter by adapter in order of first arrival; each one's requests in batches of similar length."""
    outputs = {}
    swapped = peft.stats["swap_s"]
    with Stopwatch() as watch:
        for name, group in grouped_by_adapter(requests).items():
            for batch in peft_batches(group, cfg.peft_batch):
                for r, tokens in zip(batch, peft_generate(peft, name, batch)):
                    outputs[r["id"]] = tokens
    return Run("HF PEFT", len(requests), requested_tokens(requests), watch.seconds, watch.cpu_seconds, watch.others,
               peft.stats["swap_s"] - swapped, outputs)


def spot_check(peft: PeftAdapters, requests: list[dict], lorafleet: Run, count: int) -> dict:
    """PEFT one request at a time, no padding, against lorafleet's greedy tokens."""
    picked = requests[:count]
    agree = [peft_generate(peft, r["adapter"], [r])[0] == lorafleet.outputs[r["id"]] for r in picked]
    return {"requests": len(picked), "agree": sum(agree),
            "disagree_ids": [r["id"] for r, ok in zip(picked, agree) if not ok]}


def agreement(a: Run, b: Run) -> dict:
    """Requests whose tokens are equal, and the tokens equal before each request's first difference."""
    same, prefix, total = 0, 0, 0
    for rid, tokens in a.outputs.items():
        other = b.outputs[rid]
        same += tokens == other
        total += len(tokens)
        prefix += next((i for i, (x, y) in enumerate(zip(tokens, other)) if x != y), len(tokens))
    return {"requests": len(a.outputs), "agree": same, "tokens": total, "tokens_before_first_difference": prefix}


def run_peft_side(cfg: BenchConfig, adapters: Path, requests: list[dict], lorafleet: Run) -> tuple[Run, dict]:
    peft = PeftAdapters(load_base(cfg.model, cfg.dtype), adapters, max_loaded=1)
    peft_generate(peft, None, [{**requests[0], "max_new_tokens": 2}])  # warm-up
    run = run_peft(cfg, peft, requests)
    checks = {"batched": agreement(lorafleet, run), "unbatched": spot_check(peft, requests, lorafleet, cfg.check)}
    return run, checks


# ---------------------------------------------------------------- report


def table(runs: list[Run], peft: Run) -> list[dict]:
    return [{
        "system": r.system, "requests": r.requests, "generated_tokens": r.tokens, "seconds": round(r.seconds, 3),
        "cpu_seconds": round(r.cpu_seconds, 2),
        "tokens_per_s": round(r.tokens_per_s, 2), "requests_per_s": round(r.requests_per_s, 3),
        "vs_peft": round(r.tokens_per_s / peft.tokens_per_s, 2),
        "cpu_used_by_others": None if r.others is None else round(r.others, 3),
        "adapter_swap_seconds": None if r.swap_seconds is None else round(r.swap_seconds, 3),
    } for r in runs]


def others(row: dict) -> str:
    share = row["cpu_used_by_others"]
    return "n/a" if share is None else f"{share:.0%}"


def print_report(cfg: BenchConfig, rows: list[dict], checks: dict) -> None:
    print(f"model {cfg.model} ({cfg.dtype}), {cfg.adapters} adapters (ranks {'/'.join(map(str, RANKS))}, "
          f"targets {cfg.targets}), {cfg.requests} requests ({cfg.distribution}), prompts {cfg.prompt_len[0]}-"
          f"{cfg.prompt_len[1]}, outputs {cfg.output_len[0]}-{cfg.output_len[1]} tokens, PEFT batch {cfg.peft_batch}, "
          f"lorafleet {cfg.via}, {torch.get_num_threads()} threads")
    header = ("system", "requests", "gen tokens", "seconds", "CPU s", "tokens/s", "req/s", "vs PEFT",
              "CPU used by others")
    keys = ("system", "requests", "generated_tokens", "seconds", "cpu_seconds", "tokens_per_s", "requests_per_s",
            "vs_peft")
    cells = [header] + [tuple(str(row[k]) for k in keys) for row in rows]
    cells[1:] = [c[:7] + (c[7] + "x", others(row)) for c, row in zip(cells[1:], rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for n, line in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    for row in rows:
        if row["adapter_swap_seconds"] is not None:
            share = row["adapter_swap_seconds"] / row["seconds"]
            print(f"{row['system']}: {row['adapter_swap_seconds']} s of {row['seconds']} s ({share:.0%}) "
                  "in load_adapter + set_adapter + delete_adapter")
    b, u = checks["batched"], checks["unbatched"]
    print(f"greedy agreement, lorafleet vs PEFT one request at a time (no padding): {u['agree']}/{u['requests']} "
          f"requests identical" + (f"; differ: {', '.join(u['disagree_ids'])}" if u["disagree_ids"] else ""))
    print(f"greedy agreement, lorafleet vs the timed PEFT batches (left padded): {b['agree']}/{b['requests']} requests "
          f"identical, {b['tokens_before_first_difference']}/{b['tokens']} tokens before the first difference")
    if any((row["cpu_used_by_others"] or 0) > 0.1 for row in rows):
        print("warning: other processes used more than 10% of the CPU during a timed run; the figures are skewed")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
    from lorafleet.client.cli import token_range

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL), help="Hugging Face Llama-family folder (default: demo model)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "lorafleet-bench"),
                   help="where adapters (re-used) and request files go")
    p.add_argument("--adapters", type=int, default=64, help="number of adapters made and drawn from")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--targets", choices=sorted(TARGET_SETS), default="attn", help="q/k/v/o, or all seven projections")
    p.add_argument("--distribution", choices=["uniform", "power"], default="uniform",
                   help="how requests pick adapters; power: weight (i + 1) ** -alpha")
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent")
    p.add_argument("--prompt-len", type=token_range, default=(8, 128), help="LOW:HIGH prompt tokens, uniform")
    p.add_argument("--output-len", type=token_range, default=(8, 64), help="LOW:HIGH generated tokens, uniform")
    p.add_argument("--peft-batch", type=int, default=8, help="PEFT batch size within one adapter")
    p.add_argument("--check", type=int, default=4, help="requests re-run through PEFT unbatched and compared")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--pool-bytes", default="1GiB", help="lorafleet's page pool")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--via", choices=["inprocess", "cli"], default="inprocess",
                   help="inprocess: time the engine with its model loaded (like PEFT); "
                        "cli: time `lorafleet run` subprocesses end to end, model load included")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both sides (default: torch's own); 1 is steadier on a shared machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the table and the agreement counts here")
    p.add_argument("--profile", help="write cProfile stats of lorafleet's timed run (inprocess) here")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 adapters, 12 short requests")
    args = p.parse_args(argv)
    fields = dict(
        model=args.model, workdir=args.workdir, adapters=args.adapters, requests=args.requests, targets=args.targets,
        distribution=args.distribution, alpha=args.alpha, prompt_len=args.prompt_len, output_len=args.output_len,
        peft_batch=args.peft_batch, check=args.check, dtype=args.dtype, pool_bytes=args.pool_bytes,
        max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens, via=args.via,
        threads=args.threads, seed=args.seed,
    )
    if args.quick:
        fields.update(adapters=8, requests=12, prompt_len=(4, 16), output_len=(2, 8), check=3)
    return BenchConfig(**fields), args


def vocab_size(model: str) -> int:
    return json.loads((Path(model) / "config.json").read_text())["vocab_size"]


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    adapters = adapter_set(cfg).make(cfg.workdir, cfg.adapters)
    requests = make_requests(cfg, vocab_size(cfg.model))
    write_jsonl(Path(cfg.workdir) / "requests.jsonl", requests)
    print(f"lorafleet: {len(requests)} requests ...", file=sys.stderr)
    fleet, ceiling = run_lorafleet(cfg, adapters, requests, args.profile)
    gc.collect()
    print("HF PEFT: the same requests, grouped by adapter ...", file=sys.stderr)
    peft, checks = run_peft_side(cfg, adapters, requests, fleet)
    rows = table([fleet, ceiling, peft], peft)
    print_report(cfg, rows, checks)
    if args.json:
        report = {"config": asdict(cfg), "threads": torch.get_num_threads(), "results": rows, "agreement": checks}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.profile:
        pstats.Stats(args.profile).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
