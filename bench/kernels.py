"""CPU benchmark of batched LoRA: the C kernels and the torch reference against two baselines.

One decode step of 512 sequences (one token each) through the q+k+v group of
SmolLM2-135M (in 576, out 576 + 192 + 192, KV pages of 384 elements), with 1, 8, 64
or 512 distinct adapters of mixed ranks (8/16/32/64) spread over the batch in no
order, weights in shuffled pool pages. Each method computes y += LoRA(x) for all
three targets, reading the adapters from the pool:

- loop:  a Python loop over requests, each gathering its adapter and doing two matmuls;
- bmm:   S-LoRA-bmm, every adapter padded to the batch's largest rank, per-token torch.bmm;
- torch: the torch reference of kernels/lora.py (buckets of adapters, one page gather and
         one torch.bmm per bucket), including its per-step plan;
- ours:  the CPU path, kernels/cpu_lora.c (A and B read in place from the pages),
         including its per-step metadata;
- ours, metadata reused: the same with the metadata already built (a step reuses it in every layer).

Every method's y is checked against the loop's before timing.

A second table times paged attention for one decode step of SmolLM2-135M's shapes (9
query heads, 3 KV heads, head_dim 64, pages of 384 elements, every position in a
shuffled page): the C kernel (kernels/cpu_attention.c) against the torch reference
(one page gather and one scaled_dot_product_attention per step's decode rows). A third
times prefill steps (whole prompts, chunks after cached keys) three ways: the torch
reference, the C kernel alone, and the CPU path as served (kernels/cpu.py: chunks of
MATMUL_MIN_TOKENS or more through torch's fused attention on gathered K and V); its
times are CPU seconds of the process (time.process_time), which leave out the shared
cores' other work.

With --from-memory, a table times a decode step's q+k+v LoRA for 64 adapters (one token each, or
--decode-tokens each: sequences that share an adapter) over 30 layers' own pools, so that the
weights come from memory as in the engine, with each adapter's pages in one run (as loading lays
them out) and scattered.

With --segments, a third table times one adapter's segment of n tokens (one run of a step sorted by
adapter) through the four groups of a SmolLM2-135M layer, on the C kernels' dot products and on their
matrix products (AMX tiles in bfloat16): where the products start to win is cpu.TILE_TOKENS.

The tables run in each --dtype (float32 by default; `--dtype float32 bfloat16` times both in one
run and ends with a table of the C kernel in each dtype against the torch reference). Times are
medians of --repeats runs; bfloat16 results are checked against the float32 loop.

Run: .venv/bin/python bench/kernels.py [--tokens 512] [--repeats 5] [--threads 1] [--dtype float32 bfloat16] [--segments]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from lorafleet.kernels import cpu
from lorafleet.kernels.attention import AttentionBatch, _attention_reference
from lorafleet.kernels.lora import LoraBatch, LoraGroup, _expand_reference, _shrink_reference
from lorafleet.worker.config import DTYPES

# how far a method's y may be from the float32 loop's: bfloat16 rounds x, y, the weights and s
CHECK = {torch.float32: dict(atol=1e-3, rtol=1e-3), torch.bfloat16: dict(atol=6e-2, rtol=3e-2),
         torch.float16: dict(atol=1e-2, rtol=1e-2)}

IN_DIM, OUT_DIMS, PAGE_DIM = 576, (576, 192, 192), 384
RANKS = (8, 16, 32, 64)


def build_step(num_adapters: int, num_tokens: int, seed: int = 0, dtype: torch.dtype = torch.float32,
               in_dim: int = IN_DIM, out_dims: tuple[int, ...] = OUT_DIMS, ranks: tuple[int, ...] = RANKS,
               shuffle: bool = True):
    """Adapter a has rank ranks[a % len(ranks)] on every target; vectors are [A_q A_k A_v B_q B_k B_v]
    (for the default q+k+v group). Tokens go round robin over the adapters, shuffled unless told not to."""
    gen = torch.Generator().manual_seed(seed)
    ranks = [ranks[a % len(ranks)] for a in range(num_adapters)]
    sizes = [r * (in_dim * len(out_dims) + sum(out_dims)) for r in ranks]
    pages_needed = [-(-n // PAGE_DIM) for n in sizes]
    free = torch.randperm(sum(pages_needed), generator=gen)
    pool = torch.empty(sum(pages_needed), PAGE_DIM)
    page_table = torch.zeros(num_adapters, max(pages_needed), dtype=torch.int64)
    a_offset = torch.zeros(num_adapters, len(out_dims), dtype=torch.int64)
    b_offset = torch.zeros_like(a_offset)
    used = 0
    for a, (r, n, p) in enumerate(zip(ranks, sizes, pages_needed)):
        page_table[a, :p] = free[used:used + p]
        used += p
        a_offset[a] = torch.arange(len(out_dims)) * r * in_dim
        b_offset[a] = len(out_dims) * r * in_dim + torch.tensor([0, *out_dims[:-1]]).cumsum(0) * r
        vec = torch.zeros(p * PAGE_DIM)
        vec[:n] = torch.randn(n, generator=gen) * 0.05
        pool[page_table[a, :p]] = vec.reshape(p, PAGE_DIM)
    rank = torch.tensor(ranks).unsqueeze(1).repeat(1, len(out_dims))
    group = LoraGroup(
        in_dim=in_dim, out_dims=out_dims, a_offset=a_offset, b_offset=b_offset, rank=rank,
        scale=(16.0 / rank).float(), max_rank=max(ranks),
    )
    token_adapter = torch.arange(num_tokens) % num_adapters
    if shuffle:
        token_adapter = token_adapter[torch.randperm(num_tokens, generator=gen)]
    batch = LoraBatch(token_adapter=token_adapter, page_table=page_table, groups={"qkv": group})
    x = torch.randn(num_tokens, in_dim, generator=gen)
    y = torch.randn(num_tokens, sum(out_dims), generator=gen)
    return x.to(dtype), y.to(dtype), pool.to(dtype), batch, group


def adapter_pages(group: LoraGroup, page_dim: int) -> list[int]:
    """How many leading pages of each adapter's page list this group's blocks reach into."""
    counts = []
    for ranks, a_offsets, b_offsets in zip(group.rank.tolist(), group.a_offset.tolist(), group.b_offset.tolist()):
        ends = [o + r * group.in_dim for o, r in zip(a_offsets, ranks)]
        ends += [o + r * n for o, r, n in zip(b_offsets, ranks, group.out_dims)]
        counts.append(-(-max(ends) // page_dim))
    return counts


def loop_over_requests(x, y, pool, batch, group):
    """Baseline 1: each request gathers its adapter's pages and runs its own matmuls."""
    num_pages, ranks = adapter_pages(group, pool.shape[1]), group.rank.tolist()
    a_offset, b_offset, scale = group.a_offset.tolist(), group.b_offset.tolist(), group.scale.tolist()
    for t, a in enumerate(batch.token_adapter.tolist()):
        vec = pool.index_select(0, batch.page_table[a, :num_pages[a]]).reshape(-1)
        for g, (out_dim, col) in enumerate(zip(group.out_dims, group.out_offsets)):
            r, ao, bo = ranks[a][g], a_offset[a][g], b_offset[a][g]
            a_g = vec[ao:ao + r * group.in_dim].view(r, group.in_dim)
            b_g = vec[bo:bo + out_dim * r].view(r, out_dim).T  # stored transposed
            y[t, col:col + out_dim] += scale[a][g] * (b_g @ (a_g @ x[t]))
    return y


