"""The open-loop load generator behind `lorafleet loadtest`.

Requests are sent at their scheduled arrival times whether or not earlier ones have
answered (open loop), each as a streaming Generate over one AsyncClient. The run is
bounded in count (`requests`) and in time (`duration`): arrivals later than `duration`
are not sent, and requests still streaming at `duration` are cancelled and counted.

Per request it measures, in seconds from the moment the request was sent:
- TTFT, time to first token: until the first message carrying token ids;
- TPOT, time per output token: (last token time - first token time) / (output tokens - 1),
  for completed requests with at least two output tokens;
- end-to-end latency: until the stream closed, for completed requests.
With `token_times`, each request's record also keeps the arrival time of every output token
(tokens that came in one message share its time), for inter-token gaps.

    report = asyncio.run(run_loadtest(LoadTestConfig("127.0.0.1:50051", SyntheticWorkload(...))))
"""
from __future__ import annotations

import asyncio
import sys
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from .sdk import AsyncClient, LoraFleetError
from .workload import SyntheticWorkload, TraceWorkload, WorkloadRequest

OK = "OK"
CANCELLED_AT_DURATION = "CANCELLED_AT_DURATION"
_PENDING = "PENDING"
_CANCEL_GRACE_S = 5.0  # how long cancelled requests get to unwind before the run gives up on them
_LATENCY_KEYS = ("mean", "p50", "p90", "p99")


@dataclass(frozen=True)
class LoadTestConfig:
    """target: HOST:PORT. workload: a SyntheticWorkload, a TraceWorkload, or any object with their
    `generate(count, vocab_size) -> list[WorkloadRequest]` (a benchmark's own; a dataclass, so that
    the report can show it). requests: at most this many are sent. duration: seconds after which no
    request is sent and outstanding ones are cancelled. slo_ttft: seconds; a request meets the SLO
    when its first token arrives within it. vocab_size: for random prompts (None: the server's).
    tls_ca: PEM file of the server's CA (TLS when given). progress: a tqdm bar on stderr.
    token_times: keep each request's token arrival times in the report's per_request rows.
    """

    target: str
    workload: SyntheticWorkload | TraceWorkload
    requests: int = 100
    duration: float = 60.0
    slo_ttft: float = 6.0
    vocab_size: int | None = None
    tls_ca: str | None = None
    progress: bool = True
    token_times: bool = False

    def __post_init__(self):
        if not self.target:
            raise ValueError("target must be HOST:PORT")
        if not callable(getattr(self.workload, "generate", None)):
            raise ValueError("workload must be a SyntheticWorkload, a TraceWorkload or have their generate()")
        if self.requests < 1:
            raise ValueError(f"requests must be at least 1, got {self.requests}")
        if not self.duration > 0:
            raise ValueError(f"duration must be positive seconds, got {self.duration}")
        if not self.slo_ttft > 0:
            raise ValueError(f"slo_ttft must be positive seconds, got {self.slo_ttft}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be at least 1, got {self.vocab_size}")


@dataclass
class RequestRecord:
    """What happened to one request; times in seconds after the start of the run."""

    index: int
    adapter: str | None
    scheduled: float
    sent: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    finish_reason: str = ""
    status: str = _PENDING  # OK, CANCELLED_AT_DURATION, or the gRPC status name of an error
    error: str = ""
    token_times: list[float] | None = None  # with LoadTestConfig.token_times: when each output token arrived

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def tpot(self) -> float | None:
        if self.status != OK or self.output_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.output_tokens - 1)

    @property
    def e2e(self) -> float | None:
        return self.finished - self.sent if self.status == OK else None


