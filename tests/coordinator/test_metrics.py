"""The per-adapter metric families (coordinator/metrics.py AdapterFamily) against prometheus_client itself:
the same observations give the same samples, a scrape formats only the label sets that changed, and the
endpoint serves the exposition."""
from __future__ import annotations

import random
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.coordinator import metrics as metrics_module
from lorafleet.coordinator.metrics import CONTENT_TYPE, AdapterFamily, Metrics

# names a label value must survive: quotes, backslashes, newlines, unicode, the base model's label
ADAPTERS = [None, "pirate", 'say "hi"', "back\\slash", "two\nlines", "émoji-🙂", "a" * 200]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the text format, without prometheus_client's _created series."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def reference_registry():
    """The same families in prometheus_client's own objects: the oracle."""
    r = CollectorRegistry()
    per_request = ["frontend", "adapter"]
    return r, {
        "requests": Counter("lorafleet_requests", "x", [*per_request, "status"], registry=r),
        "tokens": Counter("lorafleet_generated_tokens", "x", per_request, registry=r),
        "ttft": Histogram("lorafleet_time_to_first_token_seconds", "x", per_request, buckets=metrics_module._LATENCY, registry=r),
        "tpot": Histogram("lorafleet_time_per_output_token_seconds", "x", per_request, buckets=metrics_module._PER_TOKEN, registry=r),
        "e2e": Histogram("lorafleet_request_latency_seconds", "x", per_request, buckets=metrics_module._LATENCY, registry=r),
    }