def padded_bmm(x, y, pool, batch, group):
    """Baseline 2 (S-LoRA-bmm): pad every adapter to the largest rank, gather per token, torch.bmm."""
    r_max, in_dim, num_targets, page_dim = group.max_rank, group.in_dim, len(group.out_dims), pool.shape[1]
    num_pages, ranks = adapter_pages(group, page_dim), group.rank.tolist()
    a_offset, b_offset = group.a_offset.tolist(), group.b_offset.tolist()
    pages = torch.cat([batch.page_table[a, :p] for a, p in enumerate(num_pages)])
    flat = pool.index_select(0, pages).reshape(-1)  # every adapter's vector, back to back
    a_pad = x.new_zeros(len(num_pages), num_targets * r_max, in_dim)
    b_pad = [x.new_zeros(len(num_pages), out_dim, r_max) for out_dim in group.out_dims]
    start = 0
    for a, p in enumerate(num_pages):
        vec = flat[start:start + p * page_dim]
        start += p * page_dim
        for g, out_dim in enumerate(group.out_dims):
            r, ao, bo = ranks[a][g], a_offset[a][g], b_offset[a][g]
            a_pad[a, g * r_max:g * r_max + r] = vec[ao:ao + r * in_dim].view(r, in_dim)
            b_pad[g][a, :, :r] = vec[bo:bo + out_dim * r].view(r, out_dim).T
    tokens = batch.token_adapter
    s = torch.bmm(x.unsqueeze(1), a_pad[tokens].transpose(1, 2)).view(-1, num_targets, r_max)  # (T, G, r_max)
    for g, (out_dim, col) in enumerate(zip(group.out_dims, group.out_offsets)):
        delta = torch.bmm(s[:, g:g + 1], b_pad[g][tokens].transpose(1, 2)).squeeze(1)  # (T, out)
        y[:, col:col + out_dim] += group.scale[tokens, g, None] * delta
    return y


