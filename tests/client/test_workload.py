"""The load generator's workload: S-LoRA's power-law popularity, Gamma arrivals, lengths, trace replay.

Every test uses a fixed seed, so it is deterministic; the tolerances are what sampling error
allows at that sample size (a wrong distribution fails by far more).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lorafleet.client.workload import (
    SyntheticWorkload,
    TraceWorkload,
    adapter_popularity,
    gamma_arrivals,
    numbered_adapters,
    sample_adapter_indices,
)

Z_999 = 3.0902  # the standard normal's 0.999 quantile


def chi2_critical_999(df: int) -> float:
    """The 0.999 quantile of chi-square with df degrees of freedom (Wilson-Hilferty, within 1% for df >= 5)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + Z_999 * math.sqrt(h)) ** 3


def power_law(n: int, alpha: float) -> np.ndarray:
    """The documented law, written out independently: P(i) = ((i+1)/n)^alpha - (i/n)^alpha."""
    return np.array([((i + 1) / n) ** alpha - (i / n) ** alpha for i in range(n)])


def chi2_statistic(indices: np.ndarray, probabilities: np.ndarray) -> float:
    observed = np.bincount(indices, minlength=len(probabilities))
    expected = probabilities * len(indices)
    assert expected.min() >= 5, "too few samples for a chi-square test"
    return float(((observed - expected) ** 2 / expected).sum())


def test_popularity_is_the_documented_power_law():
    for n, alpha in [(1, 0.3), (10, 1.0), (10, 0.5), (100, 0.1)]:
        np.testing.assert_allclose(adapter_popularity(n, alpha), power_law(n, alpha), rtol=1e-12)
        assert adapter_popularity(n, alpha).sum() == pytest.approx(1.0)
    np.testing.assert_allclose(adapter_popularity(8, 1.0), np.full(8, 1 / 8))
    assert adapter_popularity(100, 0.1)[0] == pytest.approx(0.01**0.1)  # 63%: "smaller alpha, more skewed"


def test_smaller_alpha_is_more_skewed():
    head = [adapter_popularity(50, alpha)[0] for alpha in (1.0, 0.8, 0.5, 0.2, 0.05)]
    assert head == sorted(head) and head[0] == pytest.approx(1 / 50)
    for alpha in (0.8, 0.5, 0.2):
        assert np.all(np.diff(adapter_popularity(50, alpha)) < 0), "popularity falls with the index"


@pytest.mark.parametrize("n,alpha", [(10, 1.0), (10, 0.5), (20, 0.1), (100, 0.3)])
def test_adapter_histogram_follows_the_power_law(n, alpha):
    rng = np.random.default_rng(1234)
    indices = sample_adapter_indices(rng, n, alpha, 200_000)
    assert indices.min() >= 0 and indices.max() < n
    assert chi2_statistic(indices, power_law(n, alpha)) < chi2_critical_999(n - 1)


def test_histogram_test_rejects_the_wrong_law():
    """The chi-square check above has power: skewed samples do not pass as uniform, nor alpha=0.5 as 0.4."""
    rng = np.random.default_rng(1234)
    indices = sample_adapter_indices(rng, 10, 0.5, 200_000)
    assert chi2_statistic(indices, power_law(10, 1.0)) > 10 * chi2_critical_999(9)
    assert chi2_statistic(indices, power_law(10, 0.4)) > 10 * chi2_critical_999(9)


def test_workload_adapters_follow_the_power_law_by_name():
    names = numbered_adapters(10)
    workload = SyntheticWorkload(adapters=names, alpha=0.4, input_range=(1, 1), output_range=(1, 1), seed=7)
    requests = workload.generate(40_000, vocab_size=100)
    indices = np.array([names.index(r.adapter) for r in requests])
    assert chi2_statistic(indices, power_law(10, 0.4)) < chi2_critical_999(9)
    assert names[0] == "adapter-000" and names[9] == "adapter-009"


def test_no_adapters_means_the_base_model():
    requests = SyntheticWorkload(adapters=(), input_range=(1, 2), output_range=(1, 2)).generate(50, vocab_size=10)
    assert all(r.adapter is None for r in requests)