def test_the_same_observations_give_prometheus_clients_samples():
    """Random finished requests (bucket bounds hit exactly, zero, beyond the last bound, one-token requests,
    no first token) through Metrics and through prometheus_client's Counter/Histogram: equal samples."""
    rng = random.Random(0)
    ours = Metrics()
    registry, ref = reference_registry()
    bounds = list(metrics_module._LATENCY) + list(metrics_module._PER_TOKEN)
    for _ in range(600):
        frontend, adapter = rng.choice(["grpc", "http"]), rng.choice(ADAPTERS)
        status = rng.choice(["OK", "CANCELLED", "DEADLINE_EXCEEDED"])
        started = rng.uniform(0, 100)
        first = None if rng.random() < 0.1 else started + rng.choice([rng.choice(bounds), 0.0, 500.0, rng.uniform(0, 3)])
        finished = (first or started) + rng.choice([rng.choice(bounds), 0.0, rng.uniform(0, 30)])
        tokens = rng.choice([0, 1, 2, 17])
        ours.observe_finished(frontend, adapter, status, started, first, finished, tokens)
        labels = (frontend, adapter or "__base__")
        ref["requests"].labels(*labels, status).inc()
        ref["tokens"].labels(*labels).inc(tokens)
        ref["e2e"].labels(*labels).observe(finished - started)
        if first is not None:
            ref["ttft"].labels(*labels).observe(first - started)
            if tokens > 1:
                ref["tpot"].labels(*labels).observe((finished - first) / (tokens - 1))
    got, want = samples(ours.render().decode()), samples(generate_latest(registry).decode())
    per_adapter = {k: v for k, v in got.items() if not k[0].startswith(("lorafleet_prefix", "lorafleet_queue", "lorafleet_running",
                                                                        "lorafleet_step", "lorafleet_pool", "lorafleet_adapters"))}
    assert per_adapter.keys() == want.keys()
    for key, value in want.items():
        assert per_adapter[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_a_scrape_formats_only_the_label_sets_that_changed(monkeypatch):
    ours = Metrics()
    for i in range(50):
        ours.observe_finished("grpc", f"a{i}", "OK", 0.0, 0.2, 1.0, 5)
    first = ours.render()
    formatted = []
    real = AdapterFamily._render
    monkeypatch.setattr(AdapterFamily, "_render", lambda self, key: formatted.append((self.name, key)) or real(self, key))
    assert ours.render() == first and formatted == []
    ours.observe_finished("grpc", "a7", "OK", 0.0, 0.3, 2.0, 9)
    again = ours.render()
    assert sorted({key for _, key in formatted}) == [("grpc", "a7"), ("grpc", "a7", "OK")]
    assert len(formatted) == 5  # requests, tokens, ttft, tpot, e2e of that one adapter
    fresh = Metrics()  # the same observations rendered from nothing give the same text
    for i in range(50):
        fresh.observe_finished("grpc", f"a{i}", "OK", 0.0, 0.2, 1.0, 5)
    fresh.observe_finished("grpc", "a7", "OK", 0.0, 0.3, 2.0, 9)
    assert fresh.render() == again


def test_prefix_counters_grow_by_the_snapshots_difference_and_stay_clean_when_unchanged():
    ours = Metrics()

    def snapshot(index, tokens):
        return SimpleNamespace(index=index, waiting=0, parked=0, running=1, step_adapters=1, kv_pages=1, adapter_pages=2,
                               cache_pages=3, free_pages=4, prefix_tokens=tokens)

    ours.observe_replica(snapshot(0, {None: (0, 0), "pirate": (40, 0)}))
    ours.observe_replica(snapshot(0, {None: (0, 0), "pirate": (100, 60)}))
    got = samples(ours.render().decode())
    assert got[("lorafleet_prefix_cache_queried_tokens_total", (("adapter", "pirate"),))] == 100
    assert got[("lorafleet_prefix_cache_hit_tokens_total", (("adapter", "pirate"),))] == 60
    assert got[("lorafleet_prefix_cache_queried_tokens_total", (("adapter", "__base__"),))] == 0  # seen, nothing yet
    assert got[("lorafleet_pool_pages", (("replica", "0"), ("use", "free")))] == 4
    ours.observe_replica(snapshot(0, {None: (0, 0), "pirate": (100, 60)}))
    assert not ours.prefix_queried._dirty and not ours.prefix_hits._dirty
    ours.observe_replica(snapshot(0, {None: (0, 0), "pirate": (30, 10)}))  # a rebuilt replica counts from 0 again
    got = samples(ours.render().decode())
    assert got[("lorafleet_prefix_cache_queried_tokens_total", (("adapter", "pirate"),))] == 130


def test_bad_observations_are_refused():
    family = AdapterFamily("x", "counter", "x", ("adapter",))
    with pytest.raises(ValueError, match="cannot go down"):
        family.inc(("a",), -1)
    with pytest.raises(ValueError, match="labels"):
        family.inc(("a", "b"))
    with pytest.raises(ValueError, match="kind"):
        AdapterFamily("x", "summary", "x", ("adapter",))


def test_the_endpoint_serves_the_exposition():
    ours = Metrics()
    ours.observe_finished("http", "pirate", "OK", 0.0, 0.1, 0.5, 3)
    port = ours.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.headers["Content-Type"] == CONTENT_TYPE
            text = response.read().decode()
        assert samples(text)[("lorafleet_generated_tokens_total", (("adapter", "pirate"), ("frontend", "http")))] == 3
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=10)
        assert missing.value.code == 404
    finally:
        ours.close()


def test_the_name_filter_restricts_the_exposition_to_those_families():
    """prometheus_client's `name[]` filter: a poller of the per-replica gauges gets none of the adapters' series;
    a histogram is asked for by a sample name (_count), a counter by its _total."""
    ours = Metrics()
    ours.observe_finished("grpc", "pirate", "OK", 0.0, 0.1, 0.5, 3)
    ours.queue.labels("0").set(7)
    only_gauge = samples(ours.render({"lorafleet_queue_length"}).decode())
    assert only_gauge == {("lorafleet_queue_length", (("replica", "0"),)): 7}
    picked = samples(ours.render({"lorafleet_time_to_first_token_seconds_count", "lorafleet_requests_total"}).decode())
    assert {name for name, _ in picked} == {"lorafleet_requests_total", "lorafleet_time_to_first_token_seconds_bucket",
                                            "lorafleet_time_to_first_token_seconds_count", "lorafleet_time_to_first_token_seconds_sum"}
    port = ours.serve("127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{port}/metrics?name[]=lorafleet_queue_length&name[]=lorafleet_generated_tokens_total"
        with urllib.request.urlopen(url, timeout=10) as response:
            got = samples(response.read().decode())
        assert set(got) == {("lorafleet_queue_length", (("replica", "0"),)),
                            ("lorafleet_generated_tokens_total", (("adapter", "pirate"), ("frontend", "grpc")))}
    finally:
        ours.close()