def torch_reference(x, y, pool, batch, group):
    group = dataclasses.replace(group, _plan=None)  # plan the step inside the timed region
    return _expand_reference(y, _shrink_reference(x, pool, batch, group), pool, batch, group)


def ours(x, y, pool, batch, group):
    batch = dataclasses.replace(batch, _cpu_segments=None)  # build the step's metadata inside the timed region
    group = dataclasses.replace(group, _cpu_args=None)
    return cpu.expand(y, cpu.shrink(x, pool, batch, group), pool, batch, group)


def ours_metadata_reused(x, y, pool, batch, group):
    return cpu.expand(y, cpu.shrink(x, pool, batch, group), pool, batch, group)


METHODS = {"loop": loop_over_requests, "bmm": padded_bmm, "torch": torch_reference, "ours": ours,
           "ours, metadata reused": ours_metadata_reused}


def time_ms(fn, x, y, pool, batch, group, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        y_run = y.clone()
        start = time.perf_counter()
        fn(x, y_run, pool, batch, group)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)  # other processes share these cores: the median, not one run


def attention_step(num_seqs: int, context: tuple[int, int], seed: int = 0, dtype: torch.dtype = torch.float32):
    """One decode step: num_seqs sequences with contexts drawn from `context`, pages shuffled."""
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim = 9, 3, 64
    lens = torch.randint(context[0], context[1] + 1, (num_seqs,), generator=gen)
    pages = torch.randperm(int(lens.sum()), generator=gen)
    pool = torch.randn(int(lens.sum()), 2 * kv_heads * head_dim, generator=gen)
    table = torch.zeros(num_seqs, int(lens.max()), dtype=torch.int64)
    used = 0
    for i, n in enumerate(lens.tolist()):
        table[i, :n] = pages[used:used + n]
        used += n
    starts = list(range(num_seqs + 1))
    batch = AttentionBatch(
        query_start=torch.tensor(starts), context_lens=lens, page_table=table, table_rows=torch.arange(num_seqs),
        slots=table[torch.arange(num_seqs), lens - 1], decode_rows=torch.arange(num_seqs), prefill_rows=[],
        query_start_list=starts, context_lens_list=lens.tolist(),
    )
    q = torch.randn(num_seqs, heads, head_dim, generator=gen)
    return q.to(dtype), pool.to(dtype), batch, kv_heads


ATTENTION_STEPS = ((32, (40, 120)), (64, (40, 120)), (64, (400, 1200)))


