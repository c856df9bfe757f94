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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_decode_sizes_of_the_base_matmuls_are_prepared_at_load(tiny_models, monkeypatch, dtype):
    """An engine's workers multiply zeros through each distinct packed base weight (q|k|v, o, gate|up, down,
    the head) once for every row count 1 .. --max-num-seqs at load, so oneDNN builds those matmuls before
    the first decode steps instead of during them; nothing else is multiplied, and the tokens are unchanged."""
    from lorafleet.kernels import ops
    from lorafleet.worker import model as model_module

    calls = []
    real = model_module.linear

    def recording(x, w, bias=None):
        calls.append((x.shape[0], tuple(w.shape), bool(x.count_nonzero() == 0)))
        return real(x, w, bias)

    monkeypatch.setattr(model_module, "linear", recording)
    engine = make_engine(tiny_models["llama_gqa"], None, dtype=dtype, max_num_seqs=5)
    worker_model = engine.executor.worker.model
    layer = worker_model.layers[0]
    shapes = {tuple(w.shape) for w in (layer.w_qkv, layer.w_o, layer.w_gate_up, layer.w_down, worker_model.lm_head)}
    assert all(w.layout == torch._mkldnn for w in (layer.w_qkv, worker_model.lm_head)) == ops.packs(torch.zeros(1, dtype=getattr(torch, dtype)))
    if ops.packs(torch.zeros(1, dtype=getattr(torch, dtype))):
        assert sorted(calls) == sorted((m, shape, True) for shape in shapes for m in range(1, 6))
    else:
        assert calls == []
    assert engine.cfg.worker_config().warm_rows == 5
    calls.clear()
    monkeypatch.setattr(model_module, "linear", real)
    assert generate(engine, [(None, [5, 6, 7], 3)]) == generate(make_engine(tiny_models["llama_gqa"], None, dtype=dtype), [(None, [5, 6, 7], 3)])
