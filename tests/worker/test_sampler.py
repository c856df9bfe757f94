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


def test_greedy_is_the_first_largest_logit_in_every_dtype():
    """The greedy pick is argmax's of the float32 logits: the first of tied maxima, a NaN's index
    when a row holds one, and the same for bfloat16 logits read in place."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 49152, generator=g)
    logits[1, [7, 300, 40000]] = 50.0  # ties: the first wins
    logits[2, [48000, 49151]] = 50.0
    logits[3, 1234] = float("nan")
    logits[4, :] = 0.0  # all equal: index 0
    logits[5, 49151] = 50.0
    expected = logits.argmax(dim=-1).tolist()
    assert expected[1:] == [7, 48000, 1234, 0, 49151]
    params, positions = [SamplingParams()] * 6, [1] * 6
    assert sample(logits, params, positions) == expected
    low = logits.to(torch.bfloat16)
    assert sample(low, params, positions) == low.float().argmax(dim=-1).tolist()
    assert sample(low[:, :40000], params, positions) == low[:, :40000].float().argmax(dim=-1).tolist()


def test_a_sampled_row_draws_the_same_token_from_bfloat16_as_from_its_float32_widening():
    logits = (torch.randn(3, 500, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=s) for s in (1, 2, 3)]
    assert sample(logits, params, [5, 6, 7]) == sample(logits.float(), params, [5, 6, 7])