def attention_table(repeats: int, dtype: torch.dtype) -> dict:
    """Prints the table; returns {(sequences, context): {"torch": ms, "ours": ms}}."""
    print(f"\npaged attention, one decode step of SmolLM2-135M shapes (9 heads, 3 KV heads, d 64), {dtype}, "
          f"per layer, median of {repeats}")
    header = f"{'sequences':>9} | {'context':>8} | {'torch':>10} | {'ours (C)':>10} | torch/ours"
    print(header + "\n" + "-" * len(header))
    results = {}
    for num_seqs, context in ATTENTION_STEPS:
        q, pool, batch, kv_heads = attention_step(num_seqs, context, dtype=dtype)
        expected = _attention_reference(q.float(), pool.float(), batch, kv_heads)
        torch.testing.assert_close(cpu.paged_attention(q, pool, batch, kv_heads).float(), expected,
                                   **(dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else CHECK[dtype]))
        ms = {}
        for name, fn in (("torch", _attention_reference), ("ours", cpu.paged_attention)):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(q, pool, batch, kv_heads)
                times.append((time.perf_counter() - start) * 1e3)
            ms[name] = statistics.median(times)
        if dtype == torch.bfloat16 and cpu.native_bf16():  # the same C code without bf16 dot products
            native, cpu._library = cpu._library, cpu.load_variant(cpu.GENERIC_BF16)
            try:
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    cpu.paged_attention(q, pool, batch, kv_heads)
                    times.append((time.perf_counter() - start) * 1e3)
                ms["generic"] = statistics.median(times)
            finally:
                cpu._library = native
        results[(num_seqs, context)] = ms
        print(f"{num_seqs:>9} | {context[0]:>3}-{context[1]:<4} | {ms['torch']:>7.2f} ms | {ms['ours']:>7.2f} ms | "
              f"{ms['torch'] / ms['ours']:>9.1f}x"
              + (f" | C without bf16 dot products {ms['generic']:.2f} ms: {ms['generic'] / ms['ours']:.2f}x" if "generic" in ms else ""))
    return results


# (context, new tokens) of every sequence of a prefill step
PREFILL_STEPS = {
    "8 prompts of 128": [(128, 128)] * 8,
    "2 prompts of 512": [(512, 512)] * 2,
    "2 chunks of 256 after 768": [(1024, 256)] * 2,
    "8 chunks of 8 after 300": [(308, 8)] * 8,
}


def prefill_step(seqs: list[tuple[int, int]], seed: int = 0, dtype: torch.dtype = torch.float32):
    """Sequences of (context, new tokens), every position in a shuffled page."""
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim = 9, 3, 64
    total = sum(c for c, _ in seqs)
    pages = torch.randperm(total, generator=gen)
    pool = torch.randn(total, 2 * kv_heads * head_dim, generator=gen)
    table = torch.zeros(len(seqs), max(c for c, _ in seqs), dtype=torch.int64)
    starts, used = [0], 0
    for i, (c, n) in enumerate(seqs):
        table[i, :c] = pages[used:used + c]
        used += c
        starts.append(starts[-1] + n)
    lens = torch.tensor([c for c, _ in seqs])
    batch = AttentionBatch(
        query_start=torch.tensor(starts), context_lens=lens, page_table=table, table_rows=torch.arange(len(seqs)),
        slots=torch.cat([table[i, c - n:c] for i, (c, n) in enumerate(seqs)]),
        decode_rows=torch.tensor([i for i, (_, n) in enumerate(seqs) if n == 1], dtype=torch.int64),
        prefill_rows=[i for i, (_, n) in enumerate(seqs) if n != 1], query_start_list=starts, context_lens_list=lens.tolist(),
    )
    q = torch.randn(starts[-1], heads, head_dim, generator=gen)
    return q.to(dtype), pool.to(dtype), batch, kv_heads


