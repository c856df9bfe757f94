"""The engine against transformers + PEFT run one adapter at a time: mixed batches, exact tokens."""
from __future__ import annotations

import random

import pytest
import torch
from bench.ablations import SeparatePoolsPlan, separate_pools
from engines import add, adapters_root, generate, make_engine
from peers import peft_greedy


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 250) for _ in range(n)]


def test_mixed_batch_equals_peft(tiny_models, tiny_adapters):
    """Eight adapters of ranks 1..64 (attention-only, MLP-only, all seven, rsLoRA) and base-only
    requests, prompts of different lengths joining at different steps: every token equals PEFT's."""
    model = tiny_models["llama_gqa"]
    rng = random.Random(0)
    names = ["r1_v", "r2_q", "r3_attn", "r8_mlp", "r4_o_down", "r16_all", "r64_all", "r8_rslora_all"]
    requests = [(name, _prompt(rng, rng.randrange(1, 30)), rng.randrange(4, 20)) for name in names]
    requests += [(None, _prompt(rng, 9), 12), (None, _prompt(rng, 1), 7), ("r16_all", _prompt(rng, 17), 10)]
    join_at = [rng.randrange(0, 6) for _ in requests]
    engine = make_engine(model, adapters_root(tiny_adapters))
    got = generate(engine, requests, join_at)
    for (adapter, prompt, n), tokens in zip(requests, got):
        want = peft_greedy(model, tiny_adapters[adapter] if adapter else None, prompt, n)
        assert tokens == want, f"adapter {adapter}, prompt length {len(prompt)}"
    assert engine.scheduler.plan.kv_pages == 0


def test_adapters_change_outputs(tiny_models, tiny_adapters):
    """Guards the oracle test above: the adapters really act (outputs differ from the base model)."""
    model = tiny_models["llama_gqa"]
    prompt = list(range(10, 30))
    engine = make_engine(model, adapters_root(tiny_adapters))
    outs = generate(engine, [(None, prompt, 8)] + [(a, prompt, 8) for a in ("r16_all", "r8_mlp", "r3_attn")])
    assert all(o != outs[0] for o in outs[1:])


def test_preemption_keeps_outputs_exact(tiny_models, tiny_adapters):
    """A pool that cannot hold every sequence: preempted sequences are recomputed and still exact."""
    model = tiny_models["llama_gqa"]
    rng = random.Random(1)
    requests = [(a, _prompt(rng, 12), 24) for a in ("r3_attn", None, "r8_k", "r3_attn", None, "r2_q")]
    page_bytes = 2 * (2 * 2 * 16) * 4  # layers * (K and V of 2 kv heads of 16) * float32
    small = make_engine(model, adapters_root(tiny_adapters), pool_bytes=200 * page_bytes)
    got = generate(small, requests)
    assert small.scheduler.preemptions > 0
    big = make_engine(model, adapters_root(tiny_adapters))
    assert got == generate(big, requests)
    small.scheduler.plan.check()


def test_bfloat16_agrees_with_float32(tiny_models, tiny_adapters):
    """bfloat16 completes, and given the float32 run's prefixes it picks the same next token
    almost always (free-running tokens diverge for good after the first near-tie)."""
    model = tiny_models["llama_gqa"]
    rng = random.Random(2)
    requests = [(a, _prompt(rng, 10), 16) for a in ("r16_all", "r8_mlp", None, "r3_attn")]
    f32 = generate(make_engine(model, adapters_root(tiny_adapters)), requests)
    bf16_engine = make_engine(model, adapters_root(tiny_adapters), dtype="bfloat16")
    assert all(len(t) == 16 for t in generate(bf16_engine, requests))
    prefixes = [(a, p + out[:k], 1) for (a, p, _), out in zip(requests, f32) for k in range(len(out))]
    wanted = [out[k] for out in f32 for k in range(len(out))]
    got = [t[0] for t in generate(bf16_engine, prefixes)]
    same = sum(g == w for g, w in zip(got, wanted))
    assert same >= 0.9 * len(wanted), f"bfloat16 picks float32's next token {same}/{len(wanted)} times"


def test_float16_runs(tiny_models, tiny_adapters):
    requests = [("r16_all", [10, 11, 12], 6), (None, [13, 14], 6)]
    engine = make_engine(tiny_models["llama_gqa"], adapters_root(tiny_adapters), dtype="float16")
    assert engine.executor.worker.pool.pages.dtype == torch.float16
    assert [len(t) for t in generate(engine, requests)] == [6, 6]


@pytest.mark.parametrize("name", ["llama_mha", "qwen2", "llama3_rope", "mistral", "sharded"])
def test_model_families_equal_transformers(tiny_models, name):
    model = tiny_models[name]
    rng = random.Random(3)
    requests = [(None, _prompt(rng, n), 10) for n in (1, 7, 33)]
    got = generate(make_engine(model), requests)
    for (_, prompt, n), tokens in zip(requests, got):
        assert tokens == peft_greedy(model, None, prompt, n)


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_models, tiny_adapters):
    from lorafleet.coordinator.sequence import Request
    from lorafleet.worker.step import SamplingParams

    model = tiny_models["llama_gqa"]
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234)

    def sample(extra: int) -> list[int]:
        engine = make_engine(model, adapters_root(tiny_adapters))
        for i in range(extra):
            add(engine, Request(f"x{i}", [5 + i] * (3 + i), 6, "r8_mlp", ignore_eos=True))
        seq = add(engine, Request("s", [9, 8, 7], 12, "r16_all", params, ignore_eos=True))
        while engine.has_work():
            engine.step()
        return seq.output_ids

    alone, crowded = sample(0), sample(5)
    assert alone == crowded
    assert alone != generate(make_engine(model, adapters_root(tiny_adapters)), [("r16_all", [9, 8, 7], 12)])[0]
    assert torch.tensor(alone).unique().numel() > 1


def test_separate_pools_ablation_is_exact(tiny_models, tiny_adapters):
    """S-LoRA's no-unify-mem ablation (adapters in their own part of the pool) changes memory use, not tokens."""
    model = tiny_models["llama_gqa"]
    rng = random.Random(4)
    requests = [(a, _prompt(rng, 8), 10) for a in ("r16_all", "r8_mlp", None, "r3_attn", "r2_q")]
    unified = generate(make_engine(model, adapters_root(tiny_adapters)), requests)
    engine = make_engine(model, adapters_root(tiny_adapters), page_plan=separate_pools(0.5))
    assert isinstance(engine.scheduler.plan, SeparatePoolsPlan)
    assert generate(engine, requests) == unified
    engine.scheduler.plan.check()
