"""Page accounting under random admit / step / cancel / reload sequences, with preemption, prompts
prefilled in chunks and the prefix cache (property-based).

The worker's own page tables (worker.step.PageTables) are rebuilt from the Steps alone, so the
test also checks that the Step contract keeps every rank's view of the pool equal to the scheduler's.
A model of the pool's contents (what each page's KV was computed from) checks that every page a
sequence reads, its own or the cache's, holds the KV of its own tokens under its own adapter version.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.ablations import SeparatePoolsPlan

from lorafleet.coordinator.pages import FreePages, PageAccountingError, PagePlan
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


def check_contents(sched: Scheduler, mirror: PageTables, step, kv: dict[int, tuple], weights: dict[str | None, int]):
    """Writes this step's KV into the model of the pool, then checks what every scheduled sequence
    reads. weights: each adapter's weights now (the test's own count of reloads)."""
    by_id = {s.seq_id: s for s in sched.running}
    for w in step.seqs:
        seq = by_id[w.seq_id]
        for j, page in enumerate(w.new_pages):
            kv[page] = (seq.adapter, weights.get(seq.adapter), tuple(seq.tokens[:w.start + j + 1]))
    for w in step.seqs:
        seq = by_id[w.seq_id]
        for i, page in enumerate(mirror.seq_pages[w.seq_id]):
            assert kv.get(page) == (seq.adapter, weights.get(seq.adapter), tuple(seq.tokens[:i + 1])), \
                f"sequence {w.seq_id} reads a wrong KV at {i}"
        if w.prefix is not None:
            assert w.start == len(w.prefix) == seq.cached_tokens < seq.total_len


def check_chunks(sched: Scheduler, step, max_batched_tokens: int):
    """Decodes first, then chunks within the budget; each chunk continues where its sequence stands."""
    decodes = [w for w in step.seqs if w.start > 0 and len(w.token_ids) == 1]
    assert sum(len(w.token_ids) for w in step.seqs) <= max(max_batched_tokens, len(decodes))
    for w in step.seqs:
        seq = next(s for s in sched.running if s.seq_id == w.seq_id)
        assert seq.computed == w.start + len(w.token_ids) <= seq.total_len
        assert w.token_ids == seq.tokens[w.start:w.start + len(w.token_ids)]
    assert len({w.seq_id for w in step.seqs}) == len(step.seqs)


FAMILIES = ([7] * 40, list(range(10, 50)), [7] * 10 + list(range(60, 90)))  # prompts share their prefixes

op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 40), st.integers(1, 10), st.sampled_from([None, "a", "a", "a", "b", "c", "d"]),
              st.integers(0, len(FAMILIES) - 1), st.integers(0, 4), st.integers(0, 6)),
    st.tuples(st.just("step")),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("reload"), st.sampled_from(["a", "b", "c", "d"]), st.booleans()),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=80), num_pages=st.integers(20, 120), seed=st.integers(0, 2**16),
       adapter_capacity=st.one_of(st.none(), st.integers(8, 16)), max_batched_tokens=st.sampled_from([3, 8, 24]),
       prefix_cache=st.booleans(), adapter_affinity=st.sampled_from([0, 0, 1, 3]))
def test_pages_never_shared_or_leaked(ops, num_pages, seed, adapter_capacity, max_batched_tokens, prefix_cache, adapter_affinity):
    run_ops(ops, num_pages, seed, adapter_capacity, max_batched_tokens, prefix_cache, adapter_affinity)


@pytest.mark.parametrize("seed", range(12))
def test_long_runs_with_shared_prefixes(seed):
    """Hypothesis keeps its examples short; these runs are long (400 operations), so that prefixes
    are cached, found, evicted and found again under reloaded adapters many times over."""
    rng = random.Random(seed)
    ops = []
    for _ in range(400):
        kind = rng.choices(["add", "step", "cancel", "reload"], [4, 4, 1, 1])[0]
        if kind == "add":
            ops.append(("add", rng.randint(0, 40), rng.randint(1, 10), rng.choice([None, "a", "a", "b", "c", "d"]),
                        rng.randrange(len(FAMILIES)), rng.randint(0, 4), rng.randint(0, 6)))
        elif kind == "cancel":
            ops.append(("cancel", rng.randint(0, 50)))
        elif kind == "reload":
            ops.append(("reload", rng.choice("abcd"), rng.random() < 0.5))
        else:
            ops.append(("step",))
    hits = run_ops(ops, num_pages=rng.choice([40, 80, 160]), seed=seed, adapter_capacity=rng.choice([None, 12]),
                   max_batched_tokens=rng.choice([3, 8, 24]), prefix_cache=True, adapter_affinity=rng.choice([0, 2]))
    assert hits > 10  # the run exercised the cache


def run_ops(ops, num_pages, seed, adapter_capacity, max_batched_tokens, prefix_cache, adapter_affinity=0) -> int:
    """Runs the operations and checks the pool after each; returns the prompt tokens found cached.

    Unified pool, and the separate-pools ablation (adapter_capacity pages for adapters only);
    prompts up to 44 tokens, most sharing a prefix with others, with a step budget of 3 to 24
    tokens, so most prompts take several chunks; the prefix cache on and off; first come first
    served or with adapter affinity (no request passed over in more steps than it allows). "reload" gives an
    idle adapter new weights (a new content version), as unloading and loading it again does, or
    as reading new files does after its host copy was dropped for room (its cached KV stays)."""
    rng = random.Random(seed)
    plan = PagePlan(num_pages) if adapter_capacity is None else SeparatePoolsPlan(num_pages, adapter_capacity_pages=adapter_capacity)
    sched = Scheduler(SchedulerConfig(max_num_seqs=6, max_batched_tokens=max_batched_tokens, max_model_len=64,
                                      prefix_cache=prefix_cache, adapter_affinity=adapter_affinity),
                      plan, eos_ids=(EOS,), adapter_pages=dict(ADAPTER_PAGES), adapter_versions=dict.fromkeys(ADAPTER_PAGES, "v0"))
    mirror, seqs, by_id, kv, weights = PageTables(), [], {}, {}, dict.fromkeys(ADAPTER_PAGES, 0)

    def run_step():
        step = sched.schedule()
        mirror.apply(step)  # raises StepError if the Steps disagree with each other
        for name, pages in step.load_adapters.items():
            assert len(pages) == ADAPTER_PAGES[name]
        check_consistent(sched, mirror, step)
        check_chunks(sched, step, max_batched_tokens)
        check_contents(sched, mirror, step, kv, weights)
        assert all(s.passed_over <= adapter_affinity for s in sched.waiting)
        final = {w.seq_id for w in step.seqs if w.start + len(w.token_ids) == by_id[w.seq_id].total_len}
        outputs = sched.postprocess([rng.choice([EOS, 1, 2, 3, 4, 5]) for _ in step.seqs])
        assert sorted(o.seq.seq_id for o in outputs) == sorted(final)  # no token for a chunk before the last
        sched.plan.check()

    for o in ops:
        if o[0] == "add":
            _, cut, max_new, adapter, family, extra, steps = o
            prompt = FAMILIES[family][:cut] + [rng.randrange(1, 100) for _ in range(extra)] or [7]
            try:
                seqs.append(sched.add(Request(str(len(seqs)), prompt, max_new, adapter)))
                by_id[seqs[-1].seq_id] = seqs[-1]
            except RequestTooLarge:
                pass
            for _ in range(steps):
                run_step()
        elif o[0] == "cancel" and seqs:
            sched.abort(seqs[o[1] % len(seqs)])
            sched.plan.check()
        elif o[0] == "reload" and not any(s.adapter == o[1] for s in [*sched.waiting, *sched.running]):
            sched.unload_adapter(o[1], forget_prefixes=o[2])  # False: a host copy dropped, then new files read
            sched.adapter_pages[o[1]] = ADAPTER_PAGES[o[1]]
            weights[o[1]] += 1
            sched.adapter_versions[o[1]] = f"v{weights[o[1]]}"
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
    assert sched.plan.cache.idle_pages == sched.plan.cache_pages  # no one reads the cache now
    if not prefix_cache:
        assert sched.plan.cache_pages == 0
    while sched.plan.evict_idle_adapter():
        pass
    sched.plan.clear_cache()
    sched.plan.check()
    assert sched.plan.free_pages == num_pages and not sched.plan.cache.roots
    return sum(hit for _, hit in sched.prefix_tokens.values())


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_preemption_requeues_and_recomputes(prefix_cache):
    """A pool too small for everyone: the newest sequence is preempted and later recomputed, from 0
    without the prefix cache; with it, from the longest prefix of its tokens still cached."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=64, max_model_len=64, prefix_cache=prefix_cache),
                      PagePlan(14), adapter_pages={})
    a = sched.add(Request("a", [1] * 4, 6, ignore_eos=True))
    b = sched.add(Request("b", [2] * 4, 6, ignore_eos=True))
    starts = []
    for _ in range(40):
        if not (sched.waiting or sched.running):
            break
        step = sched.schedule()
        starts += [(w.seq_id, w.start) for w in step.seqs if w.prefix is not None]
        sched.postprocess([5] * len(step.seqs))
        sched.plan.check()
    assert a.finish_reason == b.finish_reason == "length"
    assert len(a.output_ids) == len(b.output_ids) == 6
    assert b.preemptions >= 1 and a.preemptions == 0
    restarts = [start for seq_id, start in starts if seq_id == b.seq_id]
    assert len(restarts) == 1 + b.preemptions
    assert restarts[0] == 0 and (max(restarts[1:]) > 0) == prefix_cache


