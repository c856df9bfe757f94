"""Serving benchmark (issue 6): lorafleet against the PEFT baseline, over gRPC, under load.

Every system is a server in a child process on 127.0.0.1 (an ephemeral port), driven by
lorafleet's open-loop load generator (`client/loadtest.py`) in this process with the
S-LoRA synthetic workload: the same request count, arrival rate, lengths and seed for
every system and every number of adapters n.

| phase | server |
|---|---|
| lorafleet, n in {1, 10, 100, 1000} | `lorafleet serve` with the adapters folder; one unified page pool |
| lorafleet (no adapters) | `lorafleet serve` without adapters, every request base-only: the ceiling |
| lorafleet (separate pools) | `bench/ablations.py --separate-pools F serve ...`, same pool bytes: S-LoRA's no-unify-mem ablation |
| lorafleet (adapter affinity) | `lorafleet serve --adapter-affinity K`: queued requests whose adapter is in the batch go first, for at most K steps |
| HF PEFT, n in {1, 10, 100, 1000} | `bench/peft_server.py`: requests grouped by adapter, adapters swapped between batches |

Each phase starts a fresh server, sends one short warm-up request, runs one load test
bounded in count and time, and stops the server (SIGTERM, then kill). Adapters (ranks 8
and 16 on q/k/v/o, PEFT format) are made once and cached under `--workdir`.

    .venv/bin/python bench/serving.py --model cache/smollm2-135m-instruct   # make bench, about 20 min
    .venv/bin/python bench/serving.py --quick                               # smoke run, ~3 min

Writes `--out` (bench/results/): results.md (the table and the ratios), results.json
(configuration, machine load, every load test's full report) and throughput.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from adapter_sets import TARGET_SETS, AdapterSet  # bench/ is this script's folder
from machine import machine_busy_seconds

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGETS = TARGET_SETS["attn"]
RANKS = (8, 16)
PEFT_MADE = 4  # adapters made by peft itself; the rest copy their tensor names and shapes
CHECK_ADAPTERS = 4  # lorafleet's and PEFT's greedy answers are compared on one request with each of these
B_STD = 0.02  # std of the random B matrices: the adapters change outputs a little, which stay sane

LORAFLEET = "lorafleet"
CEILING = "lorafleet (no adapters)"
SEPARATE = "lorafleet (separate pools)"
AFFINITY = "lorafleet (adapter affinity)"
PEFT = "HF PEFT"
SYSTEMS = (LORAFLEET, AFFINITY, SEPARATE, CEILING, PEFT)  # table order
QUICK = {"adapter_counts": (1, 10), "separate_counts": (10,), "affinity_counts": (10,), "duration": 12.0,
         "budget": 300.0}  # --quick defaults


@dataclass(frozen=True)
class BenchConfig:
    """One run of the benchmark. Times in seconds, lengths in tokens."""

    model: str
    workdir: str
    out: str
    adapter_counts: tuple[int, ...] = (1, 10, 100, 1000)
    systems: tuple[str, ...] = ("lorafleet", "ceiling", "peft", "separate", "affinity")  # which servers run
    dtype: str = "float32"  # both sides: lorafleet's default is auto (bfloat16 on this CPU), PEFT's float32
    separate_counts: tuple[int, ...] = (100, 1000)  # n for the separate-pools ablation
    affinity_counts: tuple[int, ...] = (100, 1000)  # n for adapter-aware admission
    affinity_steps: int = 16  # its --adapter-affinity
    rate: float = 10.0  # mean arrivals per second: above what any system here serves on CPU (about 6 at most)
    duration: float = 90.0  # each load test: no request sent, and outstanding ones cancelled, after this
    cv: float = 1.0
    alpha: float = 1.0  # adapter popularity exponent; 1 is uniform
    input_range: tuple[int, int] = (8, 64)
    output_range: tuple[int, int] = (8, 32)
    slo_ttft: float = 6.0
    pool_bytes: str = "512MiB"  # lorafleet's pool, for the unified and the separate runs alike
    separate_fraction: float = 0.5  # of that pool, for adapters only, in the ablation
    max_num_seqs: int = 64  # lorafleet's batch; the PEFT baseline's batch is the same
    peft_max_loaded: int = 4
    threads: int = 1  # torch threads of each server; 1 is far steadier than 2 on a shared 2-core machine
    start_timeout: float = 240.0  # a server must be ready within this
    budget: float = 1500.0  # seconds since the start; a phase that would end later is skipped
    seed: int = 0

    def __post_init__(self):
        if not (Path(self.model) / "config.json").is_file():
            raise SystemExit(f"--model {self.model}: no config.json there (`make demo` prepares the default model)")
        if not self.adapter_counts or min(self.adapter_counts) < 1:
            raise SystemExit("--adapter-counts: positive numbers of adapters")
        if min(self.separate_counts + self.affinity_counts, default=1) < 1:
            raise SystemExit("--separate-counts, --affinity-counts: positive numbers of adapters")
        if not (self.rate > 0 and self.duration > 0 and self.slo_ttft > 0):
            raise SystemExit("--rate, --duration and --slo-ttft must be positive")
        for name in ("threads", "max_num_seqs", "peft_max_loaded", "affinity_steps"):
            if getattr(self, name) < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 < self.separate_fraction < 1:
            raise SystemExit("--separate-fraction must be in (0, 1)")
        for name in ("input_range", "output_range"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise SystemExit(f"--{name.replace('_', '-')} {lo}:{hi}: need 1 <= low <= high")

    @property
    def requests(self) -> int:
        """Enough requests for arrivals to last the whole duration."""
        return math.ceil(self.rate * self.duration)

    @property
    def max_adapters(self) -> int:
        return max(self.adapter_counts + self.separate_counts + self.affinity_counts)


# ---------------------------------------------------------------- adapters


def adapter_set(model: str, seed: int) -> AdapterSet:
    """The serving benchmarks' adapters (this one's and bench/prefix_cache.py's), one cache folder per model and seed."""
    return AdapterSet(model, TARGETS, RANKS, seed, B_STD, PEFT_MADE)


