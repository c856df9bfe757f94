"""The Triton LoRA kernels (under TRITON_INTERPRET=1) equal the torch reference."""
from __future__ import annotations

import pytest
import torch

from lorafleet.kernels import triton_lora
from lorafleet.kernels.lora import _expand_reference, _shrink_reference

TOLERANCE = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=3e-2),
}
DTYPES = list(TOLERANCE)
BLOCK = triton_lora.SEGMENT_BLOCK_M

# A prefill step: runs longer than one tile, runs of one token, base-only runs, and
# adapter 0 coming back after others (two requests of one adapter).
PREFILL = [(0, BLOCK + 8), (-1, 3), (1, 1), (2, 5), (-1, 1), (0, 1)]
# A decode step: one token per sequence, adapters in no order, base-only among them.
DECODE = [(1, 1), (-1, 1), (0, 1), (2, 1), (2, 1), (-1, 1), (0, 1), (1, 1)]


def assert_kernels_match(case, mode: str) -> None:
    tol = TOLERANCE[case.x.dtype]
    expected_s = _shrink_reference(case.x, case.pool, case.batch, case.group)
    s = triton_lora.shrink(case.x, case.pool, case.batch, case.group, mode=mode)
    assert s.shape == expected_s.shape and s.dtype == expected_s.dtype
    torch.testing.assert_close(s, expected_s, **tol)

    expected_y = _expand_reference(case.y.clone(), expected_s, case.pool, case.batch, case.group)
    y = case.y.clone()
    assert triton_lora.expand(y, expected_s, case.pool, case.batch, case.group, mode=mode) is y
    torch.testing.assert_close(y, expected_y, **tol)


