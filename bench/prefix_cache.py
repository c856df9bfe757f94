"""Prefix cache and chunked prefill benchmark (issue 14), over gRPC, each side in the same run.

Every phase is a fresh `lorafleet serve` child process on 127.0.0.1 (an ephemeral port), driven by
lorafleet's open-loop load generator (`client/loadtest.py`) from this process, as bench/serving.py
does. The two sides of each comparison alternate (on, off, on, off, ...) over `--repeats`; the
tables give the median over the repeats of each figure and the ratio of the medians.

| part | systems | the same requests to both |
|---|---|---|
| cache | `lorafleet serve` (prefix cache on) vs `lorafleet serve --no-prefix-cache` | shared system prompts |
| chunked | `--max-batched-tokens 256` vs `--max-batched-tokens 4096` (each long prompt in one step) | long prompts among decoding streams |

**cache**: `--tenants` (32) tenants, tenant i with adapter i (bench/adapter_sets.py's recipe, the
adapters of bench/serving.py) and its own system prompt of `--system-len` (1000) random token ids.
A request is one tenant's system prompt and a user turn of `--user-range` (16-64) random token ids,
`--output-range` (16-32) output tokens, greedy, ignore_eos; tenants drawn uniformly, arrivals a Gamma
process at `--rate` per second (cv 1). Before the clock each tenant's system prompt is sent once
(with a user turn of its own, one output token), to both systems: the timed part is the steady state
of a server whose tenants have been seen (the cache warm when on, every adapter in the pool for both).
Timed: one load test of `--duration` seconds (TTFT p50/p99, output tokens/s); when the server
exports `lorafleet_prefix_cache_hit_tokens_total` and `..._queried_tokens_total`, the hit rate of
the timed part (the counters' growth over it, all adapters).

**chunked**: `--streams` (8) base-model requests with 32-token prompts and `--stream-output` (128)
output tokens start at once; from 1 s on, `--long-prompts` (3) requests with prompts of
`--long-range` (2000-3000) random token ids and 8 output tokens arrive `--long-every` (15) s apart
(about the time one of them takes to prefill here, so that they seldom wait for each other).
Timed: every gap between two consecutive tokens of the streams (from the streamed responses), pooled
over the streams: its p50, p99 and max are the time per output token of running streams while
long prompts arrive; also the long prompts' TTFT and the time until the last request ended.

Each phase also records the server's CPU seconds and the share of the machine's CPU that other
processes used (bench/machine.py): on a shared 2-core machine that share is the noise.

    .venv/bin/python bench/prefix_cache.py --model cache/smollm2-135m-instruct   # make bench-prefix
    .venv/bin/python bench/prefix_cache.py --quick                               # smoke run, < 3 min
    .venv/bin/python bench/prefix_cache.py --parts chunked --repeats 5

Writes `--out` (bench/results/prefix_cache/): results.md (the tables) and results.json
(configuration, per phase the server command, CPU accounting and the full load-test report).
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from serving import (REPO, ChildServer, CpuWatch, adapter_set, load_average, log, md_table, serve_cmd,  # bench/
                     stop_on_sigterm, to_json, versions, warm_up, with_request_columns)

from lorafleet.client.loadtest import LoadTestConfig, latency_stats, run_loadtest
from lorafleet.client.workload import WorkloadRequest, gamma_arrivals, sample_adapter_indices

CACHE_ON, CACHE_OFF = "prefix cache on", "prefix cache off"
CHUNKED, UNCHUNKED = "chunked", "unchunked"
PARTS = {"cache": (CACHE_ON, CACHE_OFF), "chunked": (CHUNKED, UNCHUNKED)}  # each part's (system, baseline)
NO_CACHE_FLAG = "--no-prefix-cache"
HIT, QUERIED = "lorafleet_prefix_cache_hit_tokens", "lorafleet_prefix_cache_queried_tokens"  # counters (_total)
METRICS_LAG_S = 1.0  # lorafleet serve copies the replica's counts into its metrics every 0.5 s
QUICK = {"repeats": 1, "tenants": 8, "system_len": 500, "rate": 2.0, "duration": 15.0, "streams": 4,
         "stream_output": 48, "long_prompts": 2, "long_range": (1000, 1500), "long_every": 5.0}


# ---------------------------------------------------------------- workloads


def _rngs(seed: int, names: tuple[str, ...]) -> dict[str, np.random.Generator]:
    """One independent generator per name, so that changing one draw leaves the others as they were."""
    return dict(zip(names, map(np.random.default_rng, np.random.SeedSequence(seed).spawn(len(names)))))


@dataclass(frozen=True)
class SharedPrefixWorkload:
    """Tenant i: adapter `tenants[i]` and its own system prompt of `system_len` random token ids.

    A request: a uniformly drawn tenant's system prompt followed by a user turn of random length in
    `user_range` (random token ids), `output_range` tokens out, ignore_eos; arrivals a Gamma process
    (`rate` per second, coefficient of variation `cv`). A load generator workload (`generate`).
    """

    tenants: tuple[str, ...]
    system_len: int = 1000
    user_range: tuple[int, int] = (16, 64)
    output_range: tuple[int, int] = (16, 32)
    rate: float = 1.0
    cv: float = 1.0
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "tenants", tuple(self.tenants))
        if not self.tenants or self.system_len < 1 or not self.rate > 0 or self.cv < 0:
            raise ValueError("need tenants, system_len >= 1, rate > 0 and cv >= 0")
        for lo, hi in (self.user_range, self.output_range):
            if not 1 <= lo <= hi:
                raise ValueError(f"range {lo}:{hi}: need 1 <= low <= high")

    def system_prompts(self, vocab_size: int) -> list[tuple[int, ...]]:
        rng = _rngs(self.seed, ("system",))["system"]
        return [tuple(rng.integers(0, vocab_size, self.system_len).tolist()) for _ in self.tenants]

    def generate(self, count: int, vocab_size: int) -> list[WorkloadRequest]:
        r = _rngs(self.seed + 1, ("tenants", "arrivals", "user_lengths", "output_lengths", "user_tokens"))
        systems = self.system_prompts(vocab_size)
        tenants = sample_adapter_indices(r["tenants"], len(self.tenants), 1.0, count)
        arrivals = gamma_arrivals(r["arrivals"], self.rate, self.cv, count)
        users = r["user_lengths"].integers(self.user_range[0], self.user_range[1] + 1, count)
        outputs = r["output_lengths"].integers(self.output_range[0], self.output_range[1] + 1, count)
        return [WorkloadRequest(float(arrivals[k]), self.tenants[t], None,
                                systems[t] + tuple(r["user_tokens"].integers(0, vocab_size, users[k]).tolist()),
                                int(outputs[k]), True)
                for k, t in enumerate(tenants.tolist())]

    def priming(self, vocab_size: int) -> list[WorkloadRequest]:
        """One request per tenant, before the clock: its system prompt and a user turn of its own, one token out."""
        rng = _rngs(self.seed + 2, ("user_tokens",))["user_tokens"]
        return [WorkloadRequest(0.0, name, None, system + tuple(rng.integers(0, vocab_size, self.user_range[0]).tolist()),
                                1, True)
                for name, system in zip(self.tenants, self.system_prompts(vocab_size))]


@dataclass(frozen=True)
class LongPromptsWorkload:
    """`streams` base-model requests (`stream_prompt` tokens in, `stream_output` out) 50 ms apart from 0 s,
    then `long_prompts` requests of `long_range` prompt tokens and `long_output` out, the first at
    `first_long_at` s and then every `long_every` s. Random token ids, ignore_eos; the streams come
    first in the schedule (indices 0 .. streams-1). A load generator workload (`generate`)."""

    streams: int = 8
    stream_prompt: int = 32
    stream_output: int = 128
    long_prompts: int = 3
    long_range: tuple[int, int] = (2000, 3000)
    long_output: int = 8
    first_long_at: float = 1.0
    long_every: float = 15.0
    seed: int = 0

    def __post_init__(self):
        if min(self.streams, self.stream_prompt, self.long_output) < 1 or self.stream_output < 2:
            raise ValueError("need streams, prompts and outputs >= 1 (stream outputs >= 2)")
        if self.long_prompts < 0 or not 1 <= self.long_range[0] <= self.long_range[1]:
            raise ValueError(f"long prompts {self.long_prompts} of {self.long_range}: need >= 0, 1 <= low <= high")
        if self.first_long_at < 0.05 * self.streams or self.long_every < 0:
            raise ValueError("the long prompts come after the last stream has been sent, in order")

    @property
    def count(self) -> int:
        return self.streams + self.long_prompts

    def generate(self, count: int, vocab_size: int) -> list[WorkloadRequest]:
        r = _rngs(self.seed + 3, ("lengths", "tokens"))
        longs = r["lengths"].integers(self.long_range[0], self.long_range[1] + 1, self.long_prompts).tolist()
        prompt = lambda n: tuple(r["tokens"].integers(0, vocab_size, n).tolist())  # noqa: E731
        requests = [WorkloadRequest(0.05 * k, None, None, prompt(self.stream_prompt), self.stream_output, True)
                    for k in range(self.streams)]
        requests += [WorkloadRequest(self.first_long_at + k * self.long_every, None, None, prompt(n), self.long_output,
                                     True) for k, n in enumerate(longs)]
        return requests[:count]


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    """One run. Times in seconds, lengths in tokens."""

    model: str
    workdir: str
    out: str
    parts: tuple[str, ...] = ("cache", "chunked")
    repeats: int = 3
    dtype: str = "auto"
    threads: int = 1  # torch threads of each server (bench/serving.py's reasons)
    pool_bytes: str = "2GiB"  # 32 cached system prompts of 1000 tokens need 32,000 KV pages
    max_num_seqs: int = 64
    start_timeout: float = 240.0
    seed: int = 0
    # cache
    tenants: int = 32
    system_len: int = 1000
    user_range: tuple[int, int] = (16, 64)
    output_range: tuple[int, int] = (16, 32)
    rate: float = 1.0
    duration: float = 60.0
    # chunked
    streams: int = 8
    stream_output: int = 128
    long_prompts: int = 3
    long_range: tuple[int, int] = (2000, 3000)
    long_every: float = 15.0  # a 2500-token prompt in one step took 10.4 s here (bfloat16, one thread, idle machine)
    chunk_tokens: int = 256  # --max-batched-tokens of the chunked side
    unchunked_tokens: int = 4096  # --max-batched-tokens of the other: at least the longest prompt and the streams

    def __post_init__(self):
        if not (Path(self.model) / "config.json").is_file():
            raise SystemExit(f"--model {self.model}: no config.json there (`make demo` prepares the default model)")
        if not self.parts or set(self.parts) - set(PARTS):
            raise SystemExit(f"--parts: one or both of {', '.join(PARTS)}")
        if min(self.repeats, self.threads, self.tenants, self.chunk_tokens) < 1:
            raise SystemExit("--repeats, --threads, --tenants and --chunk-tokens must be at least 1")
        if self.unchunked_tokens < self.long_range[1] + self.streams:
            raise SystemExit(f"--unchunked-tokens {self.unchunked_tokens}: at least the longest prompt and one token "
                             f"per stream ({self.long_range[1] + self.streams}), so that each prompt is one chunk")
        try:
            self.cache_workload(), self.chunked_workload()  # their checks
        except ValueError as e:
            raise SystemExit(f"prefix_cache.py: {e}") from None

    def cache_workload(self) -> SharedPrefixWorkload:
        return SharedPrefixWorkload(tuple(adapter_set(self.model, self.seed).name(i) for i in range(self.tenants)),
                                    self.system_len, self.user_range, self.output_range, self.rate, seed=self.seed)

    def chunked_workload(self) -> LongPromptsWorkload:
        return LongPromptsWorkload(self.streams, stream_output=self.stream_output, long_prompts=self.long_prompts,
                                   long_range=self.long_range, long_every=self.long_every, seed=self.seed)

    def server_cmd(self, system: str, adapters: Path | None) -> list[str]:
        options = ["--pool-bytes", self.pool_bytes, "--max-num-seqs", str(self.max_num_seqs), "--dtype", self.dtype]
        if system == CACHE_OFF:
            options.append(NO_CACHE_FLAG)
        if system in (CHUNKED, UNCHUNKED):
            options += ["--max-batched-tokens", str(self.chunk_tokens if system == CHUNKED else self.unchunked_tokens)]
        return serve_cmd(self.model, adapters if system in (CACHE_ON, CACHE_OFF) else None, options)


# ---------------------------------------------------------------- one phase


def prefix_counters(metrics_port: int | None) -> dict[str, dict[str, float]] | None:
    """The prefix cache's counters on the server's /metrics (`parse_prefix_counters`), once the counts
    of the steps run so far have reached them."""
    if not metrics_port:
        return None
    time.sleep(METRICS_LAG_S)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        return parse_prefix_counters(response.read().decode())


def parse_prefix_counters(text: str) -> dict[str, dict[str, float]] | None:
    """{counter: {labels: value}} of the two prefix cache counters in a Prometheus text page, or None
    when the page lacks either (a server without the cache's metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        if family.name in (HIT, QUERIED):
            out[family.name] = {",".join(f"{k}={v}" for k, v in sorted(s.labels.items())): s.value
                                for s in family.samples if s.name.endswith("_total")}  # keyed by "adapter=NAME"
    return out if len(out) == 2 else None


def hit_rate(before: dict | None, after: dict | None) -> dict | None:
    """Hit and queried tokens between two readings of `prefix_counters`, summed over adapters."""
    if before is None or after is None:
        return None
    grown = {name: sum(after[name].values()) - sum(before[name].get(a, 0.0) for a in after[name]) for name in (HIT, QUERIED)}
    return {"hit_tokens": grown[HIT], "queried_tokens": grown[QUERIED],
            "hit_rate": grown[HIT] / grown[QUERIED] if grown[QUERIED] else None}


async def prime(target: str, workload: SharedPrefixWorkload) -> None:
    """Sends the workload's priming requests (one per tenant) all at once and waits for their answers."""
    from lorafleet.client.sdk import AsyncClient

    async with AsyncClient(target, timeout=600) as client:
        vocab_size = (await client.server_info()).vocab_size
        await asyncio.gather(*(client.complete(**r.generate_kwargs()) for r in workload.priming(vocab_size)))


def decode_figures(report: dict, streams: int) -> dict:
    """The chunked part's figures: gaps between consecutive tokens of the first `streams` requests (pooled),
    the TTFT of the others (the long prompts), and when the last request ended."""
    rows = report["per_request"]
    gaps = [b - a for row in rows[:streams] for a, b in zip(row["token_times"], row["token_times"][1:])]
    return {"gap_s": latency_stats(gaps, ("mean", "p50", "p90", "p99", "max")), "gaps": len(gaps),
            "stream_tokens": sum(row["output_tokens"] for row in rows[:streams]),
            "long_ttft_s": latency_stats([r["ttft"] for r in rows[streams:] if r["ttft"] is not None], ("p50", "max")),
            "makespan_s": max((r["finished"] for r in rows if r["finished"] is not None), default=None)}


def run_phase(cfg: Config, system: str, repeat: int, adapters: Path) -> dict:
    """Starts the system's server, warms it up (and primes it), load-tests it, stops it; returns the record."""
    cache_part = system in PARTS["cache"]
    workload = cfg.cache_workload() if cache_part else cfg.chunked_workload()
    requests = math.ceil(cfg.rate * cfg.duration) if cache_part else workload.count
    duration = cfg.duration if cache_part else 600.0  # the chunked part runs until every request has ended
    cmd = cfg.server_cmd(system, adapters)
    logs = Path(cfg.workdir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    record = {"system": system, "repeat": repeat, "server_cmd": cmd, "load_before": load_average()}
    with ChildServer(cmd, logs / f"prefix-{system.replace(' ', '-')}-r{repeat}.log", cfg.threads,
                     cfg.start_timeout) as server:
        record["server_start_s"] = server.start_seconds
        asyncio.run(asyncio.wait_for(warm_up(server.target), timeout=180))
        metrics_port = server.info.get("metrics_port")
        if cache_part:
            started = time.monotonic()
            asyncio.run(asyncio.wait_for(prime(server.target, workload), timeout=900))
            record["priming_s"] = round(time.monotonic() - started, 1)
        before = prefix_counters(metrics_port)
        config = LoadTestConfig(server.target, workload, requests=requests, duration=duration,
                                progress=sys.stderr.isatty(), token_times=not cache_part)
        with CpuWatch(server.proc.pid) as cpu:
            report = asyncio.run(asyncio.wait_for(run_loadtest(config), timeout=duration + 60))
        record.update(cpu=cpu.result, report=report, prefix_cache=hit_rate(before, prefix_counters(metrics_port)))
    record.update(server_exit_code=server.proc.returncode, load_after=load_average(),
                  first_tokens=sum(row["ttft"] is not None for row in report["per_request"]))
    if not cache_part:
        record["decode"] = decode_figures(report, cfg.streams)
    return record


def plan(cfg: Config) -> list[tuple[str, int]]:
    """(system, repeat) in running order: each repeat runs both sides of each part, one after the other."""
    return [(system, r) for r in range(cfg.repeats) for part in cfg.parts for system in PARTS[part]]


# ---------------------------------------------------------------- report

# (label, how to read it from a phase record, format): the figures the tables show, per part
CACHE_FIGURES = (
    ("output tokens/s", lambda r: r["report"]["throughput"]["output_tokens_per_s"], "{:.1f}"),
    ("TTFT p50 ms", lambda r: 1000 * r["report"]["ttft_s"]["p50"], "{:,.0f}"),
    ("TTFT p99 ms", lambda r: 1000 * r["report"]["ttft_s"]["p99"], "{:,.0f}"),
    ("requests sent", lambda r: r["report"]["requests"]["sent"], "{:.0f}"),
    ("with a first token", lambda r: r["first_tokens"], "{:.0f}"),  # TTFT covers these only
    ("completed", lambda r: r["report"]["requests"]["completed"], "{:.0f}"),
    ("prefix hit rate", lambda r: r["prefix_cache"]["hit_rate"], "{:.1%}"),
)
CHUNKED_FIGURES = (
    ("TPOT p50 ms", lambda r: 1000 * r["decode"]["gap_s"]["p50"], "{:,.1f}"),
    ("TPOT p99 ms", lambda r: 1000 * r["decode"]["gap_s"]["p99"], "{:,.0f}"),
    ("longest gap ms", lambda r: 1000 * r["decode"]["gap_s"]["max"], "{:,.0f}"),
    ("long-prompt TTFT p50 ms", lambda r: 1000 * r["decode"]["long_ttft_s"]["p50"], "{:,.0f}"),
    ("all done s", lambda r: r["decode"]["makespan_s"], "{:.1f}"),
)
MACHINE_FIGURES = (
    ("server cores", lambda r: r["cpu"]["server_cores"], "{:.2f}"),
    ("CPU used by others", lambda r: r["cpu"]["others_share_of_machine"], "{:.0%}"),
)


def figure(record: dict, read) -> float | None:
    try:
        return read(record)
    except (KeyError, TypeError):  # a failed phase, a server without the counters, no first token
        return None


def medians(records: list[dict], system: str, figures) -> dict[str, float | None]:
    out = {}
    for label, read, _ in figures:
        values = [v for v in (figure(r, read) for r in records if r["system"] == system) if v is not None]
        out[label] = statistics.median(values) if values else None
    return out


def summary(cfg: Config, records: list[dict]) -> dict:
    """Per part: each system's medians over its repeats, and the ratio of the two medians."""
    out = {}
    for part in cfg.parts:
        figures = (CACHE_FIGURES if part == "cache" else CHUNKED_FIGURES) + MACHINE_FIGURES
        a, b = PARTS[part]
        ma, mb = medians(records, a, figures), medians(records, b, figures)
        out[part] = {"medians": {a: ma, b: mb},
                     "ratios": {label: ma[label] / mb[label] if ma[label] is not None and mb[label] else None
                                for label, _, _ in figures[:-len(MACHINE_FIGURES)]},
                     "runs": {s: sum(1 for r in records if r["system"] == s and "report" in r) for s in (a, b)}}
    return out


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def part_lines(cfg: Config, records: list[dict], part: str, result: dict) -> list[str]:
    figures = (CACHE_FIGURES if part == "cache" else CHUNKED_FIGURES) + MACHINE_FIGURES
    a, b = PARTS[part]
    labels = [label for label, _, _ in figures]
    rows = [[s, str(result["runs"][s])] + [fmt(result["medians"][s][label], spec) for label, _, spec in figures]
            for s in (a, b)]
    rows.append([f"{a} / {b}", ""] + [fmt(result["ratios"].get(label), "{:.2f}×") if label in result["ratios"] else ""
                                      for label in labels])
    lines = md_table(["system", "runs", *labels], rows)
    each = [[r["system"], str(r["repeat"])] + [fmt(figure(r, read), spec) for _, read, spec in figures]
            + [r.get("error", "")] for r in records if r["system"] in (a, b)]
    return lines + ["", "Each run (in the order they ran):", "", *md_table(["system", "repeat", *labels, "error"], each)]


def markdown(cfg: Config, records: list[dict], result: dict, meta: dict) -> str:
    lines = [
        "# Prefix cache and chunked prefill (issue 14)",
        "",
        f"{'Partial run (stopped early), ' if meta.get('partial') else 'Run '}finished {meta.get('finished', '-')} on "
        f"{meta['cpus']} CPU cores, {meta.get('total_s', 0) / 60:.0f} min, at {meta.get('git') or 'an unknown commit'}: "
        f"`{meta['command']}`.",
        f"Model `{Path(cfg.model).name}` ({meta.get('dtype') or cfg.dtype}), each server with {cfg.threads} torch thread(s), "
        f"`--pool-bytes {cfg.pool_bytes} --max-num-seqs {cfg.max_num_seqs}`. Medians over {cfg.repeats} repeat(s); "
        "the sides of each part alternate. Ratios divide the medians.",
        "",
    ]
    if "cache" in result:
        lines += [
            "## Prefix cache on vs off",
            "",
            f"{cfg.tenants} tenants, each with its own adapter (rank 8/16 on q/k/v/o) and its own system prompt of "
            f"{cfg.system_len} random token ids; each request a tenant's system prompt and a user turn of "
            f"{cfg.user_range[0]}-{cfg.user_range[1]} tokens, {cfg.output_range[0]}-{cfg.output_range[1]} output "
            f"tokens (greedy, ignore_eos), tenants uniform, {cfg.rate:g} arrivals/s (Gamma, cv 1) for {cfg.duration:g} s "
            f"({math.ceil(cfg.rate * cfg.duration)} requests scheduled; those still running at the end are cancelled, "
            "their tokens count). Before the clock every tenant's system prompt was sent once, to both systems. "
            f"Off: `{NO_CACHE_FLAG}`. TTFT covers the requests that got a first token within the test (a server "
            "that falls behind leaves the rest out: see the count). Hit rate: the server's prefix cache counters "
            "over the timed part.",
            "",
            *part_lines(cfg, records, "cache", result["cache"]),
            "",
        ]
    if "chunked" in result:
        lines += [
            "## Decoding streams while long prompts arrive: chunked vs one chunk per prompt",
            "",
            f"{cfg.streams} base-model streams (32-token prompts, {cfg.stream_output} output tokens) start at 0 s; "
            f"{cfg.long_prompts} prompts of {cfg.long_range[0]}-{cfg.long_range[1]} random tokens (8 output tokens) "
            f"arrive from 1 s on, {cfg.long_every:g} s apart. Chunked: `--max-batched-tokens {cfg.chunk_tokens}`; "
            f"unchunked: `--max-batched-tokens {cfg.unchunked_tokens}`. TPOT: the gaps between consecutive tokens of "
            "the streams as they arrived, pooled over the streams; \"all done\": when the last request ended.",
            "",
            *part_lines(cfg, records, "chunked", result["chunked"]),
            "",
        ]
    lines.append("\"CPU used by others\": the share of the machine's CPU that other processes used during the timed "
                 "part (from /proc/stat); \"server cores\": the server's CPU seconds per second.")
    return "\n".join(lines) + "\n"


def write_results(cfg: Config, records: list[dict], meta: dict) -> str:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = summary(cfg, records)
    text = markdown(cfg, records, result, meta)
    (out / "results.md").write_text(text, encoding="utf-8")
    data = {"meta": meta, "config": asdict(cfg), "summary": result, "phases": [with_request_columns(r) for r in records]}
    (out / "results.json").write_text(to_json(data) + "\n", encoding="utf-8")
    return text


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> Config:
    from lorafleet.client.cli import token_range

    d = {name: f.default for name, f in Config.__dataclass_fields__.items()}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "cache" / "smollm2-135m-instruct"), help="Hugging Face Llama-family folder")
    p.add_argument("--workdir", default=str(REPO / "bench" / ".cache"), help="adapters (made once) and server logs")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "prefix_cache"), help="where results.md/json go")
    p.add_argument("--parts", type=lambda s: tuple(x for x in s.split(",") if x), default=d["parts"], metavar="P,P",
                   help="cache, chunked, or both (default)")
    p.add_argument("--repeats", type=int, default=d["repeats"], help="runs of each system, alternating")
    p.add_argument("--dtype", default=d["dtype"], choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads of each server")
    p.add_argument("--pool-bytes", default=d["pool_bytes"], help="each server's page pool")
    p.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"])
    p.add_argument("--seed", type=int, default=d["seed"])
    c = p.add_argument_group("cache part")
    c.add_argument("--tenants", type=int, default=d["tenants"], help="tenants, each with its adapter and system prompt")
    c.add_argument("--system-len", type=int, default=d["system_len"], help="tokens of each system prompt")
    c.add_argument("--user-range", type=token_range, default=d["user_range"], metavar="LO:HI")
    c.add_argument("--output-range", type=token_range, default=d["output_range"], metavar="LO:HI")
    c.add_argument("--rate", type=float, default=d["rate"], help="arrivals per second")
    c.add_argument("--duration", type=float, default=d["duration"], help="seconds of each load test")
    k = p.add_argument_group("chunked part")
    k.add_argument("--streams", type=int, default=d["streams"], help="decoding requests")
    k.add_argument("--stream-output", type=int, default=d["stream_output"], help="output tokens of each stream")
    k.add_argument("--long-prompts", type=int, default=d["long_prompts"])
    k.add_argument("--long-range", type=token_range, default=d["long_range"], metavar="LO:HI", help="their prompt tokens")
    k.add_argument("--long-every", type=float, default=d["long_every"], help="seconds between long prompts")
    k.add_argument("--chunk-tokens", type=int, default=d["chunk_tokens"], help="--max-batched-tokens, chunked side")
    k.add_argument("--unchunked-tokens", type=int, default=d["unchunked_tokens"], help="--max-batched-tokens, other side")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (< 3 min): 1 repeat, 8 tenants of 500 tokens for 15 s, 4 streams and 2 prompts of "
                        "1000-1500 tokens; results in WORKDIR/quick-prefix-cache (each can still be set)")
    known = p.parse_known_args(argv)[0]
    if known.quick:
        p.set_defaults(**QUICK, out=str(Path(known.workdir) / "quick-prefix-cache"))
    fields = {key: value for key, value in vars(p.parse_args(argv)).items() if key != "quick"}
    fields.update({key: str(Path(fields[key]).resolve()) for key in ("model", "workdir", "out")})
    return Config(**fields)