# ---------------------------------------------------------------- machine


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a running process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """During a block: CPU seconds of the server and of this process, and the share of the
    machine's cores that everything else used (the benchmark's noise on a shared machine)."""

    def __init__(self, server_pid: int):
        self.pid = server_pid

    def __enter__(self):
        self.t0, self.busy0 = time.monotonic(), machine_busy_seconds()
        self.server0, self.own0 = process_cpu_seconds(self.pid), sum(os.times()[:2])
        return self

    def __exit__(self, *exc):
        seconds = time.monotonic() - self.t0
        server = process_cpu_seconds(self.pid) - self.server0
        own = sum(os.times()[:2]) - self.own0
        others = machine_busy_seconds() - self.busy0 - server - own
        cores = os.cpu_count() or 1
        self.result = {"seconds": round(seconds, 2), "server_cpu_s": round(server, 2), "bench_cpu_s": round(own, 2),
                       "server_cores": round(server / seconds, 2),
                       "others_share_of_machine": round(max(0.0, others) / (seconds * cores), 3)}


# ---------------------------------------------------------------- servers


class ChildServer:
    """A server in a child process that prints {"event": "ready", "port": ...} on stdout when it serves.

    stderr goes to `log_path`; torch in it uses `threads` threads; stopping is SIGTERM, then SIGKILL
    after `stop_timeout`. As a context manager, it is stopped when the block ends.
    """

    def __init__(self, cmd: list[str], log_path: Path, threads: int, start_timeout: float, stop_timeout: float = 30.0):
        self.cmd, self.stop_timeout = cmd, stop_timeout
        self.log_file = open(log_path, "w", encoding="utf-8")
        self.events: list[dict] = []  # JSON lines the server printed on stdout after the ready line
        self._drain: threading.Thread | None = None
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log_file, text=True, env=env, cwd=REPO)
        try:
            self.info = self._wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = round(time.monotonic() - started, 1)
        self.target = f"127.0.0.1:{self.info['port']}"
        self._drain = threading.Thread(target=self._drain_stdout, daemon=True)
        self._drain.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{' '.join(self.cmd[:2])} exited with {self.proc.returncode}; "
                                       f"see {self.log_file.name}")
                if sel.select(timeout=1.0):
                    line = self.proc.stdout.readline()
                    if line.startswith("{") and json.loads(line).get("event") == "ready":
                        return json.loads(line)
        raise TimeoutError(f"{' '.join(self.cmd[:2])} was not ready within {timeout:.0f} s; see {self.log_file.name}")

    def _drain_stdout(self) -> None:
        for line in self.proc.stdout:
            self.log_file.write(line)
            if line.startswith("{"):
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass

    def stop(self) -> int:
        """SIGTERM (graceful), then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log(f"server {self.proc.pid} ignored SIGTERM for {self.stop_timeout:.0f} s; killing it")
                self.proc.kill()
                self.proc.wait(10)
        if self._drain is not None:
            self._drain.join(10)
        self.log_file.close()
        return self.proc.returncode


def serve_cmd(model: str, adapters: Path | None, options: list[str], launcher: list[str] | None = None) -> list[str]:
    """`lorafleet serve` of `model` (and the `adapters` folder) on 127.0.0.1 with ephemeral gRPC and metrics
    ports, then `options`; `launcher` replaces the `lorafleet` command (bench/ablations.py with an ablation)."""
    cmd = (launcher or [str(BIN / "lorafleet")]) + [
        "serve", "--model", model, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *options]
    if adapters is not None:
        cmd += ["--adapters", str(adapters)]
    return cmd


def lorafleet_cmd(cfg: BenchConfig, adapters: Path | None, separate: bool, affinity: bool = False) -> list[str]:
    """`lorafleet serve` (with adapter affinity if asked), or the same through bench/ablations.py with
    separate pools injected."""
    ablation = [sys.executable, str(REPO / "bench" / "ablations.py"), "--separate-pools", str(cfg.separate_fraction)]
    options = ["--pool-bytes", cfg.pool_bytes, "--max-num-seqs", str(cfg.max_num_seqs), "--dtype", cfg.dtype]
    if affinity:
        options += ["--adapter-affinity", str(cfg.affinity_steps)]
    return serve_cmd(cfg.model, adapters, options, ablation if separate else None)


def peft_cmd(cfg: BenchConfig, adapters: Path) -> list[str]:
    return [sys.executable, str(REPO / "bench" / "peft_server.py"), "--model", cfg.model, "--adapters", str(adapters),
            "--host", "127.0.0.1", "--port", "0", "--batch", str(cfg.max_num_seqs),
            "--max-loaded", str(cfg.peft_max_loaded), "--dtype", cfg.dtype]


class MetricsSampler:
    """Polls lorafleet's Prometheus endpoint once a second: queue, running batch, pool pages by use."""

    GAUGES = {"lorafleet_queue_length": "queue", "lorafleet_running_batch_size": "batch", "lorafleet_step_adapters": "step_adapters"}

    def __init__(self, port: int | None):
        names = [*self.GAUGES, "lorafleet_pool_pages", "lorafleet_adapters_resident"]  # not every adapter's series
        self.url = f"http://127.0.0.1:{port}/metrics?" + "&".join(f"name[]={n}" for n in names) if port else None
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.url:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                text = urllib.request.urlopen(self.url, timeout=2).read().decode()
            except OSError:
                continue
            self.samples.append(parse_gauges(text))

    def summary(self) -> dict:
        keys = sorted({k for s in self.samples for k in s})
        return {k: {"mean": round(sum(s.get(k, 0) for s in self.samples) / len(self.samples), 1),
                    "max": max(s.get(k, 0) for s in self.samples)} for k in keys} if self.samples else {}


