"""The CPU paged attention equals the torch reference on both of its paths: the C decode kernel
(kernels/cpu_attention.c paged_attention_*: decode rows, short chunks) and matrix products for chunks
of cpu.MATMUL_MIN_TOKENS new tokens or more (the C chunk kernel, chunk_attention_*, in float32 and
bfloat16 on CPUs with AVX-512; torch's fused attention on gathered K and V otherwise)."""
from __future__ import annotations

import platform

import pytest
import torch

from lorafleet.kernels import cpu
from lorafleet.kernels.attention import _attention_reference, paged_attention

TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-2, rtol=2e-2),
}

# (context length, new tokens) per sequence, in step order; n == 1 is a decode row.
STEPS = {
    "prefill": [(70, 70), (40, 23), (2, 2)],  # fresh prompts and a chunk after 17 cached tokens
    "decode": [(5, 1), (1, 1), (37, 1), (9, 1)],  # includes a sequence whose only key is its own
    "mixed": [(9, 1), (70, 30), (33, 1), (3, 3), (1, 1)],
    "chunks": [(9, 1), (150, 16), (33, 1), (84, 40), (17, 1)],  # chunks after 134 and 44 cached tokens, with decodes
}
# chunks of one fewer and exactly MATMUL_MIN_TOKENS new tokens, fresh and after cached keys, between decodes
BOUNDARY = [(cpu.MATMUL_MIN_TOKENS - 1, cpu.MATMUL_MIN_TOKENS - 1), (3, 1), (cpu.MATMUL_MIN_TOKENS, cpu.MATMUL_MIN_TOKENS),
            (50, cpu.MATMUL_MIN_TOKENS - 1), (61, cpu.MATMUL_MIN_TOKENS), (1, 1)]
# long contexts: a chunk after 1100 cached keys, a whole prompt of 700, a short chunk after 1991, a decode
LONG = [(1500, 400), (700, 700), (2000, 9), (900, 1)]


@pytest.fixture(params=["split", "kernel", "matmul"])
def path(request, monkeypatch):
    """split: as served (chunks of MATMUL_MIN_TOKENS or more through matmuls, the rest through the C kernel);
    kernel / matmul: every sequence, decode rows included, through that one path."""
    threshold = {"split": cpu.MATMUL_MIN_TOKENS, "kernel": 1 << 40, "matmul": 1}[request.param]
    monkeypatch.setattr(cpu, "MATMUL_MIN_TOKENS", threshold)
    return request.param


def assert_matches_reference(case, threads: int = 1, tolerance: dict | None = None) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        expected = _attention_reference(case.q, case.pool, case.batch, case.num_kv_heads)
        out = cpu.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)
    finally:
        torch.set_num_threads(before)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, **(tolerance or TOLERANCE[case.q.dtype]))


@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_matches_reference(make_attention_case, path, dtype, step, ratio):
    """Grouped-query ratios 1/3/4, prefill with and without cached tokens, decode, both at once."""
    case = make_attention_case(STEPS[step], ratio=ratio, dtype=dtype, seed=ratio)
    assert_matches_reference(case)


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_chunks_at_the_threshold_take_their_paths(make_attention_case, dtype):
    """Sequences of fewer new tokens than MATMUL_MIN_TOKENS go to the C kernel, the others to matmuls;
    both kinds, fresh and after cached keys, in one step with decodes."""
    case = make_attention_case(BOUNDARY, num_kv_heads=3, ratio=3, dtype=dtype, seed=8)
    assert_matches_reference(case)
    plan = case.batch._cpu_plan
    assert plan.kernel_seqs.tolist() == [0, 1, 3, 5]
    assert [(chunk.first, chunk.n) for chunk in plan.chunks] == [
        (cpu.MATMUL_MIN_TOKENS, cpu.MATMUL_MIN_TOKENS), (3 * cpu.MATMUL_MIN_TOKENS - 1, cpu.MATMUL_MIN_TOKENS)]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_long_contexts(make_attention_case, dtype):
    """Thousands of keys, SmolLM2's heads (9 query heads on 3 kv heads of 64), a table wider than used."""
    case = make_attention_case(LONG, num_kv_heads=3, ratio=3, head_dim=64, extra_rows=2, extra_cols=33,
                               dtype=dtype, seed=6)
    assert_matches_reference(case)


