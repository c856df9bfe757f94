"""Paged attention: the torch reference equals a naive loop, the Triton kernels equal the reference."""
from __future__ import annotations

import math

import pytest
import torch

from lorafleet.kernels import triton_attention
from lorafleet.kernels.attention import _attention_reference, paged_attention, write_kv

TOLERANCE = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-2, rtol=2e-2),
}
DTYPES = list(TOLERANCE)
TILE = triton_attention.PREFILL_BLOCK_M  # query rows of one prefill tile

# (context length, new tokens) per sequence, in step order; n == 1 is a decode row.
STEPS = {
    "prefill": [(TILE + 6, TILE + 6), (40, 23), (2, 2)],  # fresh prompts and a chunk after 17 cached tokens
    "decode": [(5, 1), (1, 1), (37, 1), (9, 1)],  # includes a sequence whose only key is its own
    "mixed": [(9, 1), (TILE + 6, 30), (33, 1), (3, 3), (1, 1)],
    "chunks": [(9, 1), (2 * TILE + 20, TILE + 5), (33, 1), (84, 40)],  # chunks after cached tokens, over two tiles, with decodes
}


def naive_attention(case) -> torch.Tensor:
    """out[t, h] = softmax over positions 0..p of (q . K[p'] / sqrt(d)) V[p'], built key by key."""
    q, batch = case.q.double(), case.batch
    num_heads, head_dim = q.shape[1], q.shape[2]
    ratio, kv_size = num_heads // case.num_kv_heads, case.num_kv_heads * head_dim
    out = torch.zeros_like(q)
    starts = batch.query_start.tolist()
    for i, context in enumerate(batch.context_lens.tolist()):
        num_new = starts[i + 1] - starts[i]
        for j in range(num_new):
            position = context - num_new + j
            rows = case.pool[batch.page_table[batch.table_rows[i], : position + 1]].double()
            for h in range(num_heads):
                cols = slice((h // ratio) * head_dim, (h // ratio + 1) * head_dim)
                keys, values = rows[:, cols], rows[:, kv_size:][:, cols]
                weights = torch.softmax(keys @ q[starts[i] + j, h] / math.sqrt(head_dim), dim=0)
                out[starts[i] + j, h] = weights @ values
    return out


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("ratio", [1, 3, 4])
def test_reference_matches_naive_loop(make_attention_case, step, ratio):
    """Unused pages hold NaN: the reference must never let a masked-out key through."""
    case = make_attention_case(STEPS[step], ratio=ratio, seed=ratio)
    out = paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)
    torch.testing.assert_close(out.double(), naive_attention(case), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_reference(make_attention_case, dtype, ratio, step):
    case = make_attention_case(STEPS[step], ratio=ratio, dtype=dtype, seed=ratio)
    expected = _attention_reference(case.q, case.pool, case.batch, case.num_kv_heads)
    out = triton_attention.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("step", list(STEPS))
def test_reference_reads_shuffled_rows_of_a_larger_table(make_attention_case, step):
    """The worker's table: more rows and columns than the step uses, the step's rows shuffled, every cell
    no sequence owns naming a NaN page."""
    case = make_attention_case(STEPS[step], ratio=3, extra_rows=6, extra_cols=21, seed=7)
    out = paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)
    torch.testing.assert_close(out.double(), naive_attention(case), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_reads_shuffled_rows_of_a_larger_table(make_attention_case, dtype, step):
    case = make_attention_case(STEPS[step], ratio=3, extra_rows=6, extra_cols=21, dtype=dtype, seed=7)
    expected = _attention_reference(case.q, case.pool, case.batch, case.num_kv_heads)
    out = triton_attention.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


def test_kernel_with_odd_head_dim_and_wide_pages(make_attention_case):
    """head_dim 24 pads to a 32 block; pool rows are wider than K+V (the pool also holds adapters)."""
    case = make_attention_case(STEPS["mixed"], num_kv_heads=3, ratio=3, head_dim=24, extra_page_dim=40)
    expected = _attention_reference(case.q, case.pool, case.batch, case.num_kv_heads)
    out = triton_attention.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("extra_page_dim", [0, 13])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv_matches_reference(dtype, extra_page_dim):
    gen = torch.Generator().manual_seed(extra_page_dim)
    num_tokens, kv_heads, head_dim = 6, 3, 8
    pool = torch.randn(20, 2 * kv_heads * head_dim + extra_page_dim, generator=gen).to(dtype)
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(20, generator=gen)[:num_tokens]
    expected = pool.clone()
    write_kv(expected, k, v, slots)
    triton_attention.write_kv(pool, k, v, slots)
    assert torch.equal(pool, expected)


def test_write_kv_casts_to_the_pool_dtype():
    pool = torch.zeros(4, 8, dtype=torch.float16)
    k, v = torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    expected = pool.clone()
    write_kv(expected, k, v, torch.tensor([3, 1]))
    triton_attention.write_kv(pool, k, v, torch.tensor([3, 1]))
    torch.testing.assert_close(pool, expected, atol=1e-3, rtol=0)


def test_launchers_refuse_bad_inputs(make_attention_case):
    case = make_attention_case(STEPS["decode"], ratio=2)
    with pytest.raises(ValueError, match="multiple"):
        triton_attention.paged_attention(case.q, case.pool, case.batch, 3)
    with pytest.raises(ValueError, match="pool"):
        triton_attention.paged_attention(case.q, case.pool.half(), case.batch, case.num_kv_heads)
    with pytest.raises(ValueError, match="q "):
        triton_attention.paged_attention(case.q.transpose(0, 1), case.pool, case.batch, case.num_kv_heads)
    k = torch.zeros(2, 2, 16)
    with pytest.raises(ValueError, match="slots"):
        triton_attention.write_kv(case.pool, k, k, torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="pool"):
        triton_attention.write_kv(case.pool[:, :10].contiguous(), k, k, torch.tensor([1, 2]))


def test_kernels_compile_for_gpu(gpu_compile):
    """Decode (16-row) and prefill (64-row) tiles at Llama's head_dim, in the serving dtypes."""
    def pointers(dtype):
        return {name: f"*{dtype}" for name in ("q_ptr", "pool_ptr", "out_ptr", "k_ptr", "v_ptr")}

    def attention(dtype, block_m, ratio, head_dim, arch=90):
        constants = dict(BLOCK_M=block_m, RATIO=ratio, BLOCK_N=32, BLOCK_D=head_dim, UPCAST=False)
        return ("_attention_kernel", pointers(dtype), constants, arch)

    jobs = [("_write_kv_kernel", pointers(dtype), dict(BLOCK=1024), 90) for dtype in ("fp32", "fp16", "bf16")]
    jobs += [attention("bf16", 16, 4, 128), attention("bf16", 64, 3, 128), attention("bf16", 64, 1, 128, arch=80)]
    jobs += [attention("fp16", 64, 1, 128), attention("fp32", 16, 1, 64)]
    gpu_compile("lorafleet.kernels.triton_attention", jobs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv_of_k_and_v_split_from_one_row_equals_the_joined_copy(dtype):
    """k and v as the model passes them (views of the fused q|k|v rows, v right after k) are written
    without joining them first: the pool gets the same bits as from separate tensors."""
    gen = torch.Generator().manual_seed(3)
    num_tokens, q_heads, kv_heads, head_dim = 7, 6, 2, 8
    qkv = torch.randn(num_tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    _, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    k, v = k.unflatten(-1, (kv_heads, head_dim)), v.unflatten(-1, (kv_heads, head_dim))
    slots = torch.randperm(30, generator=gen)[:num_tokens]
    for extra_page_dim in (0, 5):
        pool = torch.zeros(30, 2 * kv_heads * head_dim + extra_page_dim, dtype=dtype)
        expected = pool.clone()
        write_kv(pool, k, v, slots)
        write_kv(expected, k.contiguous(), v.contiguous(), slots)
        assert torch.equal(pool, expected)
        assert torch.equal(pool[slots, :kv_heads * head_dim], k.flatten(1))
        assert torch.equal(pool[slots, kv_heads * head_dim:2 * kv_heads * head_dim], v.flatten(1))
    # v not right after k (k and v swapped in memory): joined by a copy, same result
    pool, expected = torch.zeros(30, 2 * kv_heads * head_dim, dtype=dtype), torch.zeros(30, 2 * kv_heads * head_dim, dtype=dtype)
    write_kv(pool, v, k, slots)
    write_kv(expected, v.contiguous(), k.contiguous(), slots)
    assert torch.equal(pool, expected)
