"""The model's elementwise ops on their C kernels give the logits of their torch references."""
from __future__ import annotations

import random

import pytest
import torch
from engines import adapters_root, generate, make_engine

from lorafleet.kernels import cpu


def logits_of(engine, requests) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The generated tokens and the logits of every step of the engine's model."""
    model, logits = engine.executor.worker.model, []
    forward = model.forward

    def recording(*args, **kwargs):
        logits.append(forward(*args, **kwargs))
        return logits[-1]

    model.forward = recording
    return generate(engine, requests), logits


@pytest.mark.parametrize("dtype, tolerance", [("float32", dict(atol=1e-4, rtol=1e-4)),
                                              ("bfloat16", dict(atol=6e-2, rtol=2e-2))])
def test_the_c_ops_give_the_torch_logits(tiny_models, tiny_adapters, monkeypatch, dtype, tolerance):
    """Prefill and decode steps with adapters and without; bfloat16 rounds where torch rounds, so its
    logits stay within a few bfloat16 steps of the reference's (most are equal)."""
    model, adapters = tiny_models["llama_gqa"], adapters_root(tiny_adapters)
    rng = random.Random(4)
    requests = [(a, [rng.randrange(3, 200) for _ in range(n)], 4) for a, n in (("r16_all", 9), (None, 1), ("r8_mlp", 30))]
    assert cpu.ops_usable(torch.zeros(1, dtype=getattr(torch, dtype)))
    fused_tokens, fused = logits_of(make_engine(model, adapters, dtype=dtype), requests)
    monkeypatch.setattr(cpu, "ops_usable", lambda t: False)  # every op on its torch reference
    tokens, reference = logits_of(make_engine(model, adapters, dtype=dtype), requests)
    assert fused_tokens == tokens
    assert len(fused) == len(reference)
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, **tolerance)