def test_every_layer_shares_the_plan_of_the_step(make_attention_case):
    """The plan (checks, paths, masks) is built on the first call of a step and reused after it. float16
    chunks take torch's fused attention, with the masks of the chunks after cached keys."""
    case = make_attention_case(STEPS["chunks"], ratio=3, dtype=torch.float16, seed=7)
    first = cpu.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)
    plan = case.batch._cpu_plan
    assert len(plan.masks) == 2  # the two chunks after cached keys; (150, 16) and (84, 40)
    torch.testing.assert_close(cpu.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads), first, atol=0, rtol=0)
    assert case.batch._cpu_plan is plan and len(plan.masks) == 2


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_pages_are_read_through_shuffled_rows_of_a_larger_table(make_attention_case, path, dtype, step):
    """The worker's table: more rows and columns than the step uses, its sequences' rows shuffled, every
    other cell naming a NaN page. The kernel reads only each sequence's own row, up to its context."""
    case = make_attention_case(STEPS[step], ratio=3, extra_rows=7, extra_cols=19, dtype=dtype, seed=11)
    assert case.batch.page_table.shape[0] > len(STEPS[step]) and not torch.equal(
        case.batch.table_rows, torch.arange(len(STEPS[step])))
    assert_matches_reference(case)
    assert_matches_reference(case, threads=2)


def test_stale_cells_outside_the_pool_are_neither_read_nor_refused(make_attention_case, path):
    """Only the pages a sequence uses are checked against the pool: whatever an earlier owner left in a
    row past the context, or in rows of no sequence of the step, is not the kernel's business."""
    case = make_attention_case(STEPS["mixed"], ratio=2, extra_rows=3, extra_cols=5, seed=4)
    table, owned = case.batch.page_table, torch.zeros_like(case.batch.page_table, dtype=torch.bool)
    for row, c in zip(case.batch.table_rows.tolist(), case.batch.context_lens_list):
        owned[row, :c] = True
    table[~owned] = case.pool.shape[0] + 1000
    assert_matches_reference(case)


def test_rows_wider_than_kv_and_head_dim_64(make_attention_case, path):
    """Pool rows longer than K+V (the pool is sized for adapters too) and a real head size."""
    case = make_attention_case(STEPS["mixed"], num_kv_heads=3, ratio=3, head_dim=64, extra_page_dim=40, seed=2)
    assert_matches_reference(case)


def test_two_threads_give_the_one_thread_result(make_attention_case, path):
    assert_matches_reference(make_attention_case(STEPS["chunks"], ratio=2, seed=5), threads=2)


def test_the_dispatcher_uses_the_c_path_on_cpu(make_attention_case):
    case = make_attention_case(STEPS["decode"], seed=1)
    assert cpu.usable(case.q)
    paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)
    assert case.batch._cpu_plan is not None


def test_bad_metadata_is_refused_before_the_c_code_reads_memory(make_attention_case):
    case = make_attention_case(STEPS["decode"], seed=3)
    case.batch.page_table[2, 0] = case.pool.shape[0]
    with pytest.raises(ValueError, match="outside the pool"):
        cpu.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)
    case = make_attention_case(STEPS["decode"], seed=3)
    case.batch.context_lens[1] = case.batch.page_table.shape[1] + 1
    with pytest.raises(ValueError, match="disagree"):
        cpu.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)
    case = make_attention_case(STEPS["decode"], extra_rows=2, seed=3)
    case.batch.table_rows[1] = case.batch.page_table.shape[0]  # one past the last row
    with pytest.raises(ValueError, match="disagree"):
        cpu.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)
    case = make_attention_case(STEPS["decode"], extra_rows=2, seed=3)
    case.batch.page_table[case.batch.table_rows[3], 8] = -1  # the last page of sequence 3 (context 9)
    with pytest.raises(ValueError, match="sequence 3 points outside the pool"):
        cpu.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)


