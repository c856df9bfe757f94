"""The sampler's logprobs: only for the rows that ask, the log-softmax of the float32 logits
before temperature, the chosen token's value and the top candidates in descending order."""
from __future__ import annotations

import torch

from lorafleet.worker.sampler import sample, token_logprobs
from lorafleet.worker.step import MAX_LOGPROBS, SamplingParams


def test_no_row_asks_no_logprobs():
    logits = torch.randn(3, 50)
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=1), SamplingParams()]
    tokens = sample(logits, params, [4, 4, 4])
    assert token_logprobs(logits, params, tokens) is None


def test_greedy_logprob_is_the_top_one_and_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 5
    params = [SamplingParams(logprobs=5), SamplingParams(), SamplingParams(logprobs=MAX_LOGPROBS),
              SamplingParams(logprobs=1, temperature=2.0, seed=3)]
    tokens = sample(logits, params, [7, 7, 7, 7])
    out = token_logprobs(logits, params, tokens)
    assert out[1] is None
    reference = torch.log_softmax(logits.double(), dim=-1)
    for i in (0, 2):
        lp = out[i]
        assert len(lp.top_ids) == len(lp.top_logprobs) == params[i].logprobs
        assert lp.top_ids[0] == tokens[i] and lp.logprob == max(lp.top_logprobs)
        assert list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)
        expected = torch.topk(reference[i], params[i].logprobs)
        assert list(lp.top_ids) == expected.indices.tolist()
        torch.testing.assert_close(torch.tensor(lp.top_logprobs, dtype=torch.float64), expected.values, atol=1e-5, rtol=0)
    # a sampled row: the logprob of the token it drew, before temperature
    sampled = out[3]
    assert abs(sampled.logprob - float(reference[3, tokens[3]])) < 1e-5
    assert len(sampled.top_ids) == 1 and sampled.top_logprobs[0] >= sampled.logprob


def test_more_candidates_than_the_vocabulary():
    logits = torch.randn(1, 6)
    params = [SamplingParams(logprobs=MAX_LOGPROBS)]
    (lp,) = token_logprobs(logits, params, sample(logits, params, [1]))
    assert sorted(lp.top_ids) == list(range(6))
    assert abs(sum(torch.tensor(lp.top_logprobs).exp().tolist()) - 1.0) < 1e-5