@pytest.mark.parametrize("mode", ["segment", "token"])
@pytest.mark.parametrize("rank", [1, 8, 16, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_uniform_rank(make_lora_case, lora_tokens, dtype, rank, mode):
    tokens = lora_tokens(PREFILL if mode == "segment" else DECODE)
    case = make_lora_case([[rank] * 3] * 3, tokens, dtype=dtype, seed=rank)
    assert_kernels_match(case, mode)


@pytest.mark.parametrize("mode", ["segment", "token"])
@pytest.mark.parametrize("num_adapters", [1, 5, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_ranks_in_one_launch(make_lora_case, dtype, num_adapters, mode):
    """Ranks 1..128 and missing targets side by side, A and B interleaved in the vectors."""
    gen = torch.Generator().manual_seed(num_adapters)
    choices = torch.tensor([0, 1, 8, 16, 64, 128])
    ranks = choices[torch.randint(0, len(choices), (num_adapters, 3), generator=gen)].tolist()
    ranks[0] = [1, 0, 128]
    if mode == "segment":
        lengths = torch.randint(1, 12, (num_adapters + 2,), generator=gen).tolist()
        tokens = [a for a, n in zip(list(range(num_adapters)) + [-1, 0], lengths) for _ in range(n)]
    else:
        tokens = torch.randint(-1, num_adapters, (10,), generator=gen).tolist()
    case = make_lora_case(ranks, tokens, dtype=dtype, layout="interleaved", seed=num_adapters)
    assert_kernels_match(case, mode)


@pytest.mark.parametrize("length", [1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 3])
def test_segment_length_across_tile_edges(make_lora_case, lora_tokens, length):
    tokens = lora_tokens([(1, 2), (0, length), (1, 1)])
    case = make_lora_case([[8, 16, 4], [16, 16, 16]], tokens, seed=length)
    assert_kernels_match(case, "segment")


@pytest.mark.parametrize("mode", ["segment", "token"])
def test_rank_256_and_wide_shapes(make_lora_case, lora_tokens, mode):
    """The largest rank spans several rank blocks; outputs span several column blocks."""
    tokens = lora_tokens([(0, 3), (1, 2)] if mode == "token" else [(0, 20), (-1, 2), (1, 9)])
    case = make_lora_case(
        [[256, 32], [2, 256]], tokens, in_dim=144, out_dims=(160, 40), page_dim=100, seed=3
    )
    assert_kernels_match(case, mode)


@pytest.mark.parametrize("mode", ["auto", "segment", "token"])
def test_padded_shrink_width_and_idle_adapter(make_lora_case, lora_tokens, mode):
    """s is wider than any rank (TP padding) and adapter 1 is resident but has no tokens."""
    tokens = lora_tokens([(0, 3), (-1, 2), (2, 4)])
    case = make_lora_case([[8, 0, 8], [16, 16, 16], [4, 2, 1]], tokens, max_rank=24, seed=5)
    assert_kernels_match(case, mode)


@pytest.mark.parametrize("mode", ["segment", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_expand_sums_all_gathered_shards(make_lora_case, lora_tokens, dtype, mode):
    """Tensor parallelism: s is (T, G, 2 * R), two shrink outputs, and B_g has 2 * r columns."""
    tokens = lora_tokens([(0, 5), (-1, 1), (1, 2), (0, 1)])
    case = make_lora_case([[4, 0, 8], [16, 8, 2]], tokens, dtype=dtype, max_rank=20, shards=2, seed=13)
    s = torch.randn(len(tokens), 3, 2 * 20).to(dtype)
    expected = _expand_reference(case.y.clone(), s, case.pool, case.batch, case.group)
    y = triton_lora.expand(case.y.clone(), s, case.pool, case.batch, case.group, mode=mode)
    torch.testing.assert_close(y, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("tokens", [[0, 1, -1, 1, 0], [0] * 6 + [1] * 5])
def test_auto_mode_matches_reference_for_decode_and_prefill(make_lora_case, tokens):
    case = make_lora_case([[8, 8, 8], [16, 4, 0]], tokens, dtype=torch.float16, seed=7)
    assert_kernels_match(case, "auto")


@pytest.mark.parametrize("mode", ["auto", "segment", "token"])
def test_base_only_tokens_get_nothing(make_lora_case, mode):
    case = make_lora_case([[8, 8, 8]], [-1] * 5)
    s = triton_lora.shrink(case.x, case.pool, case.batch, case.group, mode=mode)
    assert torch.equal(s, torch.zeros_like(s))
    y = case.y.clone()
    triton_lora.expand(y, torch.ones_like(s), case.pool, case.batch, case.group, mode=mode)
    assert torch.equal(y, case.y)


def test_expand_writes_only_its_columns_of_a_wider_buffer(make_lora_case, lora_tokens):
    """y may be a column slice of a larger output (row stride > width)."""
    case = make_lora_case([[8, 8, 8], [4, 0, 2]], lora_tokens([(0, 4), (1, 3)]), seed=9)
    s = _shrink_reference(case.x, case.pool, case.batch, case.group)
    wide = torch.randn(case.y.shape[0], case.y.shape[1] + 7)
    untouched = wide[:, -7:].clone()
    expected = _expand_reference(wide[:, :-7].clone(), s, case.pool, case.batch, case.group)
    triton_lora.expand(wide[:, :-7], s, case.pool, case.batch, case.group, mode="segment")
    torch.testing.assert_close(wide[:, :-7], expected, **TOLERANCE[torch.float32])
    assert torch.equal(wide[:, -7:], untouched)


def test_segment_tiles_cut_runs_into_blocks():
    token_adapter = torch.tensor([2, 2, 2, 2, 2, -1, -1, 0, 2, 2])
    tiles = triton_lora.segment_tiles(token_adapter, block_m=2)
    # rows: first token, count, adapter
    assert tiles.tolist() == [[0, 2, 4, 7, 8], [2, 2, 1, 1, 2], [2, 2, 2, 0, 2]]


def test_launchers_refuse_bad_inputs(make_lora_case):
    case = make_lora_case([[8, 8, 8]], [0, 0, -1])
    args = (case.pool, case.batch, case.group)
    with pytest.raises(ValueError, match="pool"):
        triton_lora.shrink(case.x, case.pool.half(), case.batch, case.group)
    with pytest.raises(ValueError, match="pool"):
        triton_lora.shrink(case.x, case.pool.t().contiguous().t(), case.batch, case.group)
    with pytest.raises(ValueError, match="in_dim"):
        triton_lora.shrink(case.x[:, :-1], *args)
    with pytest.raises(ValueError, match="mode"):
        triton_lora.shrink(case.x, *args, mode="fast")
    s = triton_lora.shrink(case.x, *args)
    with pytest.raises(ValueError, match="s "):
        triton_lora.expand(case.y, s[:, :2], *args)
    with pytest.raises(ValueError, match="columns"):
        triton_lora.expand(case.y[:, :-1], s, *args)
    with pytest.raises(ValueError, match="activations"):
        triton_lora.expand(case.y.t(), s, *args)


def test_kernels_compile_for_gpu(gpu_compile):
    """Block choices for rank 16 and 256 compile to a cubin (pages of Llama-2-7B and of SmolLM2)."""
    def job(kernel, dtype, arch=90, **constants):
        pointers = {name: f"*{dtype}" for name in ("x_ptr", "pool_ptr", "s_ptr", "y_ptr")} | {"scale_ptr": "*fp32"}
        if "segment" in kernel:
            constants |= dict(BLOCK_M=BLOCK, UPCAST=False)
        return (kernel, pointers, constants, arch)

    jobs = [
        job("_shrink_segment_kernel", "bf16", PAGE_DIM=8192, BLOCK_R=16, BLOCK_K=64),
        job("_shrink_segment_kernel", "bf16", PAGE_DIM=384, BLOCK_R=128, BLOCK_K=32),
        job("_shrink_token_kernel", "bf16", PAGE_DIM=8192, BLOCK_R=16, BLOCK_K=64),
        job("_shrink_token_kernel", "bf16", PAGE_DIM=384, BLOCK_R=128, BLOCK_K=32),
        job("_expand_segment_kernel", "bf16", PAGE_DIM=8192, BLOCK_N=64, BLOCK_R=16),
        job("_expand_token_kernel", "bf16", PAGE_DIM=8192, BLOCK_N=64, BLOCK_R=64),
        job("_shrink_segment_kernel", "fp16", arch=80, PAGE_DIM=8192, BLOCK_R=16, BLOCK_K=64),
        job("_expand_segment_kernel", "fp16", arch=80, PAGE_DIM=8192, BLOCK_N=64, BLOCK_R=16),
        job("_shrink_segment_kernel", "fp32", PAGE_DIM=8192, BLOCK_R=16, BLOCK_K=64),
        job("_expand_token_kernel", "fp32", PAGE_DIM=8192, BLOCK_N=64, BLOCK_R=16),
    ]
    gpu_compile("lorafleet.kernels.triton_lora", jobs)


def test_tiles_follow_in_place_changes_of_token_adapter(make_lora_case):
    """Tiles are kept per step; rewriting token_adapter in place (a reused buffer) must replan."""
    case = make_lora_case([[8, 8, 8], [16, 16, 16]], [0] * 5 + [1] * 5, seed=11)
    assert_kernels_match(case, "auto")
    case.batch.token_adapter.copy_(torch.tensor([1, 1, -1, 0, 0, 0, 1, 1, 1, -1]))
    case.group._plan = None  # the reference plans per group, and a step builds new groups
    assert_kernels_match(case, "auto")
    assert_kernels_match(case, "segment")