@pytest.mark.parametrize("bad_page", [-1, "num_pages"])
def test_a_chunk_pointing_outside_the_pool_is_refused(make_attention_case, bad_page):
    """The matmul path checks a chunk's pages once per step, before the first gather."""
    case = make_attention_case(STEPS["chunks"], extra_rows=2, seed=3)
    assert 3 in [i for i, (_, n) in enumerate(STEPS["chunks"]) if n >= cpu.MATMUL_MIN_TOKENS]
    case.batch.page_table[case.batch.table_rows[3], 83] = case.pool.shape[0] if bad_page == "num_pages" else bad_page
    with pytest.raises(ValueError, match="sequence 3 points outside the pool"):
        cpu.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)


@pytest.fixture(params=["native", "generic"])
def bf16_library(request, monkeypatch):
    """Both bfloat16 paths of the C library: dot products (AVX512-BF16, this machine) and the fallback;
    every sequence, chunks included, goes to the C kernel."""
    monkeypatch.setattr(cpu, "MATMUL_MIN_TOKENS", 1 << 40)
    if request.param == "generic":
        monkeypatch.setattr(cpu, "_library", cpu.load_variant(cpu.GENERIC_BF16))
    return request.param


@pytest.mark.parametrize("head_dim", [16, 40, 64, 128, 272])
def test_both_bfloat16_paths_match_the_reference(make_attention_case, bf16_library, head_dim):
    """Head sizes of one, two, four and eight 16-lane registers, one with a masked tail (40) and one
    past the native kernel's 256 (its generic fallback); contexts that are and are not multiples of
    the 16 keys scored at once (1, 16, 17, 33, 150), prefill and decode in one step."""
    steps = [(17, 1), (150, 40), (16, 1), (1, 1), (33, 33)]
    case = make_attention_case(steps, num_kv_heads=2, ratio=3, head_dim=head_dim, dtype=torch.bfloat16, seed=head_dim)
    assert_matches_reference(case)


def test_bfloat16_softmax_survives_large_scores(make_attention_case, bf16_library):
    """Scores of several hundred: the max is taken before exp, so nothing overflows to inf or NaN."""
    case = make_attention_case(STEPS["mixed"], num_kv_heads=1, ratio=2, head_dim=64, dtype=torch.bfloat16, seed=9)
    case.q.mul_(40)
    assert_matches_reference(case)
    assert torch.isfinite(cpu.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)).all()


@pytest.mark.parametrize("head_dim", [8, 24, 40, 72, 136, 264])
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_head_sizes_with_tails_through_the_c_kernel(make_attention_case, monkeypatch, dtype, head_dim):
    """Head sizes that are not a multiple of the 16 (or 8) values the kernel converts at once, in every
    dtype, every sequence (chunks too) through the C kernel; contexts of 1 to 150 keys. 136 and 264 pass
    the AVX-512 kernel's widest float32 head (128), and 264 its widest bfloat16 one (256): the generic loop."""
    monkeypatch.setattr(cpu, "MATMUL_MIN_TOKENS", 1 << 40)
    steps = [(17, 1), (150, 40), (16, 1), (1, 1), (33, 33)]
    case = make_attention_case(steps, num_kv_heads=2, ratio=3, head_dim=head_dim, dtype=dtype, seed=head_dim)
    assert_matches_reference(case)


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_softmax_survives_large_scores_on_both_paths(make_attention_case, path, dtype):
    """Scores of several hundred: the max is taken before exp, so nothing overflows to inf or NaN. In
    float32 the scores' own rounding (~400 * 2^-24) moves each weight by up to ~3e-5 either way."""
    case = make_attention_case(STEPS["chunks"], num_kv_heads=1, ratio=2, head_dim=64, dtype=dtype, seed=9)
    case.q.mul_(40)
    assert_matches_reference(case, tolerance=dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else None)
    assert torch.isfinite(cpu.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)).all()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 compiler flags")
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_the_library_built_without_avx512_matches_the_reference(make_attention_case, monkeypatch, dtype):
    """What a CPU without AVX-512 compiles: the scalar softmax, float16 rows through F16C, the generic
    bfloat16 loop; every sequence through the C kernel."""
    monkeypatch.setattr(cpu, "_library", cpu.load_variant(("-mno-avx512f",)))
    monkeypatch.setattr(cpu, "MATMUL_MIN_TOKENS", 1 << 40)
    assert not cpu.native_bf16()
    for head_dim in (16, 40, 64):
        case = make_attention_case([(17, 1), (150, 40), (16, 1), (1, 1), (33, 33)], num_kv_heads=2, ratio=3,
                                   head_dim=head_dim, dtype=dtype, seed=head_dim)
        assert_matches_reference(case)