def prefill_attention_table(repeats: int, dtype: torch.dtype) -> None:
    """The torch reference, the C kernel for every sequence, and the CPU path as served."""
    print(f"\npaged attention, prefill steps of SmolLM2-135M shapes, {dtype}, per layer, CPU ms (process time), "
          f"median of {repeats}")
    header = (f"{'step':>26} | {'torch':>10} | {'C kernel':>10} | {'as served':>10} | C kernel / as served"
              f" | GFLOP/s as served")
    print(header + "\n" + "-" * len(header))
    served = cpu.MATMUL_MIN_TOKENS
    for label, seqs in PREFILL_STEPS.items():
        q, pool, batch, kv_heads = prefill_step(seqs, dtype=dtype)
        expected = _attention_reference(q.float(), pool.float(), batch, kv_heads)
        ms = {}
        for name, threshold in (("torch", None), ("C", 1 << 40), ("served", served)):
            if threshold is not None:
                cpu.MATMUL_MIN_TOKENS = threshold
            try:
                batch._cpu_plan = None  # the step's plan is built in the first (untimed) call, as in a step's first layer
                fn = _attention_reference if threshold is None else cpu.paged_attention
                torch.testing.assert_close(fn(q, pool, batch, kv_heads).float(), expected,
                                           **(dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else CHECK[dtype]))
                times = []
                for _ in range(repeats):
                    start = time.process_time()
                    fn(q, pool, batch, kv_heads)
                    times.append((time.process_time() - start) * 1e3)
                ms[name] = statistics.median(times)
            finally:
                cpu.MATMUL_MIN_TOKENS = served
        # q.K and P.V over the keys each new token sees (the causal half of a prompt, not the full square)
        flops = sum(4 * 9 * 64 * (n * (c - n) + n * (n + 1) / 2) for c, n in seqs)
        print(f"{label:>26} | {ms['torch']:>7.2f} ms | {ms['C']:>7.2f} ms | {ms['served']:>7.2f} ms | "
              f"{ms['C'] / ms['served']:>18.2f}x | {flops / ms['served'] / 1e6:>17.0f}")


def lora_table(args, dtype: torch.dtype) -> dict:
    """Prints the table; returns {adapters: {method: ms}}."""
    print(f"\ndecode step of {args.tokens} tokens, q+k+v of in {IN_DIM} -> out {OUT_DIMS}, ranks "
          f"{'/'.join(map(str, RANKS))}, {dtype}; median of {args.repeats}")
    header = (f"{'adapters':>8} | " + " | ".join(f"{name:>21}" for name in METHODS)
              + " | loop/ours | bmm/ours | torch/ours")
    print(header + "\n" + "-" * len(header))
    results = {}
    for num_adapters in args.adapters:
        x32, y32, pool32, batch, group = build_step(num_adapters, args.tokens)
        expected = loop_over_requests(x32, y32.clone(), pool32, batch, group)
        x, y, pool, batch, group = build_step(num_adapters, args.tokens, dtype=dtype)
        for fn in METHODS.values():
            torch.testing.assert_close(fn(x, y.clone(), pool, batch, group).float(), expected, **CHECK[dtype])
        ms = {name: time_ms(fn, x, y, pool, batch, group, args.repeats) for name, fn in METHODS.items()}
        if dtype == torch.bfloat16 and cpu.native_bf16():  # the same C code without bf16 dot products
            native, cpu._library = cpu._library, cpu.load_variant(cpu.GENERIC_BF16)
            try:
                ms["generic"] = time_ms(ours, x, y, pool, batch, group, args.repeats)
            finally:
                cpu._library = native
        results[num_adapters] = ms
        cells = " | ".join(f"{ms[name]:>18.2f} ms" for name in METHODS)
        print(f"{num_adapters:>8} | {cells} | {ms['loop'] / ms['ours']:>8.1f}x | {ms['bmm'] / ms['ours']:>7.1f}x"
              f" | {ms['torch'] / ms['ours']:>9.1f}x"
              + (f" | C without bf16 dot products {ms['generic']:.2f} ms: {ms['generic'] / ms['ours']:.2f}x" if "generic" in ms else ""))
    return results


# SmolLM2-135M's four LoRA input groups: in_dim -> out_dims
SEGMENT_GROUPS = {"q+k+v": (576, (576, 192, 192)), "o": (576, (576,)), "gate+up": (576, (1536, 1536)),
                  "down": (1536, (576,))}
SEGMENT_LENGTHS = (1, 2, 4, 6, 8, 12, 16, 32, 128)


def one_layer(steps) -> None:
    for x, y, pool, batch, group in steps:
        cpu.expand(y, cpu.shrink(x, pool, batch, group), pool, batch, group)