def test_sequences_take_the_lowest_pages_and_adapters_the_highest_run():
    """KV from the bottom, adapters from the top, each adapter in one run of pages where one is free
    (the CPU kernels read it at one address); where none is long enough, the highest free pages."""
    plan = PagePlan(20)
    plan.start_seq(1)
    assert plan.grow(1, 6) == [0, 1, 2, 3, 4, 5]
    plan.start_seq(2)
    assert plan.grow(2, 4) == [6, 7, 8, 9]
    plan.release_seq(1)
    assert plan.place_adapter("a", 6) == [14, 15, 16, 17, 18, 19]
    assert plan.place_adapter("b", 3) == [11, 12, 13]
    assert plan.has_adapter_run(6) and not plan.has_adapter_run(7)  # free: 0-5 and 10
    assert plan.place_adapter("c", 7) == [0, 1, 2, 3, 4, 5, 10]
    plan.check()
    plan.drop_adapter("a")
    plan.start_seq(3)
    assert plan.grow(3, 2) == [14, 15]  # sequences take what is lowest, adapter pages too
    plan.check()


def test_free_pages_skip_what_adapters_took_and_refuse_a_double_free():
    free = FreePages(range(3000), 3000)
    assert free.take(2) == [0, 1]
    assert free.take_run(2500) == list(range(500, 3000))
    free.extend([1, 2999])  # the heap now holds entries mostly for pages adapters took: it is rebuilt
    assert len(free) == 500 and list(free) == list(range(1, 500)) + [2999]
    assert free.take(3) == [1, 2, 3]
    with pytest.raises(PageAccountingError, match="498 pages taken where 497 are free"):
        free.take_run(498)
    assert free.take_run(497) == list(range(4, 500)) + [2999]  # no run of 497: the highest free pages
    assert len(free) == 0 and not free.has_run(1)
    with pytest.raises(PageAccountingError, match="page 7 is freed twice"):
        free.extend([7, 7])
    assert free.run_if_freed([10, 11], 3) is False and free.run_if_freed([8, 9], 3) is True  # 7 is free