@pytest.fixture(autouse=True)
def chunk_kernel_even_with_amx(monkeypatch):
    """On a CPU with AMX, bfloat16 chunks are served by torch's fused attention (cpu.chunk_kernel); the
    tests hold the C chunk kernel, which such a CPU runs too, to the reference all the same."""
    monkeypatch.setattr(cpu, "amx_bf16", lambda lib=None: False)


def chunk_kernel_here(dtype: torch.dtype) -> bool:
    """Whether this machine's library has the C chunk kernel of dtype (AVX-512; bfloat16: AVX512-BF16 too)."""
    return cpu.chunk_kernel(cpu.library(), torch.empty(1, 1, 2, dtype=dtype)) is not None


@pytest.mark.parametrize("head_dim", [16, 40, 64, 96, 128, 256])
@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunks_run_in_the_c_chunk_kernel(make_attention_case, monkeypatch, dtype, head_dim, ratio):
    """Where the library has it, chunks go to chunk_attention_*, not torch's fused attention: head sizes of
    one to sixteen registers (40: a masked tail; 96 and 256: more than one 64-dim pass of P.V), chunks of
    8 to 97 tokens that are and are not multiples of the 32 tokens of a task and the 32 keys of a block,
    fresh and after cached keys, beside decodes."""
    if not chunk_kernel_here(dtype):
        pytest.skip(f"no C chunk kernel for {dtype} on this CPU")

    def no_fused(*args, **kwargs):
        raise AssertionError("a chunk went to torch's fused attention")

    monkeypatch.setattr(cpu, "_chunk_attention", no_fused)
    steps = [(97, 97), (9, 1), (64, 32), (150, 33), (8, 8), (40, 9)]
    case = make_attention_case(steps, num_kv_heads=2, ratio=ratio, head_dim=head_dim, extra_rows=3, extra_cols=7,
                               dtype=dtype, seed=head_dim + ratio)
    assert_matches_reference(case)
    assert_matches_reference(case, threads=2)
    assert case.batch._cpu_plan.chunk_seqs.tolist() == [0, 2, 3, 4, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_an_earlier_token_never_reads_a_later_value(make_attention_case, dtype):
    """Rows of one block of the chunk kernel see different numbers of keys. A later position's V of inf
    must not reach an earlier token (0 * inf is NaN; torch's fused attention, the reference, does let it
    in): those tokens stay finite and equal what they are with a finite V there."""
    if not chunk_kernel_here(dtype):
        pytest.skip(f"no C chunk kernel for {dtype} on this CPU")
    case = make_attention_case([(40, 40), (70, 30)], num_kv_heads=1, ratio=3, head_dim=64, dtype=dtype, seed=12)
    expected = _attention_reference(case.q, case.pool, case.batch, case.num_kv_heads)
    kv_size = 64
    for i, c in enumerate(case.batch.context_lens_list):
        last_page = case.batch.page_table[case.batch.table_rows[i], c - 1]
        case.pool[last_page, kv_size:2 * kv_size] = float("inf")
    out = cpu.paged_attention(case.q, case.pool, case.batch, case.num_kv_heads)
    earlier = torch.cat([torch.arange(0, 39), torch.arange(40, 69)])  # all but each sequence's last token
    assert torch.isfinite(out[earlier]).all()
    torch.testing.assert_close(out[earlier], expected[earlier], **TOLERANCE[dtype])