def parse_gauges(text: str) -> dict[str, float]:
    """queue, batch, step_adapters, pages_kv, pages_adapter, pages_cache, pages_free, adapters_device_pool from a /metrics page."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        if name in MetricsSampler.GAUGES:
            out[MetricsSampler.GAUGES[name]] = float(value)
        elif name == "lorafleet_pool_pages":
            out["pages_" + labels.split('use="')[1].split('"')[0]] = float(value)
        elif name == "lorafleet_adapters_resident" and 'tier="device_pool"' in labels:
            out["adapters_in_pool"] = float(value)
    return out


# ---------------------------------------------------------------- one phase


@dataclass
class Phase:
    system: str
    n: int  # adapters the workload draws from (0: base model only)
    priority: int  # phases run most important first, so a tight budget skips the least important
    result: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.system} n={self.n}"


def plan_phases(cfg: BenchConfig) -> list[Phase]:
    """The phases, most important first (the figures of the issue's targets), so a tight budget skips the rest;
    the two sides of a ratio run one after the other where they can, so that other jobs on the machine skew
    them alike."""
    run = set(cfg.systems)
    wanted = [(CEILING, 0)] * ("ceiling" in run) + [(LORAFLEET, n) for n in cfg.adapter_counts if "lorafleet" in run] \
        + [(PEFT, n) for n in cfg.adapter_counts if "peft" in run] \
        + [(SEPARATE, n) for n in cfg.separate_counts if "separate" in run] \
        + [(AFFINITY, n) for n in cfg.affinity_counts if "affinity" in run]
    first = [(CEILING, 0), (LORAFLEET, 10), (LORAFLEET, 100), (AFFINITY, 100), (PEFT, 100), (SEPARATE, 100),
             (LORAFLEET, 1000), (AFFINITY, 1000), (SEPARATE, 1000)]
    ordered = [sn for sn in first if sn in wanted] + [sn for sn in wanted if sn not in first]
    return [Phase(system, n, rank) for rank, (system, n) in enumerate(ordered)]


def workload(cfg: BenchConfig, n: int):
    from lorafleet.client.workload import SyntheticWorkload

    return SyntheticWorkload(adapters=tuple(AdapterSet.name(i) for i in range(n)), alpha=cfg.alpha, rate=cfg.rate,
                             cv=cfg.cv, input_range=cfg.input_range, output_range=cfg.output_range, seed=cfg.seed)


async def warm_up(target: str) -> None:
    """One short base-model request, so the first timed step does not pay one-time costs."""
    from lorafleet.client.sdk import AsyncClient

    async with AsyncClient(target, timeout=120) as client:
        async for _ in client.generate(prompt_token_ids=[1, 2, 3, 4], max_new_tokens=2, ignore_eos=True):
            pass


def check_requests(cfg: BenchConfig) -> list[dict]:
    """One greedy request with each of the first CHECK_ADAPTERS adapters, for the agreement check."""
    rng = np.random.default_rng(cfg.seed + 1)
    return [{"adapter": AdapterSet.name(i), "prompt_token_ids": rng.integers(100, 10_000, 24).tolist(),
             "max_new_tokens": 16, "ignore_eos": True} for i in range(CHECK_ADAPTERS)]


def check_phase(cfg: BenchConfig) -> int | None:
    """The n whose lorafleet and PEFT phases also answer the agreement check (the smallest n >= CHECK_ADAPTERS)."""
    return min((n for n in cfg.adapter_counts if n >= CHECK_ADAPTERS), default=None)


async def greedy_answers(target: str, requests: list[dict]) -> list[list[int]]:
    from lorafleet.client.sdk import AsyncClient

    async with AsyncClient(target, timeout=180) as client:
        return [list((await client.complete(**r)).token_ids) for r in requests]


async def load_test(cfg: BenchConfig, target: str, n: int) -> dict:
    from lorafleet.client.loadtest import LoadTestConfig, run_loadtest

    config = LoadTestConfig(target, workload(cfg, n), requests=cfg.requests, duration=cfg.duration,
                            slo_ttft=cfg.slo_ttft, progress=sys.stderr.isatty())
    return await asyncio.wait_for(run_loadtest(config), timeout=cfg.duration + 60)


def read_adapter_files(adapters: Path, n: int) -> float:
    """Reads the weights of adapters 0 .. n-1 once and returns the seconds it took.

    Every phase does this first, so each starts with its adapters just read (in the page
    cache, if the machine keeps them) instead of the first phase to use them paying for
    the disk and the later ones not.
    """
    started = time.monotonic()
    for i in range(n):
        with open(adapters / AdapterSet.name(i) / "adapter_model.safetensors", "rb") as f:
            while f.read(1 << 24):
                pass
    return round(time.monotonic() - started, 2)


def run_phase(cfg: BenchConfig, phase: Phase, adapters: Path) -> dict:
    """Reads its adapters' files, starts the phase's server, warms it up, load-tests it, stops it; returns the record."""
    if phase.system == PEFT:
        cmd = peft_cmd(cfg, adapters)
    else:
        cmd = lorafleet_cmd(cfg, adapters if phase.n else None, separate=phase.system == SEPARATE,
                            affinity=phase.system == AFFINITY)
    logs = Path(cfg.workdir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    record = {"system": phase.system, "n": phase.n, "server_cmd": cmd, "load_before": load_average(),
              "adapter_files_read_s": read_adapter_files(adapters, phase.n)}
    slug = re.sub(r"[^a-z0-9]+", "-", phase.system.lower()).strip("-")
    server = ChildServer(cmd, logs / f"{slug}-n{phase.n}.log", cfg.threads, cfg.start_timeout)
    try:
        record["server_start_s"] = server.start_seconds
        asyncio.run(asyncio.wait_for(warm_up(server.target), timeout=180))
        if phase.system in (LORAFLEET, PEFT) and phase.n == check_phase(cfg):
            record["check_answers"] = asyncio.run(asyncio.wait_for(greedy_answers(server.target, check_requests(cfg)),
                                                                   timeout=300))
        with MetricsSampler(server.info.get("metrics_port")) as sampler, CpuWatch(server.proc.pid) as cpu:
            report = asyncio.run(load_test(cfg, server.target, phase.n))
        record.update(cpu=cpu.result, server_gauges=sampler.summary(), report=report)
    finally:
        record["server_exit_code"] = server.stop()
        record["load_after"] = load_average()
        record["server_stats"] = next((e for e in reversed(server.events) if e.get("event") == "stopped"), None)
    return record


def run_phases(cfg: BenchConfig, phases: list[Phase], adapters: Path, started: float) -> None:
    """Runs each phase in turn; skips those that would end after the budget; one failure does not stop the rest."""
    expected = cfg.duration + 45  # start, warm-up and stop of a server on a busy machine
    for phase in sorted(phases, key=lambda p: p.priority):
        spent = time.monotonic() - started
        if spent + expected > cfg.budget:
            phase.result = {"system": phase.system, "n": phase.n, "skipped": f"budget of {cfg.budget:.0f} s"}
            log(f"{phase.key}: skipped, {spent:.0f} s of the {cfg.budget:.0f} s budget spent")
            continue
        log(f"{phase.key}: starting (load average {load_average()})")
        try:
            phase.result = run_phase(cfg, phase, adapters)
        except Exception as e:  # noqa: BLE001 - recorded, reported, and the other phases still run
            phase.result = {"system": phase.system, "n": phase.n, "error": f"{type(e).__name__}: {e}"}
            log(f"{phase.key}: failed: {phase.result['error']}")
            continue
        thr = phase.result["report"]["throughput"]
        log(f"{phase.key}: {thr['output_tokens_per_s']:.1f} tokens/s, {thr['requests_per_s']:.2f} requests/s, "
            f"errors {phase.result['report']['errors'] or 'none'}")


# ---------------------------------------------------------------- report


def tokens_per_s(phases: list[Phase], system: str, n: int) -> float | None:
    for p in phases:
        if p.system == system and p.n == n and "report" in p.result:
            return p.result["report"]["throughput"]["output_tokens_per_s"]
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def ratios(cfg: BenchConfig, phases: list[Phase]) -> list[dict]:
    """Each ratio of the issue, with its target where the issue sets one."""
    out = []
    ceiling = tokens_per_s(phases, CEILING, 0)
    for n in cfg.adapter_counts:
        out.append({"name": f"lorafleet / HF PEFT, n={n}", "value": ratio(tokens_per_s(phases, LORAFLEET, n),
                                                                          tokens_per_s(phases, PEFT, n)),
                    "target": 10.0 if n == 100 else None})
    if {10, 1000} <= set(cfg.adapter_counts):
        out.append({"name": "lorafleet n=1000 / n=10", "value": ratio(tokens_per_s(phases, LORAFLEET, 1000),
                                                                      tokens_per_s(phases, LORAFLEET, 10)),
                    "target": 0.9})
    for n in cfg.adapter_counts:
        out.append({"name": f"lorafleet n={n} / no adapters", "value": ratio(tokens_per_s(phases, LORAFLEET, n), ceiling),
                    "target": 0.75})
    for n in cfg.separate_counts:
        out.append({"name": f"separate pools / unified, n={n}", "value": ratio(tokens_per_s(phases, SEPARATE, n),
                                                                               tokens_per_s(phases, LORAFLEET, n)),
                    "target": None})
    for n in cfg.affinity_counts:
        out.append({"name": f"adapter affinity / first come first served, n={n}",
                    "value": ratio(tokens_per_s(phases, AFFINITY, n), tokens_per_s(phases, LORAFLEET, n)), "target": None})
    for r in out:
        r["met"] = None if r["value"] is None or r["target"] is None else r["value"] >= r["target"]
    return out


def agreement(cfg: BenchConfig, phases: list[Phase]) -> dict | None:
    """How many check requests got identical greedy tokens from lorafleet and from PEFT."""
    answers = {p.system: p.result.get("check_answers") for p in phases if p.n == check_phase(cfg)}
    if not (answers.get(LORAFLEET) and answers.get(PEFT)):
        return None
    same = sum(a == b for a, b in zip(answers[LORAFLEET], answers[PEFT]))
    return {"n": check_phase(cfg), "requests": CHECK_ADAPTERS, "identical": same}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f}"


def table_rows(phases: list[Phase]) -> list[list[str]]:
    rows = []
    for p in sorted(phases, key=lambda p: (SYSTEMS.index(p.system), p.n)):
        r = p.result
        if "report" not in r:
            rows.append([p.system, str(p.n)] + ["-"] * 9 + [r.get("skipped") or r.get("error", "not run")])
            continue
        rep, cpu = r["report"], r["cpu"]
        req, thr, ttft, slo = rep["requests"], rep["throughput"], rep["ttft_s"], rep["slo"]
        errors = sum(rep["errors"].values())
        per_cpu = rep["tokens"]["output"] / cpu["server_cpu_s"] if cpu["server_cpu_s"] else 0.0
        rows.append([
            p.system, str(p.n), f"{req['completed']}/{req['sent']}", f"{thr['output_tokens_per_s']:.1f}",
            f"{thr['requests_per_s']:.2f}", _ms(ttft["p50"]), _ms(ttft["p99"]),
            "-" if slo["attainment"] is None else f"{100 * slo['attainment']:.0f}%",
            f"{per_cpu:.1f} ({cpu['server_cores']:.2f})", f"{cpu['others_share_of_machine']:.0%}",
            f"{r['load_before'][0]} / {r['load_after'][0]}", f"{errors} errors" if errors else "",
        ])
    return rows


def internals_rows(phases: list[Phase]) -> list[list[str]]:
    """lorafleet's own gauges, sampled once a second: what its batch and pool looked like."""
    rows = []
    for p in sorted(phases, key=lambda p: (SYSTEMS.index(p.system), p.n)):
        g = p.result.get("server_gauges")
        if not g:
            continue
        mean_max = lambda key: f"{g[key]['mean']:g} / {g[key]['max']:g}" if key in g else "-"  # noqa: E731
        rows.append([p.system, str(p.n), mean_max("batch"), mean_max("step_adapters"), mean_max("queue"), mean_max("adapters_in_pool"),
                     mean_max("pages_kv"), mean_max("pages_adapter"), mean_max("pages_free")])
    return rows


def peft_rows(phases: list[Phase]) -> list[list[str]]:
    """The PEFT baseline's own counts over its lifetime (warm-up included): batches, swaps, where the time went."""
    rows = []
    for p in sorted(phases, key=lambda p: p.n):
        st = p.result.get("server_stats")
        if p.system != PEFT or not st or not st["batches"]:
            continue
        busy = st["swap_s"] + st["generate_s"]
        rows.append([str(p.n), str(st["batches"]), f"{st['requests'] / st['batches']:.1f}", str(st["adapter_loads"]),
                     f"{st['swap_s']:.1f} ({st['swap_s'] / busy:.0%})", f"{st['generate_s']:.1f}"])
    return rows


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(row) + " |" for row in rows]


