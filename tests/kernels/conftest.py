"""Builders of LoRA and attention batches laid out in shuffled pool pages.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set
here, before the test modules of this folder import the Triton kernels.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lorafleet.kernels.attention import AttentionBatch  # noqa: E402
from lorafleet.kernels.lora import LoraBatch, LoraGroup  # noqa: E402


@dataclass
class LoraCase:
    x: torch.Tensor  # (T, in_dim)
    y: torch.Tensor  # (T, sum(out_dims)), the base output the deltas are added to
    pool: torch.Tensor  # (P, D)
    batch: LoraBatch
    group: LoraGroup


def tokens_of(segments: list[tuple[int, int]]) -> list[int]:
    """[(adapter or -1, run length), ...] -> the adapter of each token, in order."""
    return [a for a, length in segments for _ in range(length)]


def build_lora_case(
    ranks: list[list[int]],
    token_adapter: list[int],
    *,
    in_dim: int = 48,
    out_dims: tuple[int, ...] = (48, 24, 24),
    page_dim: int = 40,
    dtype: torch.dtype = torch.float32,
    layout: str = "packed",
    max_rank: int | None = None,
    shards: int = 1,
    seed: int = 0,
    runs: bool = False,
) -> LoraCase:
    """Adapter a has rank ranks[a][g] on target g (0 = absent).

    Each adapter's flat vector starts with a random prefix (the other groups of the
    layer), then its A and B blocks: "packed" puts every A before every B, "interleaved"
    puts B_g right after A_g. The vectors are cut into pages drawn from a shuffled pool,
    so no adapter is contiguous; with runs=True each adapter's pages follow each other instead
    (as an adapter loaded in one piece has them), the adapters in shuffled order with NaN
    pages between some of them. Page 0 and every unused element hold NaN, so a read
    outside an adapter's blocks poisons the result. With shards = N (tensor parallelism),
    B_g has N * r columns, one block of r per all-gathered shrink output (B_g is random
    here, so its stored B_g^T layout needs nothing else).
    """
    gen = torch.Generator().manual_seed(seed)
    num_targets = len(out_dims)
    vectors, a_offset, b_offset = [], [], []
    for rank_row in ranks:
        prefix = int(torch.randint(0, 2 * page_dim, (1,), generator=gen))
        pieces, cursor = [torch.randn(prefix, generator=gen)], prefix

        def put(numel: int, std: float) -> int:
            nonlocal cursor
            pieces.append(torch.randn(numel, generator=gen) * std)
            cursor += numel
            return cursor - numel

        a_row, b_row = [-1] * num_targets, [-1] * num_targets
        order = [(g, kind) for kind in "AB" for g in range(num_targets)]
        if layout == "interleaved":
            order = [(g, kind) for g in range(num_targets) for kind in "AB"]
        for g, kind in order:
            r = rank_row[g]
            if r and kind == "A":
                a_row[g] = put(r * in_dim, in_dim ** -0.5)
            elif r:
                b_row[g] = put(out_dims[g] * shards * r, (shards * r) ** -0.5)
        vectors.append(torch.cat(pieces))
        a_offset.append(a_row)
        b_offset.append(b_row)

    pages_needed = [-(-v.numel() // page_dim) for v in vectors]
    num_pages = 1 + sum(pages_needed) + 3 + (len(ranks) if runs else 0)
    free = (1 + torch.randperm(num_pages - 1, generator=gen)).tolist()
    run_start, at = {}, 1
    for a in torch.randperm(len(ranks), generator=gen).tolist() if runs else ():  # shuffled, gaps of 0-1 pages
        at += int(torch.randint(0, 2, (1,), generator=gen))
        run_start[a] = at
        at += pages_needed[a]
    pool = torch.full((num_pages, page_dim), float("nan"))
    page_table = torch.zeros(len(ranks), max(pages_needed, default=1), dtype=torch.int64)
    for a, vec in enumerate(vectors):
        if runs:
            pages = list(range(run_start[a], run_start[a] + pages_needed[a]))
        else:
            pages = [free.pop() for _ in range(pages_needed[a])]
        page_table[a, : len(pages)] = torch.tensor(pages)
        padded = torch.full((len(pages) * page_dim,), float("nan"))
        padded[: vec.numel()] = vec
        pool[pages] = padded.reshape(-1, page_dim)

    rank = torch.tensor(ranks, dtype=torch.int64).reshape(len(ranks), num_targets)
    alpha = torch.rand(len(ranks), num_targets, generator=gen) * 16 + 1
    scale = torch.where(rank > 0, alpha / rank.clamp(min=1), torch.zeros(()))
    group = LoraGroup(
        in_dim=in_dim,
        out_dims=tuple(out_dims),
        a_offset=torch.tensor(a_offset, dtype=torch.int64).reshape(len(ranks), num_targets),
        b_offset=torch.tensor(b_offset, dtype=torch.int64).reshape(len(ranks), num_targets),
        rank=rank,
        scale=scale.float(),
        max_rank=max_rank or max(max(row) for row in ranks),
        shards=shards,
    )
    num_tokens = len(token_adapter)
    batch = LoraBatch(
        token_adapter=torch.tensor(token_adapter, dtype=torch.int64),
        page_table=page_table,
        groups={"qkv": group},
    )
    x = torch.randn(num_tokens, in_dim, generator=gen).to(dtype)
    y = torch.randn(num_tokens, sum(out_dims), generator=gen).to(dtype)
    return LoraCase(x=x, y=y, pool=pool.to(dtype), batch=batch, group=group)


@dataclass
class AttentionCase:
    q: torch.Tensor  # (T, H, d)
    pool: torch.Tensor  # (P, D), K and V of every cached and new token already written
    batch: AttentionBatch
    num_kv_heads: int


def build_attention_case(
    seqs: list[tuple[int, int]],
    *,
    num_kv_heads: int = 2,
    ratio: int = 1,
    head_dim: int = 16,
    extra_page_dim: int = 0,
    extra_rows: int = 0,
    extra_cols: int = 0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> AttentionCase:
    """seqs: [(context length c, new tokens n), ...] in step order; n == 1 makes a decode row.

    Every position of every sequence gets its own page, drawn from a shuffled pool,
    so no sequence is contiguous; page 0 and unused pages hold NaN. The page table has
    one row per sequence, in order, unless extra_rows / extra_cols ask for a table like
    the worker's, kept across steps: rows no sequence of the batch owns, columns past the
    longest context, the batch's rows drawn shuffled. Then every cell a sequence does not
    own (other rows, columns past its context) names a NaN page: stale data that poisons
    the result if it is ever read.
    """
    gen = torch.Generator().manual_seed(seed)
    kv_size = num_kv_heads * head_dim
    page_dim = 2 * kv_size + extra_page_dim
    num_pages = 1 + sum(c for c, _ in seqs) + 5
    free = (1 + torch.randperm(num_pages - 1, generator=gen)).tolist()
    pool = torch.full((num_pages, page_dim), float("nan"))
    num_rows, num_cols = len(seqs) + extra_rows, max(c for c, _ in seqs) + extra_cols
    if extra_rows or extra_cols:
        nan_pages = torch.tensor([0] + free[:5])  # free is popped from the end: these stay unused
        page_table = nan_pages[torch.randint(0, len(nan_pages), (num_rows, num_cols), generator=gen)]
        table_rows = torch.randperm(num_rows, generator=gen)[: len(seqs)]
    else:
        page_table = torch.zeros(num_rows, num_cols, dtype=torch.int64)
        table_rows = torch.arange(len(seqs))
    for row, (c, _) in zip(table_rows.tolist(), seqs):
        pages = torch.tensor([free.pop() for _ in range(c)])
        page_table[row, :c] = pages
        pool[pages, : 2 * kv_size] = torch.randn(c, 2 * kv_size, generator=gen)
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    slots = torch.cat([page_table[row, c - n : c] for row, (c, n) in zip(table_rows.tolist(), seqs)])
    decode = [i for i, (_, n) in enumerate(seqs) if n == 1]
    batch = AttentionBatch(
        query_start=torch.tensor(starts, dtype=torch.int64),
        context_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int64),
        page_table=page_table,
        table_rows=table_rows,
        slots=slots,
        decode_rows=torch.tensor(decode, dtype=torch.int64),
        prefill_rows=[i for i, (_, n) in enumerate(seqs) if n != 1],
        query_start_list=starts,
        context_lens_list=[c for c, _ in seqs],
    )
    q = torch.randn(starts[-1], num_kv_heads * ratio, head_dim, generator=gen) * 2
    return AttentionCase(q=q.to(dtype), pool=pool.to(dtype), batch=batch, num_kv_heads=num_kv_heads)


# Compiles kernels ahead of time for a CUDA target: no GPU or driver is needed, and it
# checks what the interpreter does not (types, tl.dot shapes, register allocation by ptxas).
_COMPILE_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module = importlib.import_module(sys.argv[1])
for name, pointer_types, constants, arch in json.loads(sys.argv[2]):
    fn = getattr(module, name)
    signature = {
        arg: "constexpr" if arg in constants
        else pointer_types.get(arg, "*i64") if arg.endswith("_ptr")
        else "fp32" if arg.endswith("scale")
        else "i32"
        for arg in fn.arg_names
    }
    compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", arch, 32))
    assert "cubin" in compiled.asm, name
"""


def compile_for_gpu(module: str, jobs: list[tuple[str, dict, dict, int]], cache_dir) -> None:
    """jobs: (kernel name, {pointer arg: "*bf16", ...}, {constexpr: value}, sm arch) each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, module, json.dumps(jobs)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture
def gpu_compile(tmp_path):
    return lambda module, jobs: compile_for_gpu(module, jobs, tmp_path)


@pytest.fixture
def make_lora_case():
    return build_lora_case


@pytest.fixture
def make_attention_case():
    return build_attention_case


@pytest.fixture
def lora_tokens():
    return tokens_of
