"""The C LoRA kernels of the CPU path (kernels/cpu.c) equal the torch reference."""
from __future__ import annotations

import pytest
import torch

from lorafleet.kernels import cpu
from lorafleet.kernels.lora import _expand_reference, _shrink_reference, lora_apply, lora_expand, lora_shrink

TOLERANCE = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=3e-2),
}
DTYPES = list(TOLERANCE)

PREFILL = [(0, 37), (-1, 3), (1, 1), (2, 5), (-1, 1), (0, 1)]  # adapter 0 comes back after others
DECODE = [(1, 1), (-1, 1), (0, 1), (2, 1), (2, 1), (-1, 1), (0, 1), (1, 1)]


def assert_matches_reference(case, threads: int = 1) -> None:
    tol = TOLERANCE[case.x.dtype]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        expected_s = _shrink_reference(case.x, case.pool, case.batch, case.group)
        s = cpu.shrink(case.x, case.pool, case.batch, case.group)
        assert s.shape == expected_s.shape and s.dtype == expected_s.dtype
        torch.testing.assert_close(s, expected_s, **tol)
        expected_y = _expand_reference(case.y.clone(), expected_s, case.pool, case.batch, case.group)
        y = case.y.clone()
        assert cpu.expand(y, expected_s, case.pool, case.batch, case.group) is y
        torch.testing.assert_close(y, expected_y, **tol)
        if case.group.shards == 1:  # tp = 1: shrink and expand in one C call, the same kernels in the same order
            y_two = cpu.expand(case.y.clone(), s, case.pool, case.batch, case.group)
            y_one = case.y.clone()
            assert lora_apply(y_one, case.x, case.pool, case.batch, case.group) is y_one
            assert torch.equal(y_one, y_two)
    finally:
        torch.set_num_threads(before)


def test_the_library_builds_here_and_the_cpu_ops_use_it(make_lora_case):
    """CI has a C compiler: a broken build must fail here, not fall back to torch unnoticed."""
    assert cpu.library() is not None, cpu._failed
    case = make_lora_case([[8, 8, 8]], [0, 0, -1])
    assert cpu.usable(case.x)
    assert lora_shrink(case.x, case.pool, case.batch, case.group) is not None
    assert case.batch._cpu_segments is not None  # the dispatcher took the C path