def segment_table(args, dtype: torch.dtype) -> dict:
    """Prints the table; returns {(rank, tokens): {"dots": ms, "products": ms}}.

    One segment (one adapter's run of n tokens, as the scheduler sorts a step) through the four groups of
    a layer, shrink then expand, each path forced through cpu.TILE_TOKENS: the C kernels' dot products
    against their matrix products on gathered weights (AMX tiles in bfloat16). cpu.TILE_TOKENS is where
    the products start to win."""
    print(f"\none segment of n tokens through SmolLM2-135M's q+k+v, o, gate+up and down, {dtype}, shrink + expand, "
          f"median of {args.repeats} (cpu.TILE_TOKENS = {cpu.TILE_TOKENS})")
    header = f"{'rank':>4} | {'tokens':>6} | {'dot products':>12} | {'matrix products':>15} | dots/products"
    print(header + "\n" + "-" * len(header))
    results, chosen = {}, cpu.TILE_TOKENS
    for rank in (8, 16, 64):
        for n in SEGMENT_LENGTHS:
            steps = [build_step(1, n, dtype=dtype, in_dim=i, out_dims=o, ranks=(rank,), shuffle=False)
                     for i, o in SEGMENT_GROUPS.values()]
            ms = {}
            try:
                for name, threshold in (("dots", 10**9), ("products", 1)):
                    cpu.TILE_TOKENS = threshold
                    ms[name] = time_ms(lambda *_: one_layer(steps), *steps[0], args.repeats)
            finally:
                cpu.TILE_TOKENS = chosen
            results[(rank, n)] = ms
            print(f"{rank:>4} | {n:>6} | {ms['dots']:>9.3f} ms | {ms['products']:>12.3f} ms | {ms['dots'] / ms['products']:>12.2f}x")
    return results


def in_runs(x, y, pool, batch, group):
    """The same step with each adapter's pages one run (as loading lays an adapter out), in adapter order."""
    pages = adapter_pages(group, pool.shape[1])
    table, used = torch.zeros_like(batch.page_table), 0
    for a, p in enumerate(pages):
        table[a, :p] = torch.arange(used, used + p)
        used += p
    runs = pool[torch.cat([batch.page_table[a, :p] for a, p in enumerate(pages)])].contiguous()
    return x, y, runs, dataclasses.replace(batch, page_table=table, _cpu_segments=None), group


