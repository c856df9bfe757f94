"""Prometheus metrics, with per-adapter labels, on their own HTTP port. Request metrics also carry
the front end that served the request: "grpc" or "http" (the OpenAI API).

The per-adapter families (requests, generated tokens, the three latency histograms, the prefix cache
counters) are kept here, not in prometheus_client's objects: with a thousand adapters they are 53,000
lines of text, and prometheus_client formats every line on every scrape (315 ms of Python, holding
the GIL that the replicas' steps need; with a scrape every second, py-spy found 10.7% of the server's
active samples there in the serving benchmark at n = 1000 adapters). `AdapterFamily` renders a label set's lines when its values change
and keeps the text, so a scrape formats only what changed since the last one and joins the rest.
The few per-replica gauges stay in prometheus_client's registry. The endpoint serves the text format
0.0.4, both parts in one response; `/metrics?name[]=NAME&name[]=...` restricts it to those samples'
families (prometheus_client's filter), so a poller of a few gauges does not fetch every adapter's.
"""
from __future__ import annotations

import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Gauge, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def adapter_label(adapter: str | None) -> str:
    return adapter or "__base__"


def _escape(value: str) -> str:
    """A label value in the text format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    """A sample value or bucket bound as Prometheus writes it (3.0, 0.25, +Inf)."""
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    return repr(float(value))


class AdapterFamily:
    """One counter or histogram family whose label sets each keep their rendered lines.

    kind "counter": one value per label set (`inc`); "histogram": counts per bucket, sum and count
    (`observe`), bucket bounds `buckets` (+Inf added). Not thread-safe by itself: Metrics locks.
    """

    def __init__(self, name: str, kind: str, help_text: str, labels: tuple[str, ...], buckets: tuple[float, ...] = ()):
        if kind not in ("counter", "histogram"):
            raise ValueError(f"AdapterFamily: kind {kind!r}")
        self.name, self.kind, self.labels = name, kind, labels
        self.buckets = (*buckets, float("inf")) if kind == "histogram" else ()
        self._bounds = [_number(b) for b in self.buckets]
        family = name + "_total" if kind == "counter" else name
        self.sample_names = {family} if kind == "counter" else {name + "_bucket", name + "_count", name + "_sum"}
        self.header = f"# HELP {family} {help_text}\n# TYPE {family} {kind}\n"
        self.values: dict[tuple[str, ...], list[float]] = {}  # counter: [v]; histogram: per-bucket counts, sum, count
        self._text: dict[tuple[str, ...], str] = {}
        self._dirty: set[tuple[str, ...]] = set()

    def _values(self, key: tuple[str, ...]) -> list[float]:
        if len(key) != len(self.labels):
            raise ValueError(f"{self.name}: labels {key} for {self.labels}")
        values = self.values.get(key)
        if values is None:
            values = self.values[key] = [0.0] * (len(self.buckets) + 2 if self.kind == "histogram" else 1)
        self._dirty.add(key)
        return values

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down ({amount})")
        self._values(key)[0] += amount

    def observe(self, key: tuple[str, ...], value: float) -> None:
        values = self._values(key)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                values[i] += 1
                break
        values[-2] += value
        values[-1] += 1

    def _render(self, key: tuple[str, ...]) -> str:
        labels = ",".join(f'{name}="{_escape(value)}"' for name, value in zip(self.labels, key))
        values = self.values[key]
        if self.kind == "counter":
            return f"{self.name}_total{{{labels}}} {_number(values[0])}\n"
        lines, cumulative = [], 0.0
        for bound, count in zip(self._bounds, values):
            cumulative += count
            lines.append(f'{self.name}_bucket{{{labels},le="{bound}"}} {_number(cumulative)}\n')
        lines.append(f"{self.name}_count{{{labels}}} {_number(values[-1])}\n")
        lines.append(f"{self.name}_sum{{{labels}}} {_number(values[-2])}\n")
        return "".join(lines)

    def render(self) -> str:
        """The family's text: the label sets changed since the last render are formatted again."""
        for key in self._dirty:
            self._text[key] = self._render(key)
        self._dirty.clear()
        return self.header + "".join(self._text.values()) if self._text else ""


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        per_request = ("frontend", "adapter")
        self.requests = AdapterFamily("lorafleet_requests", "counter", "Finished requests by front end, adapter and status",
                                      (*per_request, "status"))
        self.generated_tokens = AdapterFamily("lorafleet_generated_tokens", "counter", "Generated tokens by front end and adapter",
                                              per_request)
        self.ttft = AdapterFamily("lorafleet_time_to_first_token_seconds", "histogram", "Time to first token", per_request, _LATENCY)
        self.tpot = AdapterFamily("lorafleet_time_per_output_token_seconds", "histogram", "Time per output token after the first",
                                  per_request, _PER_TOKEN)
        self.e2e = AdapterFamily("lorafleet_request_latency_seconds", "histogram", "End-to-end request latency", per_request, _LATENCY)
        self.prefix_queried = AdapterFamily("lorafleet_prefix_cache_queried_tokens", "counter",
                                            "Prompt tokens looked up in the prefix cache, by adapter", ("adapter",))
        self.prefix_hits = AdapterFamily("lorafleet_prefix_cache_hit_tokens", "counter",
                                         "Prompt tokens found in the prefix cache (not recomputed), by adapter", ("adapter",))
        self.families = (self.requests, self.generated_tokens, self.ttft, self.tpot, self.e2e, self.prefix_queried,
                         self.prefix_hits)
        self._lock = threading.Lock()  # observations (event loop) against renders (the endpoint's threads)
        self.queue = Gauge("lorafleet_queue_length", "Sequences waiting", ["replica"], registry=r)
        self.batch = Gauge("lorafleet_running_batch_size", "Sequences running", ["replica"], registry=r)
        self.step_adapters = Gauge("lorafleet_step_adapters", "Distinct adapters in the replica's last step", ["replica"], registry=r)
        self.pages = Gauge("lorafleet_pool_pages", "Pool pages by use", ["replica", "use"], registry=r)
        self._prefix_seen: dict[tuple[int, str | None], tuple[int, int]] = {}
        self.resident = Gauge("lorafleet_adapters_resident", "Adapters resident per tier", ["tier"], registry=r)
        self._http: ThreadingHTTPServer | None = None

    def render(self, names: set[str] | None = None) -> bytes:
        """The exposition, text format 0.0.4: every family, or those with a sample name in `names` (as
        prometheus_client's `name[]` filter: a histogram by its _bucket, _count or _sum, a counter by _total)."""
        with self._lock:
            adapters = "".join(family.render() for family in self.families if names is None or family.sample_names & names)
        registry = self.registry if names is None else self.registry.restricted_registry(sorted(names))
        return generate_latest(registry) + adapters.encode()

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint; returns the bound port (port 0 picks one)."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                url = urllib.parse.urlsplit(self.path)
                if url.path not in ("/", "/metrics"):
                    self.send_error(404, "only /metrics is served here")
                    return
                names = urllib.parse.parse_qs(url.query).get("name[]")
                body = metrics.render(set(names) if names else None)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # a scrape every few seconds is not news
                pass

        self._http = ThreadingHTTPServer((host, port), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="metrics-http", daemon=True).start()
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def observe_finished(self, frontend: str, adapter: str | None, status: str, started: float, first_token: float | None,
                         finished: float, tokens: int) -> None:
        labels = (frontend, adapter_label(adapter))
        with self._lock:
            self.requests.inc((*labels, status))
            self.generated_tokens.inc(labels, tokens)
            self.e2e.observe(labels, finished - started)
            if first_token is not None:
                self.ttft.observe(labels, first_token - started)
                if tokens > 1:
                    self.tpot.observe(labels, (finished - first_token) / (tokens - 1))

    def observe_replica(self, snapshot) -> None:
        """Gauges from a ReplicaSnapshot, and the prefix cache counters by what grew since the last one."""
        s, replica = snapshot, str(snapshot.index)
        self.queue.labels(replica).set(s.waiting + s.parked)
        self.batch.labels(replica).set(s.running)
        self.step_adapters.labels(replica).set(s.step_adapters)
        for use, pages in (("kv", s.kv_pages), ("adapter", s.adapter_pages), ("cache", s.cache_pages), ("free", s.free_pages)):
            self.pages.labels(replica, use).set(pages)
        with self._lock:
            for adapter, (queried, hit) in s.prefix_tokens.items():
                seen_queried, seen_hit = self._prefix_seen.get((s.index, adapter), (0, 0))
                if queried < seen_queried:  # a rebuilt replica counts from 0 again
                    seen_queried = seen_hit = 0
                if (s.index, adapter) not in self._prefix_seen or queried != seen_queried or hit != seen_hit:
                    self.prefix_queried.inc((adapter_label(adapter),), queried - seen_queried)
                    self.prefix_hits.inc((adapter_label(adapter),), hit - seen_hit)
                self._prefix_seen[(s.index, adapter)] = (queried, hit)

    def observe_tiers(self, device_pool: int, host_cache: int, disk: int) -> None:
        self.resident.labels("device_pool").set(device_pool)
        self.resident.labels("host_cache").set(host_cache)
        self.resident.labels("disk").set(disk)
