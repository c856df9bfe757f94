"""Paged attention over token-level KV pages of the unified pool.

One pool row (page) holds one token's K and V for one layer:
`pool[p, :kv_size]` is K and `pool[p, kv_size:2 * kv_size]` is V, each
(num_kv_heads, head_dim) row-major. A sequence's keys are the pages of its
page table, position by position; no page needs to be next to another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cpu


@dataclass
class AttentionBatch:
    """Attention metadata of one step, shared by every layer.

    query_start: (S + 1,) int64, tokens of sequence i are rows query_start[i]:query_start[i+1].
    context_lens: (S,) int64, keys of sequence i after this step (its cached tokens plus the new ones).
    page_table: (R, W) int64, contiguous, the worker's table kept across steps: row r holds the KV
        pages of the sequence that owns it, position by position. It may have more rows and columns
        than the step uses; only page_table[table_rows[i], :context_lens[i]] is ever read, whatever
        the other cells hold.
    table_rows: (S,) int64, the row of page_table that holds sequence i's pages, so sequence i's
        position j is page page_table[table_rows[i], j]; nothing of the table is copied per step.
    slots: (T,) int64, the page each new token's K and V are written to.
    decode_rows: (S_d,) sequences with exactly one new token, in step order.
    prefill_rows: python list of the others (they take one call each).
    """

    query_start: torch.Tensor
    context_lens: torch.Tensor
    page_table: torch.Tensor
    table_rows: torch.Tensor
    slots: torch.Tensor
    decode_rows: torch.Tensor
    prefill_rows: list[int]
    query_start_list: list[int]
    context_lens_list: list[int]
    _cpu_plan: object = field(default=None, repr=False)  # kernels/cpu.AttentionPlan, built on the step's first layer


def write_kv(pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """pool[slots[t]] = cat(k[t].flatten(), v[t].flatten()), in place.

    pool: (P, D) with D >= 2 * kv_heads * head_dim; k, v: (T, kv_heads, head_dim); slots: (T,) int64.
    """
    kv_size = k.shape[1] * k.shape[2]
    if k.shape != v.shape or pool.shape[1] < 2 * kv_size or slots.shape != (k.shape[0],):
        raise ValueError(f"write_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, pool {tuple(pool.shape)}, slots {tuple(slots.shape)}")
    if pool.is_cuda:
        from . import triton_attention

        return triton_attention.write_kv(pool, k, v, slots)
    rows = _adjacent_rows(k, v, kv_size)
    if rows is None:
        rows = torch.cat([k.reshape(-1, kv_size), v.reshape(-1, kv_size)], dim=1)
    if pool.shape[1] == 2 * kv_size:
        pool.index_copy_(0, slots, rows.to(pool.dtype))
    else:
        pool[slots, : 2 * kv_size] = rows.to(pool.dtype)


def _adjacent_rows(k: torch.Tensor, v: torch.Tensor, kv_size: int) -> torch.Tensor | None:
    """(T, 2 * kv_size), each row k[t] then v[t], as a view when v's row follows k's in memory (k and v
    split from the fused q|k|v output: the model's case), so no copy is made to join them; else None."""
    t = k.shape[0]
    if t == 0 or k.dtype != v.dtype or k.stride(2) != 1 or v.stride(2) != 1 or k.stride(0) != v.stride(0):
        return None
    if k.stride(1) != k.shape[2] or v.stride(1) != v.shape[2]:
        return None
    if v.data_ptr() != k.data_ptr() + kv_size * k.element_size():
        return None
    return k.as_strided((t, 2 * kv_size), (k.stride(0), 1))


def paged_attention(q: torch.Tensor, pool: torch.Tensor, batch: AttentionBatch, num_kv_heads: int) -> torch.Tensor:
    """Causal attention of each new token over its sequence's pages.

    For sequence i with n_i new tokens and c_i = context_lens[i], new token j sits at
    position c_i - n_i + j and attends to positions 0..c_i - n_i + j:
        out[t] = softmax(q[t] K_i[:p+1].T / sqrt(d)) V_i[:p+1], K_i/V_i read from
        pool[page_table[table_rows[i], :c_i]],
    with query head h reading kv head h // (H / num_kv_heads) (grouped-query attention).
    q: (T, H, d); pool: (P, D); returns (T, H, d) in q.dtype.
    """
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"paged_attention: {q.shape[1]} query heads are not a multiple of {num_kv_heads} kv heads")
    if q.is_cuda:
        from . import triton_attention

        return triton_attention.paged_attention(q, pool, batch, num_kv_heads)
    if cpu.usable(q):
        return cpu.paged_attention(q, pool, batch, num_kv_heads)
    return _attention_reference(q, pool, batch, num_kv_heads)


def _gather_kv(pool: torch.Tensor, pages: torch.Tensor, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pages: (..., L) -> K, V each (..., kv_heads, L, d)."""
    kv_size = num_kv_heads * head_dim
    rows = pool.index_select(0, pages.reshape(-1)).view(*pages.shape, pool.shape[1])
    k = rows[..., :kv_size].unflatten(-1, (num_kv_heads, head_dim)).transpose(-3, -2)
    v = rows[..., kv_size:2 * kv_size].unflatten(-1, (num_kv_heads, head_dim)).transpose(-3, -2)
    return k, v


def _attention_reference(q: torch.Tensor, pool: torch.Tensor, batch: AttentionBatch, num_kv_heads: int) -> torch.Tensor:
    head_dim = q.shape[2]
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.empty_like(q)
    starts, ctx = batch.query_start_list, batch.context_lens_list
    for i in batch.prefill_rows:
        n, c = starts[i + 1] - starts[i], ctx[i]
        k, v = _gather_kv(pool, batch.page_table[batch.table_rows[i], :c], num_kv_heads, head_dim)
        qi = q[starts[i]:starts[i + 1]].transpose(0, 1)  # (H, n, d)
        # causal with an offset: new token j sees keys 0..c-n+j
        mask = torch.ones(n, c, dtype=torch.bool, device=q.device).tril(diagonal=c - n)
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[starts[i]:starts[i + 1]] = o.transpose(0, 1)
    if batch.decode_rows.numel():
        rows = batch.decode_rows
        lens = batch.context_lens[rows]
        width = int(lens.max())
        mask = torch.arange(width, device=q.device)[None, :] < lens[:, None]  # (S, L)
        pages = batch.page_table[batch.table_rows[rows], :width]  # (S, L)
        # padded positions read the sequence's first page: masked-out keys must still be finite
        pages = torch.where(mask, pages, pages[:, :1])
        k, v = _gather_kv(pool, pages, num_kv_heads, head_dim)  # (S, kvh, L, d)
        token_rows = batch.query_start[rows]
        qd = q[token_rows].unsqueeze(2)  # (S, H, 1, d)
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
        out[token_rows] = o.squeeze(2)
    return out