def cv_standard_error(cv: float, count: int) -> float:
    """Standard error of the sample CV of `count` Gamma gaps: cv * sqrt((1 + cv^2) / (2 count)) (delta method)."""
    return cv * math.sqrt((1 + cv**2) / (2 * count))


@pytest.mark.parametrize("rate,cv", [(4.0, 1.0), (4.0, 0.5), (0.5, 2.0), (50.0, 3.0)])
def test_gamma_arrivals_have_the_asked_rate_and_cv(rate, cv):
    count = 100_000
    arrivals = gamma_arrivals(np.random.default_rng(99), rate, cv, count)
    gaps = np.diff(np.concatenate([[0.0], arrivals]))
    assert np.all(gaps >= 0)
    mean_error = cv / (rate * math.sqrt(count))  # standard error of the mean gap
    assert abs(gaps.mean() - 1 / rate) < 4 * mean_error
    assert abs(gaps.std() / gaps.mean() - cv) < 4 * cv_standard_error(cv, count)
    assert count / arrivals[-1] == pytest.approx(rate, rel=4 * mean_error * rate)


def test_gamma_gaps_are_gamma_distributed():
    """Beyond mean and CV: the skewness of Gamma(shape 1/cv^2) gaps is 2 cv (cv 1: exponential gaps)."""
    gaps = np.diff(gamma_arrivals(np.random.default_rng(5), 2.0, 1.0, 200_000), prepend=0.0)
    skew = float(((gaps - gaps.mean()) ** 3).mean() / gaps.std() ** 3)
    assert skew == pytest.approx(2.0, abs=0.1)
    assert float(np.mean(gaps > 1 / 2.0)) == pytest.approx(math.exp(-1), abs=0.005)  # P(gap > mean) for Poisson


def test_cv_zero_is_a_fixed_gap():
    arrivals = gamma_arrivals(np.random.default_rng(0), 5.0, 0.0, 10)
    np.testing.assert_allclose(np.diff(arrivals, prepend=0.0), np.full(10, 0.2))


def test_workload_arrivals_have_the_asked_rate_and_cv():
    workload = SyntheticWorkload(rate=8.0, cv=2.0, input_range=(1, 1), output_range=(1, 1), seed=3)
    count = 40_000
    arrivals = np.array([r.arrival for r in workload.generate(count, vocab_size=10)])
    gaps = np.diff(arrivals, prepend=0.0)
    assert np.all(np.diff(arrivals) >= 0)
    assert abs(gaps.mean() - 1 / 8.0) < 4 * 2.0 / (8.0 * math.sqrt(count))
    assert abs(gaps.std() / gaps.mean() - 2.0) < 4 * cv_standard_error(2.0, count)


def test_lengths_and_prompt_tokens_stay_in_their_ranges():
    workload = SyntheticWorkload(adapters=("a", "b"), input_range=(3, 9), output_range=(1, 4), min_token_id=10,
                                 seed=11)
    requests = workload.generate(2_000, vocab_size=50)
    inputs = [len(r.prompt_token_ids) for r in requests]
    outputs = [r.max_new_tokens for r in requests]
    assert set(inputs) == set(range(3, 10)), "every length of the inclusive range occurs, no other"
    assert set(outputs) == set(range(1, 5))
    tokens = np.concatenate([r.prompt_token_ids for r in requests])
    assert tokens.min() == 10 and tokens.max() == 49
    assert all(r.ignore_eos and r.prompt is None for r in requests)


def test_a_seed_makes_the_workload_reproducible():
    make = lambda seed, out=(8, 64): SyntheticWorkload(adapters=numbered_adapters(5), alpha=0.5, input_range=(4, 16),
                                                      output_range=out, seed=seed)
    assert make(1).generate(200, 1000) == make(1).generate(200, 1000)
    assert make(1).generate(200, 1000) != make(2).generate(200, 1000)
    first, longer = make(1).generate(200, 1000), make(1, (100, 200)).generate(200, 1000)
    assert [(r.arrival, r.adapter, r.prompt_token_ids) for r in first] == \
           [(r.arrival, r.adapter, r.prompt_token_ids) for r in longer], "changing one range leaves the rest alone"
    assert make(1).generate(50, 1000) == make(1).generate(200, 1000)[:50], "count only truncates"


