"""The prefix cache on the engine: requests that share a prefix under the same adapter reuse its
KV (and compute only the rest), give the tokens they give without the cache (and PEFT's), and
never reuse KV across adapters or across an adapter's weights."""
from __future__ import annotations

import random
import shutil

from engines import add, adapters_root, generate, make_engine, record_steps
from peers import peft_greedy

from lorafleet.coordinator.adapters import AdapterState
from lorafleet.coordinator.sequence import Request

SYSTEM = 40  # tokens of the shared "system prompt"


def _prompts(seed: int, users: int) -> tuple[list[int], list[list[int]]]:
    """A system prompt and `users` prompts that extend it, each user turn with its own first token
    (so a user prompt shares exactly the system prompt with the others)."""
    rng = random.Random(seed)
    system = [rng.randrange(3, 250) for _ in range(SYSTEM)]
    firsts = rng.sample(range(3, 250), users)
    return system, [system + [first] + [rng.randrange(3, 250) for _ in range(rng.randrange(2, 12))] for first in firsts]


def _computed(steps, seq_id: int, prompt_len: int = 0) -> tuple[int, int]:
    """(tokens found cached when the sequence started, tokens of its prompt it ran)."""
    works = [w for s in steps for w in s.seqs if w.seq_id == seq_id]
    first = next(w for w in works if w.prefix is not None)
    return first.start, sum(len(w.token_ids) for w in works if w.start < prompt_len)


def test_shared_prefix_reuses_its_kv_and_gives_the_same_tokens(tiny_models, tiny_adapters):
    """Three tenants (two adapters and the base model), each with four users that share its
    system prompt, with a step budget of 16 so prompts are also prefilled in chunks: every request
    gives the tokens it gives with --no-prefix-cache and PEFT's; each tenant's first request
    computes its whole prompt, and the others only what follows the system prompt."""
    model = tiny_models["llama_gqa"]
    requests, join_at = [], []
    for t, adapter in enumerate(["r16_all", None, "r3_attn"]):
        _, users = _prompts(20 + t, 4)
        requests += [(adapter, prompt, 5) for prompt in users]
        join_at += [t, 8, 9, 14]  # each tenant's first, then users that join while others decode
    cached = make_engine(model, adapters_root(tiny_adapters), max_batched_tokens=16)
    steps = record_steps(cached)
    got = generate(cached, requests, join_at)
    plain = make_engine(model, adapters_root(tiny_adapters), max_batched_tokens=16, prefix_cache=False)
    assert generate(plain, requests, join_at) == got
    assert plain.scheduler.plan.cache_pages == 0
    for (adapter, prompt, n), tokens in zip(requests, got):
        assert tokens == peft_greedy(model, tiny_adapters[adapter] if adapter else None, prompt, n)
    seq_ids = {i: k for k, i in enumerate(sorted(range(len(requests)), key=lambda i: (join_at[i], i)))}  # in order added
    for i, (adapter, prompt, _) in enumerate(requests):
        hit, ran = _computed(steps, seq_ids[i], len(prompt))
        if i % 4 == 0:
            assert (hit, ran) == (0, len(prompt)), f"request {i}"
        else:
            assert (hit, ran) == (SYSTEM, len(prompt) - SYSTEM), f"request {i}: {hit} cached, {ran} computed"
    counts = cached.scheduler.prefix_tokens
    assert counts["r16_all"] == [sum(len(p) for a, p, _ in requests if a == "r16_all"), 3 * SYSTEM]
    assert counts[None][1] == 3 * SYSTEM
    plan = cached.scheduler.plan
    plan.check()
    assert plan.kv_pages == 0 and plan.cache_pages > 0 and plan.cache.idle_pages == plan.cache_pages
    plan.clear_cache()
    while plan.evict_idle_adapter():
        pass
    assert plan.free_pages == plan.num_pages


def test_the_same_prefix_under_another_adapter_does_not_hit(tiny_models, tiny_adapters):
    """One prompt under r16_all, then the base model, then r3_attn, then r16_all again: only the
    last finds it cached (and its prompt's KV but for the last token)."""
    model = tiny_models["llama_gqa"]
    _, (prompt,) = _prompts(30, 1)
    engine = make_engine(model, adapters_root(tiny_adapters))
    steps = record_steps(engine)
    order = ["r16_all", None, "r3_attn", "r16_all"]
    got = generate(engine, [(a, prompt, 4) for a in order], join_at=[0, 6, 12, 18])
    assert [_computed(steps, i)[0] for i in range(4)] == [0, 0, 0, len(prompt) - 1]
    for adapter, tokens in zip(order, got):
        assert tokens == peft_greedy(model, tiny_adapters[adapter] if adapter else None, prompt, 4)


def _run_one(engine, steps, adapter, prompt, n=4) -> tuple[list[int], int]:
    """Runs one request to completion; returns its tokens and how many of its tokens were cached."""
    seq = add(engine, Request(f"r{len(steps)}", list(prompt), n, adapter, ignore_eos=True))
    for _ in range(100):
        if not engine.has_work():
            break
        engine.step()
    return seq.output_ids, _computed(steps, seq.seq_id)[0]


def test_an_adapter_reloaded_with_new_weights_does_not_hit(tiny_models, same_size_adapters, tmp_path):
    """The KV cached under an adapter is reused only while its weights are the same (vllm#42125):
    - unloaded and loaded again with other weights under the same name: no hit, the new weights' tokens;
    - its host copy dropped for room, then its files rewritten: read again, no hit;
    - its host copy dropped for room, its files unchanged: read again, the cached KV is found."""
    model = tiny_models["llama_gqa"]
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(same_size_adapters / "s0", root / "x")
    shutil.copytree(same_size_adapters / "s2", root / "other")
    _, (prompt,) = _prompts(31, 1)
    engine = make_engine(model, root)
    one_copy = engine.ensure_adapter("x").info.host_bytes  # host memory for one adapter: reading another drops x
    engine = make_engine(model, root, host_cache_bytes=one_copy)
    steps = record_steps(engine)

    def rewrite(source: str) -> None:
        shutil.rmtree(root / "x")
        shutil.copytree(same_size_adapters / source, root / "x")

    tokens, hit = _run_one(engine, steps, "x", prompt)
    assert hit == 0 and tokens == peft_greedy(model, same_size_adapters / "s0", prompt, 4)
    assert _run_one(engine, steps, "x", prompt)[1] == len(prompt) - 1  # the same weights: found

    engine.adapters.start_unload("x")
    assert engine.unload_ready("x")
    rewrite("s1")
    tokens, hit = _run_one(engine, steps, "x", prompt)
    assert hit == 0 and tokens == peft_greedy(model, same_size_adapters / "s1", prompt, 4)

    _run_one(engine, steps, "other", prompt)  # x's host copy makes room for this one
    assert engine.adapters.get("x").state == AdapterState.DISK
    rewrite("s3")
    tokens, hit = _run_one(engine, steps, "x", prompt)
    assert hit == 0 and tokens == peft_greedy(model, same_size_adapters / "s3", prompt, 4)

    _run_one(engine, steps, "other", prompt)
    tokens, hit = _run_one(engine, steps, "x", prompt)  # read again, the same files as before
    assert hit == len(prompt) - 1 and tokens == peft_greedy(model, same_size_adapters / "s3", prompt, 4)
    engine.scheduler.plan.check()
