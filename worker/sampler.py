"""Next-token choice: greedy, or temperature with top-k and top-p, reproducible per seed;
and, for the sequences that ask, the log-probabilities of the chosen token and the top candidates."""
from __future__ import annotations

import torch

from .step import SamplingParams, TokenLogprobs


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """logits: (S, vocab), any float dtype; positions[i]: the position the new token will take.

    Greedy is the first largest logit of a row: `max(dim)` gives the same index as `argmax` (the
    first, NaN included) at a third of its time on the CPU, and reads bfloat16 in place, whose
    widening to float32 is exact and keeps the order. Sampled rows are widened to float32 first.
    A seeded row draws its noise from a generator seeded by (seed, position), so its
    tokens do not depend on the batch around it or on preemption and recompute.
    """
    tokens = logits.max(dim=-1).indices
    for i, p in enumerate(params):
        if p.temperature > 0:
            tokens[i] = _sample_row(logits[i].float(), p, positions[i])
    return tokens.tolist()


def token_logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]) -> list[TokenLogprobs | None] | None:
    """logits: (S, vocab); tokens[i]: row i's sampled token. For each row whose params ask
    (logprobs > 0): logprobs = log_softmax(logits[i].float()), its value at tokens[i] and
    topk(logprobs, min(params[i].logprobs, vocab)). None when no row asks; only those rows are computed."""
    rows = [i for i, p in enumerate(params) if p.logprobs > 0]
    if not rows:
        return None
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)  # (len(rows), vocab)
    k = min(max(params[i].logprobs for i in rows), logprobs.shape[-1])
    top = torch.topk(logprobs, k, dim=-1)
    out: list[TokenLogprobs | None] = [None] * len(params)
    for j, i in enumerate(rows):
        n = min(params[i].logprobs, k)
        out[i] = TokenLogprobs(float(logprobs[j, tokens[i]]), tuple(top.indices[j, :n].tolist()),
                               tuple(top.values[j, :n].tolist()))
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, position: int) -> int:
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_k > 0 and p.top_k < probs.shape[0]:
        kth = torch.topk(probs, p.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(0)
        drop = cumulative - sorted_probs > p.top_p * cumulative[-1]
        probs = probs.scatter(0, order[drop], 0.0)
    generator = torch.Generator(device=logits.device)
    if p.seed is None:
        generator.seed()
    else:
        generator.manual_seed((p.seed * 1_000_003 + position) % (2**63))
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())