@pytest.mark.parametrize("kwargs", [
    {"alpha": 0.0}, {"alpha": 1.5}, {"rate": 0.0}, {"cv": -1.0}, {"input_range": (0, 5)},
    {"input_range": (9, 3)}, {"output_range": (0, 1)}, {"adapters": ("a", "a")}, {"min_token_id": -1},
])
def test_bad_synthetic_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        SyntheticWorkload(**kwargs)


def test_vocab_must_leave_room_for_tokens():
    with pytest.raises(ValueError, match="vocab_size"):
        SyntheticWorkload(min_token_id=10).generate(1, vocab_size=10)


def write_trace(path, lines) -> str:
    path.write_text("".join(json.dumps(line) + "\n" if not isinstance(line, str) else line + "\n" for line in lines))
    return str(path)


TRACE = [
    {"timestamp": 1000.5, "adapter": "sql", "prompt_tokens": 12, "output_tokens": 30},
    {"timestamp": 1000.0, "adapter": None, "prompt": "Hello there", "output_tokens": 5},
    {"timestamp": 1003.25, "adapter": "", "prompt_token_ids": [5, 6, 7]},
    {"timestamp": 1001.0, "adapter": "chat", "prompt_tokens": 4, "output_tokens": 8},
]


def test_trace_replay_reproduces_the_trace(tmp_path):
    path = write_trace(tmp_path / "trace.jsonl", TRACE[:2] + [""] + TRACE[2:])
    requests = TraceWorkload(path, max_new_tokens=64, min_token_id=2).generate(100, vocab_size=30)
    assert [r.arrival for r in requests] == [0.0, 0.5, 1.0, 3.25]
    assert [r.adapter for r in requests] == [None, "sql", "chat", None]
    assert [r.max_new_tokens for r in requests] == [5, 30, 8, 64]
    assert requests[0].prompt == "Hello there" and requests[0].prompt_token_ids == ()
    assert requests[3].prompt_token_ids == (5, 6, 7) and requests[3].prompt is None
    assert [len(r.prompt_token_ids) for r in requests[1:3]] == [12, 4]
    assert all(2 <= t < 30 for r in requests[1:3] for t in r.prompt_token_ids)
    assert requests[0].generate_kwargs() == {"adapter": None, "prompt": "Hello there", "max_new_tokens": 5,
                                             "ignore_eos": True}
    assert requests[3].generate_kwargs()["prompt_token_ids"] == (5, 6, 7)
    assert TraceWorkload(path).generate(100, 30) == TraceWorkload(path).generate(100, 30)


def test_trace_count_and_speedup(tmp_path):
    path = write_trace(tmp_path / "trace.jsonl", TRACE)
    requests = TraceWorkload(path, speedup=2.0).generate(2, vocab_size=30)
    assert [(r.arrival, r.adapter) for r in requests] == [(0.0, None), (0.25, "sql")]
    assert TraceWorkload(path).generate(0, vocab_size=30) == []


@pytest.mark.parametrize("bad,message", [
    ("not json", "Expecting value"),
    ({"adapter": "a", "prompt": "x"}, "timestamp"),
    ({"timestamp": 1, "prompt": "x", "prompt_tokens": 3}, "exactly one"),
    ({"timestamp": 1}, "exactly one"),
    ({"timestamp": 1, "prompt_tokens": 0}, "prompt_tokens"),
    ({"timestamp": 1, "prompt": "x", "output_tokens": 2.5}, "output_tokens"),
    ({"timestamp": 1, "prompt": "x", "output_token": 2}, "unknown field 'output_token'"),
    ({"timestamp": 1, "prompt": "x", "adapter": 3}, "adapter"),
    ([1, 2], "JSON object"),
])
def test_bad_trace_lines_name_the_line(tmp_path, bad, message):
    path = write_trace(tmp_path / "trace.jsonl", [TRACE[0], bad])
    with pytest.raises(ValueError, match=message) as caught:
        TraceWorkload(path).generate(10, vocab_size=30)
    assert "trace.jsonl:2:" in str(caught.value)
