"""Page accounting under random admit / step / cancel sequences, with preemption and prompts
prefilled in chunks (property-based).

The worker's own page tables (worker.step.PageTables) are rebuilt from the Steps alone, so the
test also checks that the Step contract keeps every rank's view of the pool equal to the scheduler's.
"""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from bench.ablations import SeparatePoolsPlan

from lorafleet.coordinator.pages import PagePlan
from lorafleet.coordinator.scheduler import RequestTooLarge, Scheduler, SchedulerConfig
from lorafleet.coordinator.sequence import Request, Status
from lorafleet.worker.step import PageTables

ADAPTER_PAGES = {"a": 3, "b": 5, "c": 8, "d": 2}
EOS = 0


def check_consistent(sched: Scheduler, mirror: PageTables, step):
    sched.plan.check()
    running = {s.seq_id for s in sched.running}
    for w in step.seqs:
        assert mirror.seq_pages[w.seq_id] == sched.plan.seq_pages[w.seq_id]
        assert len(w.new_pages) == len(w.token_ids)
    assert set(sched.plan.seq_pages) == running
    for name, entry in sched.plan.adapters.items():
        if any(s.adapter == name for s in sched.running):
            assert mirror.adapter_pages[name] == entry.pages
        assert entry.users == sum(1 for s in sched.running if s.adapter == name)


def check_chunks(sched: Scheduler, step, max_batched_tokens: int):
    """Decodes first, then chunks within the budget; each chunk continues where its sequence stands."""
    decodes = [w for w in step.seqs if w.start > 0 and len(w.token_ids) == 1]
    assert sum(len(w.token_ids) for w in step.seqs) <= max(max_batched_tokens, len(decodes))
    for w in step.seqs:
        seq = next(s for s in sched.running if s.seq_id == w.seq_id)
        assert seq.computed == w.start + len(w.token_ids) <= seq.total_len
        assert w.token_ids == seq.tokens[w.start:w.start + len(w.token_ids)]
    assert len({w.seq_id for w in step.seqs}) == len(step.seqs)


op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 10), st.sampled_from([None, "a", "b", "c", "d"])),
    st.tuples(st.just("step")),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=80), num_pages=st.integers(20, 60), seed=st.integers(0, 2**16),
       adapter_capacity=st.one_of(st.none(), st.integers(8, 16)), max_batched_tokens=st.sampled_from([3, 8, 24]))
def test_pages_never_shared_or_leaked(ops, num_pages, seed, adapter_capacity, max_batched_tokens):
    """Unified pool, and the separate-pools ablation (adapter_capacity pages for adapters only);
    prompts up to 40 tokens with a step budget of 3 to 24 tokens, so most prompts take several chunks."""
    rng = random.Random(seed)
    plan = PagePlan(num_pages) if adapter_capacity is None else SeparatePoolsPlan(num_pages, adapter_capacity_pages=adapter_capacity)
    sched = Scheduler(SchedulerConfig(max_num_seqs=6, max_batched_tokens=max_batched_tokens, max_model_len=64),
                      plan, eos_ids=(EOS,), adapter_pages=dict(ADAPTER_PAGES))
    mirror, seqs, by_id = PageTables(), [], {}

    def run_step():
        step = sched.schedule()
        mirror.apply(step)  # raises StepError if the Steps disagree with each other
        for name, pages in step.load_adapters.items():
            assert len(pages) == ADAPTER_PAGES[name]
        check_consistent(sched, mirror, step)
        check_chunks(sched, step, max_batched_tokens)
        final = {w.seq_id for w in step.seqs if w.start + len(w.token_ids) == by_id[w.seq_id].total_len}
        outputs = sched.postprocess([rng.choice([EOS, 1, 2, 3, 4, 5]) for _ in step.seqs])
        assert sorted(o.seq.seq_id for o in outputs) == sorted(final)  # no token for a chunk before the last
        sched.plan.check()

    for o in ops:
        if o[0] == "add":
            try:
                seqs.append(sched.add(Request(str(len(seqs)), [7] * o[1], o[2], o[3])))
                by_id[seqs[-1].seq_id] = seqs[-1]
            except RequestTooLarge:
                pass
        elif o[0] == "cancel" and seqs:
            sched.abort(seqs[o[1] % len(seqs)])
            sched.plan.check()
        else:
            run_step()
    for _ in range(2000):  # drain: every request ends, bounded
        if not (sched.waiting or sched.running):
            break
        run_step()
    run_step()  # hands the last finished ids to the worker
    assert not sched.waiting and not sched.running
    assert all(s.status == Status.FINISHED for s in seqs)
    assert sched.plan.kv_pages == 0 and not mirror.seq_pages
    assert all(a.users == 0 for a in sched.plan.adapters.values())
    while sched.plan.evict_idle_adapter():
        pass
    assert sched.plan.free_pages == num_pages


def test_preemption_requeues_and_recomputes():
    """A pool too small for everyone: the newest sequence is preempted and later recomputed from 0."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=64, max_model_len=64),
                      PagePlan(14), adapter_pages={})
    a = sched.add(Request("a", [1] * 4, 6, ignore_eos=True))
    b = sched.add(Request("b", [1] * 4, 6, ignore_eos=True))
    starts = []
    for _ in range(40):
        if not (sched.waiting or sched.running):
            break
        step = sched.schedule()
        starts += [(w.seq_id, w.start) for w in step.seqs]
        sched.postprocess([5] * len(step.seqs))
        sched.plan.check()
    assert a.finish_reason == b.finish_reason == "length"
    assert len(a.output_ids) == len(b.output_ids) == 6
    assert b.preemptions >= 1 and a.preemptions == 0
    restarts = [s for s in starts if s[0] == b.seq_id and s[1] == 0]
    assert len(restarts) == 1 + b.preemptions


def test_request_larger_than_pool_is_refused():
    sched = Scheduler(SchedulerConfig(max_model_len=4096), PagePlan(16), adapter_pages={"big": 10})
    try:
        sched.add(Request("x", [1] * 4, 4, adapter="big"))
    except RequestTooLarge as e:
        assert "pool has only 16" in str(e)
    else:
        raise AssertionError("a request that cannot fit the pool was accepted")