def markdown(cfg: BenchConfig, phases: list[Phase], ratio_rows: list[dict], meta: dict) -> str:
    header = ["system", "adapters n", "requests done/sent", "tokens/s", "requests/s", "TTFT p50 ms", "TTFT p99 ms",
              f"SLO (TTFT ≤ {cfg.slo_ttft:g} s)", "tokens per server CPU-s (cores used)", "CPU used by others",
              "load avg before / after", "note"]
    lines = [
        "# Serving benchmark: lorafleet vs the HF PEFT baseline",
        "",
        f"Run finished {meta['finished']} on {meta['cpus']} CPU cores (no GPU), {meta['total_s'] / 60:.0f} min: "
        f"`{meta['command']}`.",
        f"Model `{Path(cfg.model).name}` ({cfg.dtype}), each server with {cfg.threads} torch thread(s). Adapters: ranks "
        f"{'/'.join(map(str, RANKS))} alternating, on {'/'.join(t[0] for t in TARGETS)} (S-LoRA S1/S2 style), PEFT format.",
        f"Workload (S-LoRA synthetic, seed {cfg.seed}): {cfg.requests} requests at {cfg.rate:g}/s (Gamma, cv {cfg.cv:g}), "
        f"adapter popularity alpha {cfg.alpha:g} (1 = uniform), prompts {cfg.input_range[0]}-{cfg.input_range[1]} "
        f"tokens, outputs {cfg.output_range[0]}-{cfg.output_range[1]} tokens (ignore_eos), greedy; each load test "
        f"stops after {cfg.duration:g} s (requests still running are cancelled; their tokens so far count).",
        f"lorafleet: `--pool-bytes {cfg.pool_bytes} --max-num-seqs {cfg.max_num_seqs}`; separate pools: "
        f"`bench/ablations.py --separate-pools {cfg.separate_fraction:g}` of the same pool. HF PEFT: batches of up to "
        f"{cfg.max_num_seqs} requests of one adapter, at most {cfg.peft_max_loaded} adapters loaded.",
        "",
    ]
    check = meta.get("agreement")
    if check:
        lines += [f"Greedy answers, lorafleet vs HF PEFT (one request with each of adapters 0-{check['requests'] - 1}, "
                  f"asked in the n={check['n']} phases before the load test): {check['identical']}/{check['requests']} "
                  "identical.", ""]
    lines += md_table(header, table_rows(phases))
    lines += ["", *md_table(["ratio (output tokens/s)", "value", "target"], [
        [r["name"], "-" if r["value"] is None else f"{r['value']:.2f}×",
         "" if r["target"] is None else f"≥ {r['target']:g}× " + ("(met)" if r["met"] else "(missed)")]
        for r in ratio_rows])]
    lines += ["", "lorafleet's gauges during each load test (mean / max of one sample a second):", "",
              *md_table(["system", "adapters n", "running batch", "adapters per step", "queue", "adapters in pool", "KV pages",
                         "adapter pages", "free pages"], internals_rows(phases))]
    if peft_rows(phases):
        lines += ["", "The HF PEFT baseline's batches (over the server's life, warm-up included):", "",
                  *md_table(["adapters n", "batches", "requests per batch", "adapter loads",
                             "seconds loading/activating adapters (share)", "seconds in generate"], peft_rows(phases))]
    lines += ["", "tokens/s counts every output token received within the load test's duration. HF PEFT answers "
              "each request in one message when its batch ends, so its TTFT is its whole latency, and the batch "
              "still running at the end of the test counts for nothing. \"tokens per server CPU-s\" divides the "
              "tokens by the CPU time the server process got: steadier than tokens/s when other jobs share the "
              "machine."]
    return "\n".join(lines) + "\n"


