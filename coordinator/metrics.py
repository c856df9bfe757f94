"""Prometheus metrics, with per-adapter labels, on their own HTTP port. Request metrics also carry
the front end that served the request: "grpc" or "http" (the OpenAI API)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def adapter_label(adapter: str | None) -> str:
    return adapter or "__base__"


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        per_request = ["frontend", "adapter"]
        self.requests = Counter("lorafleet_requests", "Finished requests by front end, adapter and status",
                                [*per_request, "status"], registry=r)
        self.generated_tokens = Counter("lorafleet_generated_tokens", "Generated tokens by front end and adapter", per_request, registry=r)
        self.ttft = Histogram("lorafleet_time_to_first_token_seconds", "Time to first token", per_request, buckets=_LATENCY, registry=r)
        self.tpot = Histogram("lorafleet_time_per_output_token_seconds", "Time per output token after the first", per_request,
                              buckets=_PER_TOKEN, registry=r)
        self.e2e = Histogram("lorafleet_request_latency_seconds", "End-to-end request latency", per_request, buckets=_LATENCY, registry=r)
        self.queue = Gauge("lorafleet_queue_length", "Sequences waiting", ["replica"], registry=r)
        self.batch = Gauge("lorafleet_running_batch_size", "Sequences running", ["replica"], registry=r)
        self.step_adapters = Gauge("lorafleet_step_adapters", "Distinct adapters in the replica's last step", ["replica"], registry=r)
        self.pages = Gauge("lorafleet_pool_pages", "Pool pages by use", ["replica", "use"], registry=r)
        self.prefix_queried = Counter("lorafleet_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache, by adapter",
                                      ["adapter"], registry=r)
        self.prefix_hits = Counter("lorafleet_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache (not recomputed), by adapter",
                                   ["adapter"], registry=r)
        self._prefix_seen: dict[tuple[int, str | None], tuple[int, int]] = {}
        self.resident = Gauge("lorafleet_adapters_resident", "Adapters resident per tier", ["tier"], registry=r)
        self._http = None

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint; returns the bound port (port 0 picks one)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def observe_finished(self, frontend: str, adapter: str | None, status: str, started: float, first_token: float | None,
                         finished: float, tokens: int) -> None:
        labels = (frontend, adapter_label(adapter))
        self.requests.labels(*labels, status).inc()
        self.generated_tokens.labels(*labels).inc(tokens)
        self.e2e.labels(*labels).observe(finished - started)
        if first_token is not None:
            self.ttft.labels(*labels).observe(first_token - started)
            if tokens > 1:
                self.tpot.labels(*labels).observe((finished - first_token) / (tokens - 1))

    def observe_replica(self, snapshot) -> None:
        """Gauges from a ReplicaSnapshot, and the prefix cache counters by what grew since the last one."""
        s, replica = snapshot, str(snapshot.index)
        self.queue.labels(replica).set(s.waiting + s.parked)
        self.batch.labels(replica).set(s.running)
        self.step_adapters.labels(replica).set(s.step_adapters)
        for use, pages in (("kv", s.kv_pages), ("adapter", s.adapter_pages), ("cache", s.cache_pages), ("free", s.free_pages)):
            self.pages.labels(replica, use).set(pages)
        for adapter, (queried, hit) in s.prefix_tokens.items():
            seen_queried, seen_hit = self._prefix_seen.get((s.index, adapter), (0, 0))
            if queried < seen_queried:  # a rebuilt replica counts from 0 again
                seen_queried = seen_hit = 0
            self.prefix_queried.labels(adapter_label(adapter)).inc(queried - seen_queried)
            self.prefix_hits.labels(adapter_label(adapter)).inc(hit - seen_hit)
            self._prefix_seen[(s.index, adapter)] = (queried, hit)

    def observe_tiers(self, device_pool: int, host_cache: int, disk: int) -> None:
        self.resident.labels("device_pool").set(device_pool)
        self.resident.labels("host_cache").set(host_cache)
        self.resident.labels("disk").set(disk)
