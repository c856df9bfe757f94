"""bench/prefix_cache.py's pure parts: its two workloads, the counters it reads, the figures it reports.

The servers themselves are not started here (`make bench-prefix` and `--quick` do that).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import prefix_cache as pc  # noqa: E402

VOCAB = 500


def test_each_request_is_its_tenants_system_prompt_and_a_user_turn_of_its_own():
    w = pc.SharedPrefixWorkload(("a", "b", "c"), system_len=20, user_range=(2, 5), output_range=(3, 4), rate=5.0)
    systems = dict(zip(w.tenants, w.system_prompts(VOCAB)))
    requests = w.generate(40, VOCAB)
    assert requests == w.generate(40, VOCAB), "the seed gives the same requests"
    assert len({s for s in systems.values()}) == 3 and all(len(s) == 20 for s in systems.values())
    assert {r.adapter for r in requests} == {"a", "b", "c"}
    for r in requests:
        assert r.prompt_token_ids[:20] == systems[r.adapter] and 2 <= len(r.prompt_token_ids) - 20 <= 5
        assert 3 <= r.max_new_tokens <= 4 and r.ignore_eos and r.prompt is None
        assert max(r.prompt_token_ids) < VOCAB
    assert [r.arrival for r in requests] == sorted(r.arrival for r in requests)
    assert len({r.prompt_token_ids[20:] for r in requests}) > 30, "user turns differ"
    priming = w.priming(VOCAB)
    assert [(r.adapter, r.prompt_token_ids[:20], r.max_new_tokens) for r in priming] == \
        [(name, systems[name], 1) for name in w.tenants]
    assert not {r.prompt_token_ids for r in priming} & {r.prompt_token_ids for r in requests}


def test_the_streams_come_first_and_the_long_prompts_after_them():
    w = pc.LongPromptsWorkload(streams=3, stream_prompt=4, stream_output=10, long_prompts=2, long_range=(50, 60),
                               long_output=2, first_long_at=1.0, long_every=2.0)
    requests = w.generate(w.count, VOCAB)
    assert w.count == 5 and [r.arrival for r in requests] == pytest.approx([0.0, 0.05, 0.1, 1.0, 3.0])
    assert [(len(r.prompt_token_ids), r.max_new_tokens) for r in requests[:3]] == [(4, 10)] * 3
    assert all(50 <= len(r.prompt_token_ids) <= 60 and r.max_new_tokens == 2 for r in requests[3:])
    assert all(r.adapter is None for r in requests)
    with pytest.raises(ValueError):
        pc.LongPromptsWorkload(streams=40, first_long_at=1.0)  # the last stream would be sent after the first prompt


def test_hit_rate_is_the_growth_of_the_counters_read_from_metrics():
    registry = CollectorRegistry()
    hit = Counter(pc.HIT, "hit", ["adapter"], registry=registry)
    queried = Counter(pc.QUERIED, "queried", ["adapter"], registry=registry)
    hit.labels("a").inc(100), queried.labels("a").inc(200)
    before = pc.parse_prefix_counters(generate_latest(registry).decode())
    hit.labels("a").inc(300), queried.labels("a").inc(400), hit.labels("b").inc(50), queried.labels("b").inc(100)
    after = pc.parse_prefix_counters(generate_latest(registry).decode())
    assert after == {pc.HIT: {"adapter=a": 400.0, "adapter=b": 50.0}, pc.QUERIED: {"adapter=a": 600.0, "adapter=b": 100.0}}
    assert pc.hit_rate(before, after) == {"hit_tokens": 350.0, "queried_tokens": 500.0, "hit_rate": 0.7}
    assert pc.parse_prefix_counters("lorafleet_requests_total 3.0\n") is None and pc.hit_rate(None, after) is None


def test_decode_figures_pool_the_streams_gaps_and_leave_the_long_prompts_out():
    rows = [{"token_times": [1.0, 1.1, 1.2, 3.2], "output_tokens": 4, "ttft": 0.5, "finished": 3.2},
            {"token_times": [1.05, 1.15], "output_tokens": 2, "ttft": 0.5, "finished": 1.2},
            {"token_times": [3.0, 9.0], "output_tokens": 2, "ttft": 2.0, "finished": 9.5}]
    figures = pc.decode_figures({"per_request": rows}, streams=2)
    assert figures["gaps"] == 4 and figures["stream_tokens"] == 6 and figures["makespan_s"] == 9.5
    assert figures["gap_s"]["max"] == pytest.approx(2.0) and figures["gap_s"]["p50"] == pytest.approx(0.1)
    assert figures["long_ttft_s"] == {"p50": 2.0, "max": 2.0}


def test_the_summary_takes_medians_over_repeats_and_divides_them(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # Config wants a model folder; nothing reads it here
    cfg = pc.Config(model=str(tmp_path), workdir=str(tmp_path), out=str(tmp_path), parts=("chunked",), repeats=3)
    assert pc.plan(cfg) == [(pc.CHUNKED, 0), (pc.UNCHUNKED, 0), (pc.CHUNKED, 1), (pc.UNCHUNKED, 1),
                            (pc.CHUNKED, 2), (pc.UNCHUNKED, 2)]

    def record(system, p99):
        return {"system": system, "report": {}, "cpu": {"server_cores": 1.0, "others_share_of_machine": 0.1},
                "decode": {"gap_s": {"p50": 0.05, "p99": p99, "max": p99}, "long_ttft_s": {"p50": 1.0},
                           "makespan_s": 20.0}}

    records = [record(pc.CHUNKED, 0.5), record(pc.UNCHUNKED, 8.0), record(pc.CHUNKED, 0.7), record(pc.UNCHUNKED, 6.0),
               record(pc.CHUNKED, 0.6), {"system": pc.UNCHUNKED, "repeat": 2, "error": "RuntimeError: it died"}]
    result = pc.summary(cfg, records)["chunked"]
    assert result["runs"] == {pc.CHUNKED: 3, pc.UNCHUNKED: 2}
    assert result["medians"][pc.CHUNKED]["TPOT p99 ms"] == pytest.approx(600)
    assert result["medians"][pc.UNCHUNKED]["TPOT p99 ms"] == pytest.approx(7000)
    assert result["ratios"]["TPOT p99 ms"] == pytest.approx(600 / 7000) and result["ratios"]["all done s"] == 1.0
    assert "server cores" not in result["ratios"]