def git_commit() -> str | None:
    """The checkout's commit, with "+changes" when files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    cfg = parse_args(argv)
    stop_on_sigterm()
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpus": os.cpu_count(),
            "load_at_start": load_average(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(),
            "git": git_commit()}
    adapters = adapter_set(cfg.model, cfg.seed).make(cfg.workdir, cfg.tenants if "cache" in cfg.parts else 0)
    records = []
    try:
        for system, repeat in plan(cfg):
            log(f"{system}, repeat {repeat}: starting (load average {load_average()})")
            try:
                records.append(run_phase(cfg, system, repeat, adapters))
            except Exception as e:  # noqa: BLE001 - recorded, reported, and the other phases still run
                records.append({"system": system, "repeat": repeat, "error": f"{type(e).__name__}: {e}"})
                log(f"{system}, repeat {repeat}: failed: {records[-1]['error']}")
                continue
            r = records[-1]
            meta.setdefault("dtype", r["report"]["server"].get("dtype"))
            shown = CACHE_FIGURES if system in PARTS["cache"] else CHUNKED_FIGURES
            log(f"{system}, repeat {repeat}: " + ", ".join(f"{label} {fmt(figure(r, read), spec)}"
                                                          for label, read, spec in shown + MACHINE_FIGURES))
            write_results(cfg, records, {**meta, "partial": True})
    finally:
        meta.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), total_s=round(time.monotonic() - started, 1),
                    load_at_end=load_average(), partial=len(records) < len(plan(cfg)))
        text = write_results(cfg, records, meta)
    print(text)
    log(f"wrote {cfg.out}/results.md and results.json in {meta['total_s']:.0f} s")
    return 0 if all("report" in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