def plot(cfg: BenchConfig, phases: list[Phase], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, style in ((LORAFLEET, "o-"), (PEFT, "s-"), (SEPARATE, "^--")):
        points = [(n, tokens_per_s(phases, system, n)) for n in sorted(set(cfg.adapter_counts) | set(cfg.separate_counts))]
        points = [(n, t) for n, t in points if t is not None]
        if points:
            ax.plot(*zip(*points), style, label=system)
    ceiling = tokens_per_s(phases, CEILING, 0)
    if ceiling is not None:
        ax.axhline(ceiling, color="gray", linestyle=":", label=CEILING)
    ax.set_xscale("log")
    ax.set_xlabel("number of adapters n")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Throughput under load ({Path(cfg.model).name}, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def with_request_columns(record: dict) -> dict:
    """The phase record with its report's per_request list of dicts turned into columns: {field: [values]}."""
    report = record.get("report")
    if not report or not report["per_request"]:
        return record
    rows = report["per_request"]
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    return {**record, "report": {**report, "per_request": columns}}


def to_json(value, depth: int = 0) -> str:
    """Indented JSON where a dict or list of plain values takes one line (one request per line), floats
    rounded to 0.1 ms / 4 decimals: the file stays readable and small."""
    if isinstance(value, float):
        return json.dumps(round(value, 4))
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None:
        return json.dumps(value)
    items = list(items)
    flat = all(not isinstance(v, (dict, list)) for _, v in items)
    if isinstance(value, dict):
        parts = [f"{json.dumps(str(k))}: {to_json(v, depth + 1)}" for k, v in items]
        opening, closing = "{", "}"
    else:
        parts = [to_json(v, depth + 1) for _, v in items]
        opening, closing = "[", "]"
    if flat or not parts:
        return opening + ", ".join(parts) + closing
    pad = " " * (depth + 1)
    return opening + "\n" + ",\n".join(pad + part for part in parts) + "\n" + " " * depth + closing


def write_results(cfg: BenchConfig, phases: list[Phase], meta: dict) -> str:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ratio_rows = ratios(cfg, phases)
    meta["agreement"] = agreement(cfg, phases)
    text = markdown(cfg, phases, ratio_rows, meta)
    (out / "results.md").write_text(text, encoding="utf-8")
    results = {"meta": meta, "config": {**asdict(cfg), "requests": cfg.requests}, "ratios": ratio_rows,
               "phases": [with_request_columns(p.result)
                          for p in sorted(phases, key=lambda p: (SYSTEMS.index(p.system), p.n))]}
    (out / "results.json").write_text(to_json(results) + "\n", encoding="utf-8")
    try:
        plot(cfg, phases, out / "throughput.png")
    except ImportError:
        log("no throughput.png: matplotlib is not installed (pip install matplotlib)")
    return text


# ---------------------------------------------------------------- main


def counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write numbers separated by commas, e.g. 1,10,100") from None


def systems(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = set(names) - set(BenchConfig.__dataclass_fields__["systems"].default)
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from lorafleet, ceiling, peft, separate, affinity")
    return names


def parse_args(argv: list[str] | None) -> BenchConfig:
    from lorafleet.client.cli import token_range

    d = BenchConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "cache" / "smollm2-135m-instruct"), help="Hugging Face Llama-family folder")
    p.add_argument("--workdir", default=str(REPO / "bench" / ".cache"), help="adapters (made once) and server logs")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="where results.md/json and the plot go")
    p.add_argument("--adapter-counts", type=counts, default=d["adapter_counts"].default, metavar="N,N,...")
    p.add_argument("--separate-counts", type=counts, default=d["separate_counts"].default, metavar="N,N,...",
                   help="n for the separate-pools ablation (empty: none)")
    p.add_argument("--systems", type=systems, default=d["systems"].default, metavar="S,S,...",
                   help="which servers to run: lorafleet, ceiling, peft, separate, affinity (default all)")
    p.add_argument("--affinity-counts", type=counts, default=d["affinity_counts"].default, metavar="N,N,...",
                   help="n for adapter-aware admission (empty: none)")
    p.add_argument("--affinity-steps", type=int, default=d["affinity_steps"].default,
                   help="the affinity runs' --adapter-affinity")
    p.add_argument("--dtype", default=d["dtype"].default, choices=["float32", "bfloat16", "float16"],
                   help="of both servers (the same on both sides)")
    p.add_argument("--rate", type=float, default=d["rate"].default, help="arrivals per second")
    p.add_argument("--duration", type=float, default=d["duration"].default, help="seconds per load test")
    p.add_argument("--cv", type=float, default=d["cv"].default, help="coefficient of variation of arrival gaps")
    p.add_argument("--alpha", type=float, default=d["alpha"].default, help="adapter popularity exponent (1: uniform)")
    p.add_argument("--input-range", type=token_range, default=d["input_range"].default, metavar="LO:HI")
    p.add_argument("--output-range", type=token_range, default=d["output_range"].default, metavar="LO:HI")
    p.add_argument("--slo-ttft", type=float, default=d["slo_ttft"].default, help="seconds")
    p.add_argument("--pool-bytes", default=d["pool_bytes"].default, help="lorafleet's page pool (unified and separate)")
    p.add_argument("--separate-fraction", type=float, default=d["separate_fraction"].default,
                   help="share of the pool for adapters only in the ablation")
    p.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"].default,
                   help="lorafleet's batch, and the PEFT baseline's")
    p.add_argument("--peft-max-loaded", type=int, default=d["peft_max_loaded"].default)
    p.add_argument("--threads", type=int, default=d["threads"].default, help="torch threads of each server")
    p.add_argument("--budget", type=float, default=d["budget"].default,
                   help="seconds since the start; a phase that would end later is skipped")
    p.add_argument("--seed", type=int, default=d["seed"].default)
    p.add_argument("--quick", action="store_true",
                   help="smoke run, about 3 minutes: n in {1, 10}, separate pools at n=10, 12 s load tests, "
                        "results in WORKDIR/quick-results (each can still be set)")
    if p.parse_known_args(argv)[0].quick:
        workdir = p.parse_known_args(argv)[0].workdir
        p.set_defaults(**QUICK, out=str(Path(workdir) / "quick-results"))
    fields = {k: v for k, v in vars(p.parse_args(argv)).items() if k != "quick"}
    fields.update({k: str(Path(fields[k]).resolve()) for k in ("model", "workdir", "out")})
    return BenchConfig(**fields)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("lorafleet", "torch", "transformers", "peft", "grpcio", "matplotlib"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` stops its server."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    cfg = parse_args(argv)
    stop_on_sigterm()
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpus": os.cpu_count(),
            "load_at_start": load_average(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    adapters = adapter_set(cfg.model, cfg.seed).make(cfg.workdir, cfg.max_adapters)
    meta["adapters_ready_s"] = round(time.monotonic() - started, 1)
    phases = plan_phases(cfg)
    run_phases(cfg, phases, adapters, started)
    meta.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), total_s=round(time.monotonic() - started, 1),
                load_at_end=load_average(), versions=versions())
    text = write_results(cfg, phases, meta)
    print(text)
    log(f"wrote {cfg.out}/results.md, results.json, throughput.png in {meta['total_s']:.0f} s")
    return 0 if all("report" in p.result for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