async def run_loadtest(config: LoadTestConfig) -> dict:
    """Runs one load test against `config.target` and returns the report (see `build_report`).

    Every call, GetServerInfo included, has a deadline of `duration` + 5 s, so the run ends in
    bounded time even when the target never answers; a failed GetServerInfo raises LoraFleetError.
    """
    timeout = config.duration + _CANCEL_GRACE_S
    async with AsyncClient(config.target, tls_ca=config.tls_ca, timeout=timeout) as client:
        server = await client.server_info()
        vocab_size = config.vocab_size or server.vocab_size
        schedule = config.workload.generate(config.requests, vocab_size)
        records, elapsed = await _drive(client, schedule, config)
    return build_report(config, asdict(server), schedule, records, elapsed)


async def _drive(client: AsyncClient, schedule: list[WorkloadRequest],
                 config: LoadTestConfig) -> tuple[list[RequestRecord], float]:
    """Sends the schedule open-loop until it ends or `duration` passes; returns the records and the
    elapsed seconds (until every sent request ended, at most `duration`)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + config.duration
    progress = _Progress(len(schedule), config.progress)
    records, tasks = [], []
    try:
        for index, request in enumerate(schedule):
            if start + request.arrival >= deadline:
                break
            await asyncio.sleep(max(0.0, start + request.arrival - loop.time()))
            record = RequestRecord(index, request.adapter, request.arrival, prompt_tokens=_prompt_length(request),
                                   token_times=[] if config.token_times else None)
            records.append(record)
            tasks.append(asyncio.create_task(_send(client, request, record, start, progress)))
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time())) if tasks else ((), ())
        elapsed = min(loop.time() - start, config.duration)
        await _cancel(pending)
        _raise_unexpected(done)
    finally:
        progress.close()
    for record in records:
        if record.status == _PENDING:
            record.status = CANCELLED_AT_DURATION
    return records, elapsed


class _Progress:
    """The tqdm bar on stderr: requests ended, with the count of errors."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, unit="req", desc="loadtest", file=sys.stderr, disable=not enabled)
        self.errors = 0

    def ended(self, record: RequestRecord) -> None:
        if record.status != OK:
            self.errors += 1
            self.bar.set_postfix(errors=self.errors, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


async def _cancel(tasks) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=_CANCEL_GRACE_S)


def _raise_unexpected(tasks) -> None:
    """Re-raises a failure of the load generator itself (gRPC errors are recorded, not raised)."""
    for task in tasks:
        if task.exception() is not None:
            raise task.exception()


def _prompt_length(request: WorkloadRequest) -> int | None:
    return len(request.prompt_token_ids) if request.prompt is None else None


async def _send(client: AsyncClient, request: WorkloadRequest, record: RequestRecord, start: float,
                progress: _Progress) -> None:
    """Streams one request, filling `record` as messages arrive."""
    loop = asyncio.get_running_loop()
    record.sent = loop.time() - start
    try:
        async for chunk in client.generate(**request.generate_kwargs()):
            now = loop.time() - start
            if chunk.token_ids:
                if record.first_token is None:
                    record.first_token = now
                record.last_token = now
                record.output_tokens += len(chunk.token_ids)
                if record.token_times is not None:
                    record.token_times += [now] * len(chunk.token_ids)
            if chunk.usage is not None:
                record.prompt_tokens = chunk.usage.prompt_tokens
            record.finish_reason = chunk.finish_reason or record.finish_reason
        record.status = OK
    except LoraFleetError as e:
        record.status, record.error = e.code.name, e.message
    record.finished = loop.time() - start
    progress.ended(record)


def latency_stats(values: list[float], keys: tuple[str, ...] = _LATENCY_KEYS) -> dict:
    """{"mean": ..., "p50": ..., ...} over `values` (seconds), keys "mean", "max" or "pNN"; None where
    there are no values. The report's statistics (the benchmarks use it for theirs too)."""
    array = np.asarray(values, dtype=float)
    out = {}
    for key in keys:
        if not len(array):
            out[key] = None
        elif key == "mean":
            out[key] = float(array.mean())
        elif key == "max":
            out[key] = float(array.max())
        else:
            out[key] = float(np.percentile(array, float(key[1:])))
    return out


