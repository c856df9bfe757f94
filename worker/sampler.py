"""Next-token choice: greedy, or temperature with top-k and top-p, reproducible per seed."""
from __future__ import annotations

import torch

from .step import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """logits: (S, vocab) float32; positions[i]: the position the new token will take.

    A seeded row draws its noise from a generator seeded by (seed, position), so its
    tokens do not depend on the batch around it or on preemption and recompute.
    """
    tokens = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.temperature > 0:
            tokens[i] = _sample_row(logits[i], p, positions[i])
    return tokens.tolist()


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