def test_an_idle_adapter_leaves_the_pool_to_make_a_run():
    """Enough pages are free but no run of them is long enough: the least recently used idle adapter
    whose pages would make one leaves (the Step names it); one in use, or one that would leave no
    run, stays."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=64, max_model_len=32), PagePlan(24),
                      adapter_pages={"a": 4, "b": 4, "c": 4, "d": 5})
    plan = sched.plan
    assert plan.place_adapter("a", 4) == [20, 21, 22, 23]
    assert plan.place_adapter("b", 4) == [16, 17, 18, 19]
    for holder in range(1000, 1008):  # pages 0-15 held two by two, then every other pair given back
        plan.start_seq(holder)
        plan.grow(holder, 2)
    for holder in range(1000, 1008, 2):
        plan.release_seq(holder)
    assert len(plan.free) == 8 and not plan.has_adapter_run(4)
    plan.use_adapter("a")  # in use: it must stay
    assert plan.evict_idle_adapter(run=5) is None  # b's 4 pages next to a's would leave no run of 5
    sched.add(Request("x", [1, 2], 4, "c"))
    step = sched.schedule()
    assert step.evicted_adapters == ["b"]
    assert step.load_adapters == {"c": [16, 17, 18, 19]}
    assert [w.new_pages for w in step.seqs] == [[0, 1]]
    plan.check()


def test_adapters_stay_in_runs_under_churn():
    """A serving-like churn: 300 adapters of 8 or 16 pages, a pool that holds about 20 of them beside the
    KV of 16 running sequences and the prefix cache, requests arriving, finishing and being cancelled
    for 3000 steps. Nearly every adapter placed lands in one run (1460 of 1530; with the sorted pages
    of a last-freed-first list that came before, 33 of 1478)."""
    rng = random.Random(7)
    pages = {f"ad{i}": (8, 16)[i % 2] for i in range(300)}
    sched = Scheduler(SchedulerConfig(max_num_seqs=16, max_batched_tokens=128, max_model_len=64, prefix_cache=True),
                      PagePlan(700), eos_ids=(EOS,), adapter_pages=dict(pages))
    placed = one_run = 0
    for i in range(3000):
        if rng.random() < 0.6 and len(sched.waiting) < 32:
            prompt = [rng.randrange(1, 100) for _ in range(rng.randint(4, 30))]
            seq = sched.add(Request(str(i), prompt, rng.randint(4, 20), rng.choice(list(pages)), ignore_eos=True))
            if rng.random() < 0.05:
                sched.abort(seq)
        step = sched.schedule()
        for name, got in step.load_adapters.items():
            placed += 1
            one_run += got == list(range(got[0], got[0] + len(got)))
        sched.postprocess([rng.randrange(1, 100) for _ in step.seqs])
        if i % 500 == 0:
            sched.plan.check()
    assert placed > 1000
    assert one_run / placed > 0.9, f"{one_run} of {placed} adapters in one run of pages"


def test_request_larger_than_pool_is_refused():
    sched = Scheduler(SchedulerConfig(max_model_len=4096), PagePlan(16), adapter_pages={"big": 10})
    try:
        sched.add(Request("x", [1] * 4, 4, adapter="big"))
    except RequestTooLarge as e:
        assert "pool has only 16" in str(e)
    else:
        raise AssertionError("a request that cannot fit the pool was accepted")


@pytest.mark.parametrize("affinity", [0, 3])
def test_adapter_affinity_prefers_adapters_in_the_batch_for_a_bounded_wait(affinity):
    """One admission per step (max_num_seqs frees one slot at a time): with affinity, requests for
    the running adapter go first, and the oldest request (another adapter) waits exactly 3 steps;
    without it, strictly first come first served."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_batched_tokens=64, max_model_len=64, adapter_affinity=affinity),
                      PagePlan(200), adapter_pages={"a": 2, "b": 2})
    sched.add(Request("first", [1, 2], 30, "a", ignore_eos=True))
    queued = [sched.add(Request(f"q{i}", [1, 2], 1, adapter, ignore_eos=True))
              for i, adapter in enumerate(["b", "a", "a", "a", "a", "a"])]
    admitted = []
    for _ in range(20):
        step = sched.schedule()
        admitted += [w.seq_id for w in step.seqs if w.prefix is not None]
        sched.postprocess([5] * len(step.seqs))
    order = [next(q.request.request_id for q in queued if q.seq_id == s) for s in admitted[1:]]
    if affinity:
        assert order == ["q1", "q2", "q3", "q0", "q4", "q5"]
        assert queued[0].passed_over == 3
    else:
        assert order == ["q0", "q1", "q2", "q3", "q4", "q5"]