def from_memory_table(args, dtype: torch.dtype, layers: int = 30, adapters: int = 64) -> dict:
    """Prints the table; returns {placement: {"shrink": ms, "expand": ms}}.

    A decode step's q+k+v LoRA as the engine runs it: one token (or --decode-tokens) for each of 64
    adapters (ranks 8/16), in each of 30 layers with its own pool, so the weights (what the step reads)
    come from memory, not cache; adapters in runs of pages (flat reads) and in scattered pages (walked
    page by page). Two bounds to read them against: the same in runs with one layer's pool for all 30
    (4 MB, in cache), and the rate at which this machine streams memory (torch's sum of 512 MB, the
    same threads)."""
    per = args.decode_tokens
    print(f"\ndecode: {per} token{'s' * (per != 1)} for each of {adapters} adapters (ranks 8/16), q+k+v, {layers} layers' own pools, {dtype}, "
          f"{torch.get_num_threads()} thread(s); ms per step (all layers), median of {args.repeats}")
    results = {}
    for placement in ("runs", "scattered", "in cache"):
        steps = [build_step(adapters, adapters * per, seed=layer, dtype=dtype, ranks=(8, 16), shuffle=False)
                 for layer in range(1 if placement == "in cache" else layers)]
        if placement != "scattered":
            steps = [in_runs(*step) for step in steps] * (layers // len(steps))
        one_layer(steps)  # each step's metadata, built once as in the engine
        shrink, expand = [], []
        for _ in range(args.repeats):
            t_shrink = t_expand = 0.0
            for x, y, pool, batch, group in steps:
                start = time.perf_counter()
                s = cpu.shrink(x, pool, batch, group)
                middle = time.perf_counter()
                cpu.expand(y, s, pool, batch, group)
                t_shrink, t_expand = t_shrink + middle - start, t_expand + time.perf_counter() - middle
            shrink.append(t_shrink * 1e3)
            expand.append(t_expand * 1e3)
        weights = sum(step[2].numel() * step[2].element_size() for step in steps)
        results[placement] = {"shrink": statistics.median(shrink), "expand": statistics.median(expand)}
        total = results[placement]["shrink"] + results[placement]["expand"]
        print(f"  {placement:>9}: shrink {results[placement]['shrink']:.2f} ms, expand {results[placement]['expand']:.2f} ms; "
              f"{weights / 1e6:.0f} MB of pools at {weights / total / 1e6:.1f} GB/s")
    stream = torch.ones(128 * 2**20, dtype=torch.float32)
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        stream.sum()
        rates.append(stream.numel() * 4 / (time.perf_counter() - start) / 1e9)
    results["streaming GB/s"] = statistics.median(rates)
    print(f"  this machine streams {results['streaming GB/s']:.1f} GB/s (torch's sum of 512 MB of float32, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats})")
    return results


def across_dtypes(lora: dict, attention: dict) -> None:
    """The C kernels in each dtype against float32 C and the torch reference, measured in this run."""
    names = list(lora)
    base = names[0]
    print("\nthe C kernels across dtypes (ratios of medians measured in this run; > 1: the second is faster)")
    header = (f"{'op':>26} | " + " | ".join(f"{'torch ' + n:>15} | {'C ' + n:>12}" for n in names)
              + " | " + " | ".join(f"C {base} / C {n}" for n in names[1:])
              + " | " + " | ".join(f"torch {n} / C {n}" for n in names[1:]))
    print(header + "\n" + "-" * len(header))
    rows = [(f"LoRA, {a} adapters", {n: lora[n][a] for n in names}) for a in lora[base]]
    rows += [(f"attention, {s} seqs, {c[0]}-{c[1]}", {n: attention[n][(s, c)] for n in names}) for s, c in attention[base]]
    for label, ms in rows:
        cells = " | ".join(f"{ms[n]['torch']:>12.2f} ms | {ms[n]['ours']:>9.2f} ms" for n in names)
        c_ratio = " | ".join(f"{ms[base]['ours'] / ms[n]['ours']:>{len(f'C {base} / C {n}')}.2f}x" for n in names[1:])
        t_ratio = " | ".join(f"{ms[n]['torch'] / ms[n]['ours']:>{len(f'torch {n} / C {n}')}.2f}x" for n in names[1:])
        print(f"{label:>26} | {cells} | {c_ratio} | {t_ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (oversubscribed OpenMP is erratic)")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES),
                        help="one or more; with several, a last table compares the C kernels across them")
    parser.add_argument("--no-attention", action="store_true", help="LoRA tables only")
    parser.add_argument("--segments", action="store_true",
                        help="also time one adapter's segment of n tokens: dot products against matrix products")
    parser.add_argument("--from-memory", action="store_true",
                        help="also time a decode step's LoRA over 30 layers' pools (weights from memory, not cache)")
    parser.add_argument("--decode-tokens", type=int, default=1,
                        help="--from-memory: tokens per adapter in the step (sequences sharing an adapter)")
    args = parser.parse_args()
    if args.decode_tokens < 1 or args.decode_tokens >= cpu.TILE_TOKENS:
        parser.error(f"--decode-tokens must be 1-{cpu.TILE_TOKENS - 1} (from {cpu.TILE_TOKENS} a segment is a prefill product)")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    lora, attention = {}, {}
    for name in args.dtype:
        lora[name] = lora_table(args, DTYPES[name])
        if args.segments:
            segment_table(args, DTYPES[name])
        if args.from_memory:
            from_memory_table(args, DTYPES[name])
        if not args.no_attention:
            attention[name] = attention_table(args.repeats, DTYPES[name])
            prefill_attention_table(args.repeats, DTYPES[name])
    if len(args.dtype) > 1:
        across_dtypes(lora, attention if not args.no_attention else {n: {} for n in args.dtype})


if __name__ == "__main__":
    main()