@pytest.mark.parametrize("pattern", ["prefill", "decode"])
@pytest.mark.parametrize("rank", [1, 8, 16, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_uniform_rank(make_lora_case, lora_tokens, dtype, rank, pattern):
    tokens = lora_tokens(PREFILL if pattern == "prefill" else DECODE)
    assert_matches_reference(make_lora_case([[rank] * 3] * 3, tokens, dtype=dtype, seed=rank))


@pytest.mark.parametrize("num_adapters", [1, 5, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_ranks_and_missing_targets(make_lora_case, dtype, num_adapters):
    gen = torch.Generator().manual_seed(num_adapters)
    choices = torch.tensor([0, 1, 8, 16, 64, 128])
    ranks = choices[torch.randint(0, len(choices), (num_adapters, 3), generator=gen)].tolist()
    ranks[0] = [1, 0, 128]
    tokens = torch.randint(-1, num_adapters, (23,), generator=gen).tolist()
    assert_matches_reference(make_lora_case(ranks, tokens, dtype=dtype, layout="interleaved", seed=num_adapters))


@pytest.mark.parametrize("page_dim", [7, 100, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_across_pages_rank_256_and_wide_outputs(make_lora_case, lora_tokens, page_dim, dtype):
    """Rows of A and B^T start and end anywhere in a page, or span several pages (a 32-element
    block of the bfloat16 kernels then reads from up to six pages)."""
    tokens = lora_tokens([(0, 20), (-1, 2), (1, 9), (0, 1)])
    case = make_lora_case([[256, 32], [2, 256]], tokens, in_dim=144, out_dims=(160, 40), page_dim=page_dim,
                          dtype=dtype, seed=3)
    assert_matches_reference(case)


def test_native_bfloat16_kernels_are_built_where_the_cpu_has_them():
    """-march=native on a CPU with AVX512-BF16 must give the dot-product kernels, not the fallback."""
    flags = next((set(line.split(":", 1)[1].split()) for line in open("/proc/cpuinfo") if line.startswith("flags")), set())
    assert cpu.native_bf16() == ({"avx512_bf16", "avx512bw", "avx512_vbmi2"} <= flags)
    assert not cpu.native_bf16(cpu.load_variant(cpu.GENERIC_BF16))


@pytest.fixture(params=["native", "no_amx", "generic"])
def bf16_library(request, monkeypatch):
    """The bfloat16 paths of the C library: the native one (this machine's), the native one without AMX
    tiles (long segments in AVX512-BF16 registers; the same as native on CPUs without AMX) and the
    float32-converting fallback."""
    if request.param != "native":
        monkeypatch.setattr(cpu, "_library", cpu.load_variant(cpu.NO_AMX if request.param == "no_amx" else cpu.GENERIC_BF16))
    return request.param


@pytest.mark.parametrize("layout", ["packed", "interleaved"])
def test_both_bfloat16_paths_match_the_reference(make_lora_case, bf16_library, layout):
    """Odd ranks (an expand row pair padded with zero), odd dims (masked tails), 17+ tokens of one
    adapter (more than one pass of the expand's token block), idle adapters and base-only tokens."""
    gen = torch.Generator().manual_seed(21)
    ranks = [[1, 3, 0], [5, 0, 7], [64, 33, 2], [0, 0, 9]]
    tokens = [0] * 3 + [2] * 19 + [-1] * 2 + [1] * 5 + torch.randint(-1, 3, (9,), generator=gen).tolist()
    case = make_lora_case(ranks, tokens, in_dim=45, out_dims=(33, 31, 64), page_dim=13, dtype=torch.bfloat16,
                          layout=layout, seed=21)
    assert_matches_reference(case)


@pytest.mark.parametrize("shards", [1, 2])
def test_bfloat16_decode_reads_adapters_in_one_piece_with_plain_loads(make_lora_case, bf16_library, shards):
    """Adapters whose pages follow each other (as loading lays them out) are read at one address in
    decode, four A rows at a time and one token's expand in registers, 192 outputs at a time: the ranks
    above, odd dims (231 outputs: one whole block of 192 and a masked one), pages of 13 and of 7
    elements (every row crosses pages), segments of 1-3 tokens, and (shards = 2) the expand of an
    all-gathered s."""
    ranks = [[1, 3, 0], [5, 0, 7], [64, 33, 2], [0, 0, 9], [16, 8, 4]]
    tokens = [0, 2, -1, 1, 2, 4, 4, 3, 2, 4]
    for page_dim in (13, 7):
        case = make_lora_case(ranks, tokens, in_dim=45, out_dims=(33, 231, 64), page_dim=page_dim, dtype=torch.bfloat16,
                              shards=shards, seed=page_dim, runs=True)
        if shards == 1:
            assert_matches_reference(case)
            continue
        s = torch.randn(len(tokens), 3, shards * case.group.max_rank).bfloat16()
        expected = _expand_reference(case.y.clone(), s, case.pool, case.batch, case.group)
        torch.testing.assert_close(cpu.expand(case.y.clone(), s, case.pool, case.batch, case.group), expected,
                                   **TOLERANCE[torch.bfloat16])


def test_native_and_generic_bfloat16_agree_to_rounding(make_lora_case, lora_tokens, monkeypatch):
    """Both accumulate in float32: they differ only in the order of the sums, so at most an ulp of bf16."""
    case = make_lora_case([[16, 8, 64]] * 3, lora_tokens(PREFILL), dtype=torch.bfloat16, seed=8)
    native_s = cpu.shrink(case.x, case.pool, case.batch, case.group)
    native_y = cpu.expand(case.y.clone(), native_s, case.pool, case.batch, case.group)
    monkeypatch.setattr(cpu, "_library", cpu.load_variant(cpu.GENERIC_BF16))
    generic_s = cpu.shrink(case.x, case.pool, case.batch, case.group)
    generic_y = cpu.expand(case.y.clone(), native_s, case.pool, case.batch, case.group)
    ulp = lambda t: t.float().abs().clamp_min(1e-3) * 2.0 ** -7  # noqa: E731 (bf16 keeps 8 significant bits)
    assert ((native_s.float() - generic_s.float()).abs() <= ulp(generic_s)).all()
    assert ((native_y.float() - generic_y.float()).abs() <= ulp(generic_y)).all()


def test_padded_shrink_width_and_idle_adapter(make_lora_case, lora_tokens):
    """s is wider than any rank (TP padding) and adapter 1 is resident but has no tokens."""
    tokens = lora_tokens([(0, 3), (-1, 2), (2, 4)])
    assert_matches_reference(make_lora_case([[8, 0, 8], [16, 16, 16], [4, 2, 1]], tokens, max_rank=24, seed=5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_expand_sums_all_gathered_shards(make_lora_case, lora_tokens, dtype):
    """Tensor parallelism: s is (T, G, 2 * R), two shrink outputs, and B_g has 2 * r columns
    (with r = 3, the bfloat16 expand's row pairs straddle the two shards)."""
    tokens = lora_tokens([(0, 5), (-1, 1), (1, 2), (0, 1)])
    case = make_lora_case([[4, 0, 3], [16, 8, 2]], tokens, dtype=dtype, max_rank=20, shards=2, seed=13)
    s = torch.randn(len(tokens), 3, 2 * 20).to(dtype)
    expected = _expand_reference(case.y.clone(), s, case.pool, case.batch, case.group)
    y = cpu.expand(case.y.clone(), s, case.pool, case.batch, case.group)
    torch.testing.assert_close(y, expected, **TOLERANCE[dtype])


def test_two_threads_give_the_one_thread_result(make_lora_case):
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(-1, 6, (40,), generator=gen).tolist()
    assert_matches_reference(make_lora_case([[8, 16, 4]] * 3 + [[64, 0, 2]] * 3, tokens, seed=2), threads=2)


def test_bfloat16_decode_segments_claimed_by_two_threads(make_lora_case, bf16_library):
    """In the expand, two threads take a decode step's one-token segments (adapters in runs) as each
    finishes one, claiming its next before it starts, to prefetch that one's B: every segment is
    expanded once, by one thread (one taken twice would add its delta twice, one skipped none)."""
    gen = torch.Generator().manual_seed(4)
    ranks = [[8, 16, 4], [16, 8, 0], [4, 4, 4], [0, 8, 16], [1, 3, 2]] * 7
    tokens = torch.randperm(len(ranks), generator=gen).tolist() + [-1, 5, 17, 17]
    case = make_lora_case(ranks, tokens, in_dim=45, out_dims=(33, 231, 64), page_dim=13, dtype=torch.bfloat16,
                          seed=9, runs=True)
    for _ in range(3):
        assert_matches_reference(case, threads=2)


@pytest.mark.parametrize("threads", [1, 2])
def test_bfloat16_short_segments_in_one_piece_read_each_weight_once_for_their_tokens(make_lora_case, bf16_library,
                                                                                      threads):
    """Adapters in runs of pages with 1-7 tokens each, interleaved in the step (a decode step where several
    sequences share an adapter): the shrink takes up to four tokens per pass over A_g, the expand two per
    pass over B_g^T, their sums in registers; odd ranks and outputs that end inside a block of 32, or of 96."""
    ranks = [[8, 16, 4], [3, 5, 0], [16, 16, 16], [0, 7, 1], [12, 8, 2], [5, 0, 9], [4, 4, 4]]
    counts = [1, 2, 3, 4, 5, 6, 7]
    tokens = [a for a, c in enumerate(counts) for _ in range(c)] + [-1, -1]
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(5)).tolist()
    case = make_lora_case(ranks, [tokens[i] for i in order], in_dim=70, out_dims=(33, 231, 100), page_dim=17,
                          dtype=torch.bfloat16, seed=12, runs=True)
    assert_matches_reference(case, threads=threads)


def test_one_call_refuses_what_needs_two(make_lora_case, lora_tokens):
    """lora_apply is for groups with no collective between shrink and expand; its packed arguments hold
    the page size of the step's first call."""
    case = make_lora_case([[8, 8, 8], [4, 0, 2]], lora_tokens([(0, 4), (1, 3)]), seed=3, shards=2)
    with pytest.raises(ValueError, match="all-gathered over 2 ranks"):
        lora_apply(case.y, case.x, case.pool, case.batch, case.group)
    case = make_lora_case([[8, 8, 8], [4, 0, 2]], lora_tokens([(0, 4), (1, 3)]), seed=3)
    with pytest.raises(ValueError, match="outputs sum to"):
        lora_apply(case.y[:, :-1], case.x, case.pool, case.batch, case.group)
    lora_apply(case.y, case.x, case.pool, case.batch, case.group)
    wider_pages = torch.zeros(case.pool.shape[0], case.pool.shape[1] + 8)
    with pytest.raises(ValueError, match="earlier calls had"):
        lora_apply(case.y, case.x, wider_pages, case.batch, case.group)


def test_base_only_tokens_get_nothing(make_lora_case):
    case = make_lora_case([[8, 8, 8]], [-1] * 5)
    s = cpu.shrink(case.x, case.pool, case.batch, case.group)
    assert torch.equal(s, torch.zeros_like(s))
    y = case.y.clone()
    cpu.expand(y, torch.ones_like(s), case.pool, case.batch, case.group)
    assert torch.equal(y, case.y)


def test_expand_writes_only_its_columns_of_a_wider_buffer(make_lora_case, lora_tokens):
    """y may be a column slice of a larger output (the row-parallel fused path)."""
    case = make_lora_case([[8, 8, 8], [4, 0, 2]], lora_tokens([(0, 4), (1, 3)]), seed=9)
    s = _shrink_reference(case.x, case.pool, case.batch, case.group)
    wide = torch.randn(case.y.shape[0], case.y.shape[1] + 7)
    untouched = wide[:, -7:].clone()
    expected = _expand_reference(wide[:, :-7].clone(), s, case.pool, case.batch, case.group)
    lora_expand(wide[:, :-7], s, case.pool, case.batch, case.group)
    torch.testing.assert_close(wide[:, :-7], expected, **TOLERANCE[torch.float32])
    assert torch.equal(wide[:, -7:], untouched)


def test_strided_activations_are_read_correctly(make_lora_case):
    case = make_lora_case([[8, 8, 8], [16, 4, 0]], [0, 1, 0, -1, 1], seed=4)
    wide = torch.randn(5, case.x.shape[1] * 2)
    wide[:, ::2] = case.x  # a view whose columns are not adjacent
    s = cpu.shrink(wide[:, ::2], case.pool, case.batch, case.group)
    torch.testing.assert_close(s, _shrink_reference(case.x, case.pool, case.batch, case.group), **TOLERANCE[torch.float32])


def test_bad_metadata_is_refused_before_the_c_code_reads_memory(make_lora_case):
    case = make_lora_case([[8, 8, 8], [4, 4, 4]], [0, 1, 1], seed=6)
    case.batch.page_table[1, 0] = case.pool.shape[0]  # one past the last page
    with pytest.raises(ValueError, match="outside the pool"):
        cpu.shrink(case.x, case.pool, case.batch, case.group)

    case = make_lora_case([[8, 8, 8], [4, 4, 4]], [0, 1, 1], seed=6)
    case.group.b_offset[0, 2] = case.batch.page_table.shape[1] * case.pool.shape[1]  # past the adapter's pages
    with pytest.raises(ValueError, match="past its adapter's pages"):
        cpu.expand(case.y, torch.zeros(3, 3, 8), case.pool, case.batch, case.group)

    case = make_lora_case([[8, 8, 8]], [0, 0], seed=6)
    case.batch.token_adapter[1] = 3
    with pytest.raises(ValueError, match="names adapter 3"):
        cpu.shrink(case.x, case.pool, case.batch, case.group)


def test_the_library_is_keyed_by_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path))
    path = cpu.build()
    assert path.parent == tmp_path and path.is_file()
    assert cpu.build() == path  # built once
    monkeypatch.setattr(cpu, "_cpu_key", lambda: "another cpu")
    assert cpu.library_path() != path


# ---------------------------------------------------------------- long segments: matrix products

LONG = [cpu.TILE_TOKENS - 1, cpu.TILE_TOKENS, cpu.TILE_TOKENS + 1, 16, 17, 40, 128]


def test_amx_tiles_are_used_where_the_cpu_has_them():
    """Long bfloat16 segments run on AMX tiles where the CPU (and Linux) has them, not on the dot products."""
    flags = next((set(line.split(":", 1)[1].split()) for line in open("/proc/cpuinfo") if line.startswith("flags")), set())
    assert cpu.amx_bf16() == ({"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw", "avx512_vbmi2"} <= flags)
    assert not cpu.amx_bf16(cpu.load_variant(cpu.GENERIC_BF16))


def threshold_case(make_lora_case, lora_tokens, length: int, dtype: torch.dtype):
    """Several adapters of mixed ranks (1, 17, 33: not multiples of a tile), each one run of `length` tokens
    as the scheduler sorts them, beside base-only tokens and a short segment that stays on the dot products;
    in_dim 64 lets the tiles read x in place."""
    tokens = lora_tokens([(0, length), (-1, 3), (1, length), (2, length + 5), (3, 2), (-1, 1)])
    ranks = [[8, 16, 4], [64, 0, 33], [1, 128, 17], [16, 16, 16]]
    return make_lora_case(ranks, tokens, in_dim=64, out_dims=(96, 32, 40), page_dim=50, dtype=dtype, seed=length)


@pytest.mark.parametrize("length", LONG)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segments_around_the_threshold(make_lora_case, lora_tokens, dtype, length):
    assert_matches_reference(threshold_case(make_lora_case, lora_tokens, length, dtype))


@pytest.mark.parametrize("length", LONG)
def test_bfloat16_segments_around_the_threshold_on_every_path(make_lora_case, lora_tokens, bf16_library, length):
    """bfloat16's long segments on AMX tiles, in vdpbf16ps registers (rows in blocks of 4: 7, 9 and 17
    tokens leave partial blocks) and in the float32 fallback."""
    assert_matches_reference(threshold_case(make_lora_case, lora_tokens, length, torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_segments_of_scattered_rows_and_odd_dims(make_lora_case, dtype):
    """Tokens of each adapter spread over the step (the rows of x are gathered, not read in place), odd
    in_dim and outputs (masked tails), pages of 7 elements (every row crosses pages), interleaved layout."""
    gen = torch.Generator().manual_seed(11)
    tokens = torch.tensor([0] * 30 + [1] * 21 + [2] * 9 + [-1] * 4)[torch.randperm(64, generator=gen)].tolist()
    case = make_lora_case([[5, 0, 64], [33, 7, 1], [16, 16, 16]], tokens, in_dim=45, out_dims=(33, 31, 70),
                          page_dim=7, dtype=dtype, layout="interleaved", seed=11)
    assert_matches_reference(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_segments_with_shards_and_two_threads(make_lora_case, lora_tokens, dtype):
    """Tensor parallelism's all-gathered s (two shards of r = 3 and 9), segments in parallel on two threads."""
    tokens = lora_tokens([(0, 37), (-1, 2), (1, 20), (2, 1)])
    case = make_lora_case([[3, 9, 0], [9, 3, 3], [4, 4, 4]], tokens, dtype=dtype, max_rank=12, shards=2, seed=17)
    s = torch.randn(len(tokens), 3, 2 * 12).to(dtype)
    expected = _expand_reference(case.y.clone(), s, case.pool, case.batch, case.group)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = cpu.expand(case.y.clone(), s, case.pool, case.batch, case.group)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, expected, **TOLERANCE[dtype])
    case.group.shards, case.group.max_rank = 1, 12  # the shrink of the same step: one shard's output
    assert_matches_reference(case, threads=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matrix_products_and_dot_products_agree_to_rounding(make_lora_case, lora_tokens, monkeypatch, dtype):
    """Both sum in float32 and round once (s to its dtype; y + scale * delta): they differ only in the order
    of the sums, so switching at the threshold changes a result by at most an ulp."""
    case = make_lora_case([[16, 8, 64], [1, 32, 0]], lora_tokens([(0, 50), (-1, 1), (1, 19)]), in_dim=96,
                          dtype=dtype, seed=23)
    products_s = cpu.shrink(case.x, case.pool, case.batch, case.group)
    products_y = cpu.expand(case.y.clone(), products_s, case.pool, case.batch, case.group)
    monkeypatch.setattr(cpu, "TILE_TOKENS", 10**9)
    dots_s = cpu.shrink(case.x, case.pool, case.batch, case.group)
    dots_y = cpu.expand(case.y.clone(), products_s, case.pool, case.batch, case.group)
    if dtype == torch.float32:  # the order of the sums moves only the last bits
        torch.testing.assert_close(products_s, dots_s, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(products_y, dots_y, atol=1e-6, rtol=1e-5)
        return
    ulp = lambda t: t.float().abs().clamp_min(1e-3) * 2.0 ** -7  # noqa: E731 (bf16 keeps 8 significant bits)
    assert ((products_s.float() - dots_s.float()).abs() <= ulp(dots_s)).all()
    assert ((products_y.float() - dots_y.float()).abs() <= ulp(dots_y)).all()


def test_torch_bfloat16_matmul_is_right_after_the_tiles(make_lora_case, lora_tokens):
    """The tile kernels give the tile registers back: torch's own bfloat16 matmul (oneDNN, AMX too) on the
    same thread still computes the right product."""
    case = make_lora_case([[64, 64, 64]], lora_tokens([(0, 64)]), in_dim=64, dtype=torch.bfloat16, seed=29)
    gen = torch.Generator().manual_seed(29)
    a, b = torch.randn(128, 256, generator=gen).bfloat16(), torch.randn(96, 256, generator=gen).bfloat16()
    for _ in range(2):
        cpu.expand(case.y.clone(), cpu.shrink(case.x, case.pool, case.batch, case.group), case.pool, case.batch, case.group)
        torch.testing.assert_close(torch.nn.functional.linear(a, b).float(), a.float() @ b.float().T, atol=0.5, rtol=2e-2)