def build_report(config: LoadTestConfig, server: dict, schedule: list[WorkloadRequest],
                 records: list[RequestRecord], elapsed: float) -> dict:
    """The load test's result as JSON-ready data (seconds, tokens).

    requests_per_s counts completed requests, output_tokens_per_s every token received (also from
    requests that failed or were cancelled later), prompt_tokens_per_s the prompts of completed
    requests; all divide by `elapsed_s`. TTFT covers every request that got a first token; TPOT
    and end-to-end cover completed requests. SLO attainment is over all sent requests: one
    without a first token within `slo_ttft` misses it.
    """
    done = [r for r in records if r.status == OK]
    statuses = Counter(r.status for r in records)
    errors = {k: v for k, v in sorted(statuses.items()) if k not in (OK, CANCELLED_AT_DURATION)}
    ttfts = [r.ttft for r in records if r.ttft is not None]
    met = sum(1 for t in ttfts if t <= config.slo_ttft)
    output_tokens = sum(r.output_tokens for r in records)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    return {
        "config": {**asdict(config), "workload_kind": type(config.workload).__name__},
        "server": server,
        "elapsed_s": elapsed,
        "requests": {
            "scheduled": len(schedule), "sent": len(records), "completed": len(done),
            "failed": sum(errors.values()), "cancelled_at_duration": statuses[CANCELLED_AT_DURATION],
            "not_sent": len(schedule) - len(records),
        },
        "throughput": {
            "requests_per_s": len(done) / elapsed if elapsed > 0 else 0.0,
            "output_tokens_per_s": output_tokens / elapsed if elapsed > 0 else 0.0,
            "prompt_tokens_per_s": prompt_tokens / elapsed if elapsed > 0 else 0.0,
        },
        "tokens": {"output": output_tokens, "prompt_of_completed": prompt_tokens},
        "ttft_s": latency_stats(ttfts, _LATENCY_KEYS),
        "tpot_s": latency_stats([r.tpot for r in done if r.tpot is not None], _LATENCY_KEYS),
        "e2e_s": latency_stats([r.e2e for r in done], _LATENCY_KEYS),
        "slo": {"ttft_s": config.slo_ttft, "met": met, "attainment": met / len(records) if records else None},
        "send_lag_s": latency_stats([r.sent - r.scheduled for r in records], ("mean", "p99")),
        "errors": errors,
        "finish_reasons": dict(sorted(Counter(r.finish_reason for r in done).items())),
        "per_request": [_record_json(r) for r in records],
    }


def _record_json(record: RequestRecord) -> dict:
    row = {**asdict(record), "ttft": record.ttft, "tpot": record.tpot, "e2e": record.e2e}
    if record.token_times is None:
        del row["token_times"]
    return row


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def format_summary(report: dict) -> str:
    """The terminal table of a report (latencies in milliseconds)."""
    req, thr, slo = report["requests"], report["throughput"], report["slo"]
    attainment = "-" if slo["attainment"] is None else f"{100 * slo['attainment']:.1f}%"
    lines = [
        f"target {report['config']['target']}  model {report['server']['model'] or '-'}  "
        f"elapsed {report['elapsed_s']:.2f} s",
        f"requests    sent {req['sent']}/{req['scheduled']}  completed {req['completed']}  failed {req['failed']}  "
        f"cancelled at duration {req['cancelled_at_duration']}  not sent {req['not_sent']}",
        f"throughput  {thr['requests_per_s']:.2f} req/s  {thr['output_tokens_per_s']:.1f} output tok/s  "
        f"{thr['prompt_tokens_per_s']:.1f} prompt tok/s",
        f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for label, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("end-to-end", "e2e_s")):
        row = report[key]
        lines.append(f"{label:<14}" + "".join(f"{_ms(row.get(k)):>10}" for k in ("mean", "p50", "p90", "p99")))
    lines.append(f"SLO         first token within {slo['ttft_s']:g} s: {attainment} of sent requests")
    if report["errors"]:
        lines.append("errors      " + "  ".join(f"{code} {n}" for code, n in report["errors"].items()))
    return "\n".join(lines)
