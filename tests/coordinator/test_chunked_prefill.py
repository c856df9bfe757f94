"""Chunked prefill on the engine: prompts longer than max_batched_tokens are prefilled over
several steps, mixed with the decodes of running streams, and their tokens equal PEFT's."""
from __future__ import annotations

import random

from engines import add, adapters_root, generate, make_engine, record_steps
from peers import peft_greedy

from lorafleet.coordinator.sequence import Request

BUDGET = 16  # max_batched_tokens: the long prompts below are 2-3x this


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 250) for _ in range(n)]


def test_long_prompts_equal_peft_while_others_decode(tiny_models, tiny_adapters):
    """Prompts of 48, 40 and 33 tokens (budget 16) join while short requests decode, with and
    without adapters: every token equals PEFT's, and no step runs more than 16 tokens."""
    model = tiny_models["llama_gqa"]
    rng = random.Random(14)
    requests = [("r16_all", _prompt(rng, 5), 30), (None, _prompt(rng, 3), 24),
                ("r3_attn", _prompt(rng, 48), 6), (None, _prompt(rng, 40), 5), ("r8_mlp", _prompt(rng, 33), 4)]
    join_at = [0, 0, 3, 4, 4]
    engine = make_engine(model, adapters_root(tiny_adapters), max_batched_tokens=BUDGET)
    steps = record_steps(engine)
    got = generate(engine, requests, join_at)
    for (adapter, prompt, n), tokens in zip(requests, got):
        assert tokens == peft_greedy(model, tiny_adapters[adapter] if adapter else None, prompt, n), \
            f"adapter {adapter}, prompt length {len(prompt)}"
    assert max(sum(len(w.token_ids) for w in s.seqs) for s in steps) <= BUDGET
    continued = [w for s in steps for w in s.seqs if w.start > 0 and len(w.token_ids) > 1]
    assert continued, "no prompt was continued in a later chunk"
    mixed = [s for s in steps if any(len(w.token_ids) > 1 for w in s.seqs) and any(len(w.token_ids) == 1 for w in s.seqs)]
    assert mixed, "no step mixed a chunk with decodes"
    assert engine.scheduler.plan.kv_pages == 0
    engine.scheduler.plan.check()


def test_running_stream_gets_a_token_every_step_during_a_long_prefill(tiny_models):
    """A 48-token prompt arrives while a stream decodes (budget 16): the stream gets exactly one
    token in every step, the prompt's first token comes only after 4 chunks (15 + 15 + 15 + 3,
    one token of each step going to the stream), and a prompt prefilled whole in one step
    (budget 64) would have given its first token in the first step."""
    model = tiny_models["llama_gqa"]
    rng = random.Random(15)
    stream_prompt, long_prompt = _prompt(rng, 4), _prompt(rng, 48)

    def run(budget: int) -> tuple[list[int], int, list[int], list[int]]:
        engine = make_engine(model, max_batched_tokens=budget)
        stream = add(engine, Request("stream", stream_prompt, 40, ignore_eos=True))
        for _ in range(3):
            engine.step()
        assert len(stream.output_ids) == 3
        long = add(engine, Request("long", long_prompt, 3, ignore_eos=True))
        per_step, steps_to_first = [], None
        for k in range(1, 20):
            before = len(stream.output_ids)
            outputs = engine.step()
            per_step.append(len(stream.output_ids) - before)
            assert sum(1 for o in outputs if o.seq is stream) == per_step[-1]
            if long.output_ids:
                steps_to_first = k
                break
        for _ in range(100):  # both run to their end
            if not engine.has_work():
                break
            engine.step()
        return per_step, steps_to_first, long.output_ids, stream.output_ids

    per_step, steps_to_first, long_tokens, stream_tokens = run(BUDGET)
    assert steps_to_first == 4
    assert per_step == [1] * steps_to_first
    assert long_tokens == peft_greedy(model, None, long_prompt, 3)
    assert stream_tokens == peft_greedy(model, None, stream_prompt, 40)
    whole_steps, whole_first, whole_long, whole_stream = run(64)
    assert whole_first == 1 and whole_steps == [1]
    assert (whole_long, whole_stream) == (long_tokens, stream_tokens)


def test_prompt_up_to_the_context_is_accepted(tiny_models):
    """max_batched_tokens no longer bounds the prompt: a prompt near the model's context (512)
    runs; prompt + max_new_tokens beyond the context is still refused."""
    from lorafleet.coordinator.scheduler import RequestTooLarge

    model = tiny_models["llama_gqa"]
    engine = make_engine(model, max_batched_tokens=BUDGET, pool_bytes=32 * 2**20)
    prompt = _prompt(random.Random(16), 500)
    assert generate(engine, [(None, prompt, 2)]) == [peft_greedy(model, None, prompt, 2)]
    try:
        engine.add(Request("x", prompt, 13, ignore_eos=True))
    except RequestTooLarge as e:
        assert "context of 512" in str(e)
    else:
        raise AssertionError("a request longer than the context was accepted")


def test_preempting_a_partly_prefilled_sequence_keeps_outputs_exact(tiny_models, tiny_adapters):
    """Two streams decode in a pool of 80 pages when a 60-token prompt arrives (budget 16): it is
    admitted (its pages are free then), but the streams' growth fills the pool before its last
    chunk, so it is preempted in the middle of its prefill and recomputed from 0 later. Every
    token equals PEFT's and every page is free at the end."""
    model = tiny_models["llama_gqa"]
    rng = random.Random(17)
    requests = [(None, _prompt(rng, 4), 60), ("r8_k", _prompt(rng, 4), 60), ("r3_attn", _prompt(rng, 60), 5)]
    join_at = [0, 0, 3]
    page_bytes = 2 * (2 * 2 * 16) * 4  # layers * (K and V of 2 kv heads of 16) * float32
    adapter_pages = sum(info.num_pages for name in ("r8_k", "r3_attn")
                        for info in make_engine(model, adapters_root(tiny_adapters)).read_adapter(name, tiny_adapters[name]))
    small = make_engine(model, adapters_root(tiny_adapters), pool_bytes=(80 + adapter_pages) * page_bytes,
                        max_batched_tokens=BUDGET)
    partial, real = [], small.scheduler._preempt

    def preempt(seq):
        if 0 < seq.computed < seq.total_len - 1:
            partial.append(seq.seq_id)
        real(seq)

    small.scheduler._preempt = preempt
    got = generate(small, requests, join_at)
    assert partial, "no sequence was preempted during its prefill"
    for (adapter, prompt, n), tokens in zip(requests, got):
        assert tokens == peft_greedy(model, tiny_adapters[adapter] if adapter else None, prompt, n)
    assert small.scheduler.plan.kv_pages == 0
    small.scheduler.plan.check()
