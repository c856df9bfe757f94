"""Batched LoRA over the unified page pool: shrink (x A^T) and expand (y += scale * s B^T).

Each adapter's weights for one layer are one flat vector chunked into pool pages
(`pool[page_table[a]].reshape(-1)` is adapter `a`'s vector, padded to whole pages).
Inside it, target `g` of a group has A_g at `a_offset[a, g]` (rank_g x in_dim,
row-major) and B_g transposed at `b_offset[a, g]` (rank_g x out_g, row-major: row i
of B_g^T is column i of B_g). The targets of
a group share one input (q+k+v, o, gate+up, down) and are shrunk in one launch.

The torch reference below is the spec that the Triton kernels (CUDA) and the C
kernels (cpu_lora.c, the CPU path) are tested against, and the CPU fallback when no
C compiler is found. It never loops over tokens: it buckets the step's adapters by
identical layout and similar token counts, gathers each bucket's pages in one copy,
views them as (n, rank, in) and runs `torch.bmm`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import cpu

@dataclass
class LoraGroup:
    """Where the targets of one input group live, for the n adapters of a step.

    in_dim: columns of every A in the group (this rank's shard of the input).
    out_dims: (G,) rows of each target's B (this rank's shard of the output).
    a_offset, b_offset: (n, G) int64 element offsets in the adapter's flat vector; -1 where absent.
    rank: (n, G) int64, 0 where the adapter lacks the target.
    scale: (n, G) float32, alpha / r (or alpha / sqrt(r) for rsLoRA).
    max_rank: R, the padded width of the shrink output.
    shards: N, the tensor-parallel ranks whose shrink outputs were all-gathered (column-parallel
        groups under TP; 1 otherwise). Then s is (T, G, N * R), rank-major, and B_g has N * r
        columns: column j * r + i of B_g (row j * r + i of the stored B_g^T) multiplies s[t, g, j * R + i].
    """

    in_dim: int
    out_dims: tuple[int, ...]
    a_offset: torch.Tensor
    b_offset: torch.Tensor
    rank: torch.Tensor
    scale: torch.Tensor
    max_rank: int
    shards: int = 1
    _plan: list["_Bucket"] | None = field(default=None, repr=False)
    _cpu_args: object = field(default=None, repr=False)  # cpu.GroupArgs, built on first use

    @property
    def out_offsets(self) -> list[int]:
        """Column where each target's output starts in the group's fused output."""
        starts, acc = [], 0
        for d in self.out_dims:
            starts.append(acc)
            acc += d
        return starts


@dataclass
class LoraBatch:
    """LoRA metadata of one step, built once and shared by every layer.

    token_adapter: (T,) int64, index of each token's adapter in the step, -1 for base-only.
    page_table: (n, max_pages) int64, each adapter's pages in order (padded with 0).
    groups: the four input groups, keyed "qkv", "o", "gate_up", "down"; a key is absent
        when no adapter of the step targets that group.
    """

    token_adapter: torch.Tensor
    page_table: torch.Tensor
    groups: dict[str, LoraGroup]
    _cpu_segments: object = field(default=None, repr=False)  # cpu.Segments, built on first use


def lora_shrink(x: torch.Tensor, pool: torch.Tensor, batch: LoraBatch, group: LoraGroup) -> torch.Tensor:
    """s[t, g, :r] = x[t] @ A_g(a_t).T for each token t with adapter a_t; zero elsewhere.

    x: (T, in_dim); pool: (P, D) one layer's pages; returns s: (T, G, R) in x.dtype.
    """
    _check(x, pool, batch, group)
    if x.is_cuda:
        from . import triton_lora

        return triton_lora.shrink(x, pool, batch, group)
    if cpu.usable(x):
        return cpu.shrink(x, pool, batch, group)
    return _shrink_reference(x, pool, batch, group)


def lora_expand(y: torch.Tensor, s: torch.Tensor, pool: torch.Tensor, batch: LoraBatch, group: LoraGroup) -> torch.Tensor:
    """y[t, off_g:off_g+out_g] += scale(a_t, g) * s[t, g, :r] @ B_g(a_t).T, in place; returns y.

    y: (T, sum(out_dims)); s: (T, G, shards * R) from lora_shrink (all-gathered under TP,
    where s[t, g, :r] means cat_j s[t, g, j*R : j*R + r]).
    """
    _check(y, pool, batch, group)
    expected = (y.shape[0], len(group.out_dims), group.shards * group.max_rank)
    if tuple(s.shape) != expected:
        raise ValueError(f"lora_expand: s has shape {tuple(s.shape)}, expected {expected}")
    if y.shape[1] != sum(group.out_dims):
        raise ValueError(f"lora_expand: y has {y.shape[1]} columns, the group's outputs sum to {sum(group.out_dims)}")
    if y.is_cuda:
        from . import triton_lora

        return triton_lora.expand(y, s, pool, batch, group)
    if cpu.usable(y):
        return cpu.expand(y, s.to(y.dtype), pool, batch, group)
    return _expand_reference(y, s, pool, batch, group)


def lora_apply(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, batch: LoraBatch, group: LoraGroup) -> torch.Tensor:
    """lora_expand(y, lora_shrink(x)) for a group whose shrink output needs no collective in between
    (tensor parallelism 1, shards = 1). On the CPU it is one C call instead of two: about 5 us less Python
    and ctypes per group and layer, next to kernels of 20-100 us in a step with many adapters.
    y += deltas in place; returns y."""
    _check(x, pool, batch, group)
    _check(y, pool, batch, group)
    if group.shards != 1:
        raise ValueError(f"lora_apply: a group all-gathered over {group.shards} ranks needs lora_shrink, the "
                         "collective, then lora_expand")
    if y.shape[1] != sum(group.out_dims):
        raise ValueError(f"lora_apply: y has {y.shape[1]} columns, the group's outputs sum to {sum(group.out_dims)}")
    if not y.is_cuda and cpu.usable(y):
        return cpu.apply(y, x, pool, batch, group)
    return lora_expand(y, lora_shrink(x, pool, batch, group), pool, batch, group)


def _check(t: torch.Tensor, pool: torch.Tensor, batch: LoraBatch, group: LoraGroup) -> None:
    if t.dim() != 2 or t.shape[0] != batch.token_adapter.shape[0]:
        raise ValueError(f"LoRA op: activations {tuple(t.shape)} do not match {batch.token_adapter.shape[0]} tokens")
    if pool.dim() != 2 or pool.dtype != t.dtype:
        raise ValueError(f"LoRA op: pool {tuple(pool.shape)} {pool.dtype} must be 2-D and match {t.dtype}")
    if pool.device != t.device:
        raise ValueError(f"LoRA op: pool on {pool.device}, activations on {t.device}")
    if not pool.is_contiguous():
        raise ValueError("LoRA op: the pool must be contiguous")


# ---------------------------------------------------------------- the CPU path


@dataclass
class _Bucket:
    """Adapters of one layout whose token counts are within 2x: one gather, one bmm."""

    ranks: list[int]  # per target of the group; 0 = absent
    a_offsets: list[int]  # per target, -1 where absent
    b_offsets: list[int]  # per target, -1 where absent
    page_lo: int  # first page of the A block (adapter-relative)
    page_hi_a: int  # one past the last page of the A block
    b_page_lo: int
    b_page_hi: int
    pages_a: torch.Tensor  # (n_b * (page_hi_a - page_lo),) pool rows to gather for A
    pages_b: torch.Tensor  # (n_b * (b_page_hi - b_page_lo),) pool rows to gather for B
    tokens: torch.Tensor  # (n_b, L) token indices, padded by repeating a valid one
    valid: torch.Tensor  # (n_b * L,) bool, False on padding
    flat_tokens: torch.Tensor  # (n_valid,) the token indices that are real
    scale: torch.Tensor  # (n_b, G)


def _plan(batch: LoraBatch, group: LoraGroup, page_dim: int) -> list[_Bucket]:
    if group._plan is not None:
        return group._plan
    token_adapter = batch.token_adapter.tolist()
    tokens_of: dict[int, list[int]] = {}
    for t, a in enumerate(token_adapter):
        if a >= 0:
            tokens_of.setdefault(a, []).append(t)
    ranks = group.rank.tolist()
    a_off = group.a_offset.tolist()
    b_off = group.b_offset.tolist()
    by_key: dict[tuple, list[int]] = {}
    for a, toks in tokens_of.items():
        if not any(ranks[a]):
            continue
        size_class = (len(toks) - 1).bit_length()  # 1 | 2 | 3-4 | 5-8 | ...
        by_key.setdefault((tuple(ranks[a]), tuple(a_off[a]), tuple(b_off[a]), size_class), []).append(a)
    page_table = batch.page_table
    buckets = []
    for (rk, ao, bo, _), adapters in by_key.items():
        present = [g for g, r in enumerate(rk) if r > 0]
        a_lo = min(ao[g] for g in present)
        a_hi = max(ao[g] + rk[g] * group.in_dim for g in present)
        b_lo = min(bo[g] for g in present)
        b_hi = max(bo[g] + group.out_dims[g] * rk[g] * group.shards for g in present)
        p_lo, p_hi = a_lo // page_dim, -(-a_hi // page_dim)
        q_lo, q_hi = b_lo // page_dim, -(-b_hi // page_dim)
        rows = page_table[adapters]
        width = max(len(tokens_of[a]) for a in adapters)
        padded = [tokens_of[a] + [tokens_of[a][0]] * (width - len(tokens_of[a])) for a in adapters]
        valid = [[True] * len(tokens_of[a]) + [False] * (width - len(tokens_of[a])) for a in adapters]
        tokens = torch.tensor(padded, dtype=torch.int64, device=page_table.device)
        valid_t = torch.tensor(valid, dtype=torch.bool, device=page_table.device).reshape(-1)
        buckets.append(
            _Bucket(
                ranks=list(rk), a_offsets=list(ao), b_offsets=list(bo),
                page_lo=p_lo, page_hi_a=p_hi, b_page_lo=q_lo, b_page_hi=q_hi,
                pages_a=rows[:, p_lo:p_hi].reshape(-1), pages_b=rows[:, q_lo:q_hi].reshape(-1),
                tokens=tokens, valid=valid_t, flat_tokens=tokens.reshape(-1)[valid_t],
                scale=group.scale[adapters],
            )
        )
    group._plan = buckets
    return buckets


def _shrink_reference(x: torch.Tensor, pool: torch.Tensor, batch: LoraBatch, group: LoraGroup) -> torch.Tensor:
    num_tokens, num_targets = x.shape[0], len(group.out_dims)
    s = x.new_zeros(num_tokens, num_targets, group.max_rank)
    for b in _plan(batch, group, pool.shape[1]):
        n = b.tokens.shape[0]
        weights = pool.index_select(0, b.pages_a).reshape(n, -1)  # one copy of the bucket's A blocks
        spans = [(off - b.page_lo * pool.shape[1], r * group.in_dim) for off, r in zip(b.a_offsets, b.ranks) if r]
        total_rank = sum(b.ranks)
        if all(nxt[0] == cur[0] + cur[1] for cur, nxt in zip(spans, spans[1:])):  # A blocks back to back
            a_cat = weights[:, spans[0][0]:spans[0][0] + total_rank * group.in_dim]
        else:
            a_cat = torch.cat([weights[:, start:start + size] for start, size in spans], dim=1)
        a_cat = a_cat.reshape(n, total_rank, group.in_dim)
        out = torch.bmm(x[b.tokens], a_cat.transpose(1, 2)).reshape(-1, total_rank)[b.valid]
        col = 0
        for g, r in enumerate(b.ranks):
            if r:
                s[b.flat_tokens, g, :r] = out[:, col:col + r]
                col += r
    return s


def _expand_reference(y: torch.Tensor, s: torch.Tensor, pool: torch.Tensor, batch: LoraBatch, group: LoraGroup) -> torch.Tensor:
    page_dim = pool.shape[1]
    shards = group.shards
    s = s.view(s.shape[0], s.shape[1], shards, group.max_rank)
    for b in _plan(batch, group, page_dim):
        n = b.tokens.shape[0]
        weights = pool.index_select(0, b.pages_b).reshape(n, -1)
        base = b.b_page_lo * page_dim
        for g, (r, off) in enumerate(zip(b.ranks, b.b_offsets)):
            if not r:
                continue
            out_dim, col = group.out_dims[g], group.out_offsets[g]
            b_t = weights[:, off - base:off - base + out_dim * r * shards].reshape(n, r * shards, out_dim)  # B_g^T
            s_g = s[b.tokens, g, :, :r].reshape(n, -1, shards * r)
            delta = torch.bmm(s_g, b_t)
            delta = delta * b.scale[:, g].to(delta.dtype).reshape(n, 1, 1)
            y[:, col:col + out_dim].index_add_(0, b.flat_tokens, delta.reshape(-1, out_dim)[b.valid])
    return y
