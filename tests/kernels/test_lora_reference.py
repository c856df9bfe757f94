"""The torch reference of the LoRA ops equals a naive per-token loop over flat vectors.

The loop rebuilds A_g and B_g of each token's adapter from the pages exactly as the
ops' docstrings define them, so it pins the semantics that the Triton kernels are
then held to.
"""
from __future__ import annotations

import pytest
import torch

from lorafleet.kernels.lora import lora_expand, lora_shrink

TOLERANCE = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=1e-1, rtol=5e-2),
}


def flat_vector(case, a: int) -> torch.Tensor:
    """Adapter a's per-layer vector: pool[page_table[a]].reshape(-1)."""
    return case.pool[case.batch.page_table[a]].reshape(-1).double()


def naive_shrink(case) -> torch.Tensor:
    group, x = case.group, case.x.double()
    s = torch.zeros(x.shape[0], len(group.out_dims), group.max_rank, dtype=torch.float64)
    for t, a in enumerate(case.batch.token_adapter.tolist()):
        if a < 0:
            continue
        vec = flat_vector(case, a)
        for g in range(len(group.out_dims)):
            r, off = int(group.rank[a, g]), int(group.a_offset[a, g])
            if r:
                a_g = vec[off : off + r * group.in_dim].reshape(r, group.in_dim)
                s[t, g, :r] = x[t] @ a_g.T
    return s


def naive_expand(case, s: torch.Tensor) -> torch.Tensor:
    """With N = group.shards, s is (T, G, N * R) and B_g (out, N * r; stored as B_g^T) pairs with cat_j s[t, g, j*R : j*R + r]."""
    group, y = case.group, case.y.double().clone()
    shards, width = group.shards, group.max_rank
    for t, a in enumerate(case.batch.token_adapter.tolist()):
        if a < 0:
            continue
        vec = flat_vector(case, a)
        for g, (out_dim, col) in enumerate(zip(group.out_dims, group.out_offsets)):
            r, off = int(group.rank[a, g]), int(group.b_offset[a, g])
            if r:
                b_g = vec[off : off + out_dim * shards * r].reshape(shards * r, out_dim).T  # stored transposed
                s_g = torch.cat([s[t, g, j * width : j * width + r] for j in range(shards)]).double()
                y[t, col : col + out_dim] += float(group.scale[a, g]) * (s_g @ b_g.T)
    return y


def check_reference(case, dtype: torch.dtype) -> None:
    expected_s = naive_shrink(case)
    s = lora_shrink(case.x, case.pool, case.batch, case.group)
    assert s.dtype == dtype and s.shape == expected_s.shape
    torch.testing.assert_close(s.double(), expected_s, **TOLERANCE[dtype])

    s_in = expected_s.to(dtype)  # both sides expand the same s
    expected_y = naive_expand(case, s_in)
    y = case.y.clone()
    assert lora_expand(y, s_in, case.pool, case.batch, case.group) is y
    torch.testing.assert_close(y.double(), expected_y, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank", [1, 8, 16, 64, 128])
def test_uniform_rank(make_lora_case, lora_tokens, dtype, rank):
    tokens = lora_tokens([(0, 5), (-1, 2), (1, 1), (2, 3), (0, 2), (-1, 1)])
    case = make_lora_case([[rank] * 3] * 3, tokens, dtype=dtype)
    check_reference(case, dtype)


@pytest.mark.parametrize("layout", ["packed", "interleaved"])
@pytest.mark.parametrize("num_adapters", [1, 4, 16])
def test_mixed_ranks_and_missing_targets(make_lora_case, num_adapters, layout):
    gen = torch.Generator().manual_seed(num_adapters)
    choices = torch.tensor([0, 1, 8, 16, 64, 128])
    ranks = choices[torch.randint(0, len(choices), (num_adapters, 3), generator=gen)].tolist()
    ranks[0] = [8, 0, 16]  # at least one adapter with a missing target
    tokens = torch.randint(-1, num_adapters, (40,), generator=gen).tolist()
    case = make_lora_case(ranks, tokens, layout=layout, seed=num_adapters)
    check_reference(case, torch.float32)


def test_padded_max_rank_and_idle_adapter(make_lora_case, lora_tokens):
    """The shrink output is wider than any rank (TP padding); adapter 2 has no tokens."""
    tokens = lora_tokens([(1, 3), (0, 2), (-1, 4), (1, 1)])
    case = make_lora_case([[4, 4, 4], [16, 0, 2], [8, 8, 8]], tokens, max_rank=32)
    check_reference(case, torch.float32)


def test_base_only_batch_is_untouched(make_lora_case):
    case = make_lora_case([[8, 8, 8]], [-1] * 6)
    s = lora_shrink(case.x, case.pool, case.batch, case.group)
    assert torch.equal(s, torch.zeros_like(s))
    y = case.y.clone()
    lora_expand(y, s, case.pool, case.batch, case.group)
    assert torch.equal(y, case.y)


@pytest.mark.parametrize("shards", [2, 3])
def test_expand_sums_all_gathered_shards(make_lora_case, lora_tokens, shards):
    """Under tensor parallelism s holds every rank's shrink output; the padding between them is ignored."""
    tokens = lora_tokens([(0, 3), (-1, 1), (1, 2), (0, 1)])
    case = make_lora_case([[4, 0, 8], [8, 8, 2]], tokens, max_rank=10, shards=shards, seed=shards)
    s = torch.randn(len(tokens), 3, shards * 10)
    y = case.y.clone()
    lora_expand(y, s, case.pool, case.batch, case.group)
    torch.testing.assert_close(y.double(), naive_expand(case, s), **TOLERANCE[torch.float32])
