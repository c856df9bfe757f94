"""Triton kernels of paged attention over token-level KV pages.

`pool[p, :kv_size]` is one token's K and `pool[p, kv_size:2 * kv_size]` its V, each
(num_kv_heads, head_dim) row-major; position j of sequence i lives in page
`page_table[table_rows[i], j]` (the worker's table, kept across steps). The kernels gather
K and V through the page table, reading no more of a row than the sequence's context.

One attention kernel serves prefill and decode. A program owns one kv head and a tile
of query rows; row m is query head `kv_head * RATIO + m % RATIO` of token `m // RATIO`
of the tile, so the RATIO query heads that share a kv head (grouped-query attention)
read each K/V block once. Decode tiles hold one token (RATIO rows, padded to 16 for
`tl.dot`); prefill tiles hold PREFILL_BLOCK_M // RATIO consecutive new tokens of one
sequence. Keys are visited in blocks with an online softmax, up to the last position
the tile can see; new token j of a sequence with context c and n new tokens sees
positions 0..c-n+j. Softmax and accumulation are in fp32; `tl.dot` takes fp16/bf16
operands as they are (probabilities cast to the KV dtype, as flash attention does) and
fp32 ones at IEEE precision; bf16 on CPU, i.e. under TRITON_INTERPRET, whose bf16
arithmetic is wrong, is upcast to fp32 first (UPCAST).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention import AttentionBatch

PREFILL_BLOCK_M = 64  # query rows (token x head pairs) per prefill tile
BLOCK_N = 32  # keys per block
MIN_DOT_BLOCK = 16  # tl.dot needs every block dimension >= 16 on a GPU
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def write_kv(pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """pool[slots[t]] = cat(k[t].flatten(), v[t].flatten()), in place (the rest of the row is kept).

    pool: (P, D) contiguous with D >= 2 * kv_heads * head_dim; k, v: (T, kv_heads, head_dim)
    contiguous; slots: (T,) int64. k and v are cast to pool.dtype.
    """
    kv_size = k.shape[1] * k.shape[2] if k.dim() == 3 else 0
    if k.dim() != 3 or k.shape != v.shape or not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError(f"triton write_kv: k {tuple(k.shape)} and v {tuple(v.shape)} must be equal, contiguous (T, kv_heads, head_dim)")
    if pool.dim() != 2 or pool.shape[1] < 2 * kv_size or not pool.is_contiguous() or pool.dtype not in _DTYPES:
        raise ValueError(f"triton write_kv: pool {tuple(pool.shape)} {pool.dtype} must be contiguous with rows of >= {2 * kv_size}")
    if slots.shape != (k.shape[0],) or slots.dtype != torch.int64:
        raise ValueError(f"triton write_kv: slots {tuple(slots.shape)} {slots.dtype} must be ({k.shape[0]},) int64")
    if any(t.device != pool.device for t in (k, v, slots)):
        raise ValueError(f"triton write_kv: every tensor must be on {pool.device}")
    if k.shape[0] == 0:
        return
    block = min(1024, triton.next_power_of_2(kv_size))
    grid = (k.shape[0], triton.cdiv(kv_size, block))
    _write_kv_kernel[grid](pool, k, v, slots, kv_size, pool.shape[1], BLOCK=block)


def paged_attention(q: torch.Tensor, pool: torch.Tensor, batch: AttentionBatch, num_kv_heads: int) -> torch.Tensor:
    """Causal attention of each new token over its sequence's pages.

    out[t] = softmax(q[t] K_i[:p+1].T / sqrt(d)) V_i[:p+1] for token t at position p of
    sequence i, query head h reading kv head h // (H / num_kv_heads).
    q: (T, H, d) contiguous; pool: (P, D) contiguous, q.dtype, D >= 2 * num_kv_heads * d;
    returns (T, H, d) in q.dtype.
    """
    _check_attention(q, pool, batch, num_kv_heads)
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    ratio = num_heads // num_kv_heads
    args = (
        q, pool, out, batch.page_table, batch.table_rows, batch.query_start, batch.context_lens,
        pool.shape[1], batch.page_table.shape[1], head_dim, num_heads, num_kv_heads, 1.0 / math.sqrt(head_dim),
    )
    constants = dict(
        RATIO=ratio, BLOCK_N=BLOCK_N, BLOCK_D=max(MIN_DOT_BLOCK, triton.next_power_of_2(head_dim)),
        UPCAST=q.dtype == torch.bfloat16 and not q.is_cuda,
    )
    for tiles, block_m in ((_decode_tiles(batch), MIN_DOT_BLOCK), (_prefill_tiles(batch, ratio), PREFILL_BLOCK_M)):
        if tiles.shape[1]:
            block_m = max(block_m, MIN_DOT_BLOCK, triton.next_power_of_2(ratio))
            _attention_kernel[(tiles.shape[1], num_kv_heads)](*args, tiles, tiles.shape[1], BLOCK_M=block_m, **constants)
    return out


def _decode_tiles(batch: AttentionBatch) -> torch.Tensor:
    """(3, S_d) rows: sequence, first token, token count (1) of each decode tile."""
    rows = batch.decode_rows
    return torch.stack([rows, batch.query_start[rows], torch.ones_like(rows)]).contiguous()


def _prefill_tiles(batch: AttentionBatch, ratio: int) -> torch.Tensor:
    """(3, num_tiles) rows: sequence, first token, token count of each prefill tile."""
    per_tile = max(1, PREFILL_BLOCK_M // ratio)
    starts = batch.query_start_list
    tiles = [
        (i, first, min(per_tile, starts[i + 1] - first))
        for i in batch.prefill_rows
        for first in range(starts[i], starts[i + 1], per_tile)
    ]
    host = torch.tensor(tiles, dtype=torch.int64).reshape(-1, 3).T.contiguous()
    device = batch.query_start.device
    if device.type == "cuda":  # through pinned memory: a pageable copy would wait for the stream
        return host.pin_memory().to(device, non_blocking=True)
    return host


def _check_attention(q: torch.Tensor, pool: torch.Tensor, batch: AttentionBatch, num_kv_heads: int) -> None:
    if q.dim() != 3 or not q.is_contiguous() or q.dtype not in _DTYPES:
        raise ValueError(f"triton paged_attention: q {tuple(q.shape)} {q.dtype} must be contiguous (T, H, d)")
    if num_kv_heads <= 0 or q.shape[1] % num_kv_heads:
        raise ValueError(f"triton paged_attention: {q.shape[1]} query heads are not a multiple of {num_kv_heads} kv heads")
    if pool.dim() != 2 or pool.dtype != q.dtype or not pool.is_contiguous() or pool.shape[1] < 2 * num_kv_heads * q.shape[2]:
        raise ValueError(f"triton paged_attention: pool {tuple(pool.shape)} {pool.dtype} must be contiguous, {q.dtype}, rows >= {2 * num_kv_heads * q.shape[2]}")
    metadata = (batch.query_start, batch.context_lens, batch.page_table, batch.table_rows, batch.decode_rows)
    if any(t.dtype != torch.int64 or t.device != q.device for t in metadata) or not batch.page_table.is_contiguous():
        raise ValueError(f"triton paged_attention: batch tensors must be int64 on {q.device}, page_table contiguous")
    if batch.query_start.shape[0] != batch.context_lens.shape[0] + 1 or batch.query_start_list[-1] != q.shape[0]:
        raise ValueError(f"triton paged_attention: query_start does not cover the {q.shape[0]} tokens")
    if batch.table_rows.shape != batch.context_lens.shape or batch.page_table.dim() != 2:
        raise ValueError(f"triton paged_attention: table_rows {tuple(batch.table_rows.shape)} must give one page_table row per sequence")


# ------------------------------------------------------------------ kernels


@triton.jit
def _write_kv_kernel(pool_ptr, k_ptr, v_ptr, slots_ptr, kv_size, page_dim, BLOCK: tl.constexpr):
    """Program (t, block): pool[slots[t], block] = k[t].flatten()[block]; same for v after kv_size."""
    t, start = tl.program_id(0), tl.program_id(1) * BLOCK
    cols = start + tl.arange(0, BLOCK)
    ok = cols < kv_size
    row = pool_ptr + tl.load(slots_ptr + t) * page_dim
    src = t.to(tl.int64) * kv_size + cols
    out_ty = pool_ptr.dtype.element_ty
    tl.store(row + cols, tl.load(k_ptr + src, mask=ok).to(tl.float32).to(out_ty), mask=ok)
    tl.store(row + kv_size + cols, tl.load(v_ptr + src, mask=ok).to(tl.float32).to(out_ty), mask=ok)


@triton.jit
def _operand(t, UPCAST: tl.constexpr):
    """t as a tl.dot operand: fp32 when UPCAST, else its own dtype."""
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _attention_kernel(
    q_ptr, pool_ptr, out_ptr, page_table_ptr, table_rows_ptr, query_start_ptr, context_lens_ptr,
    page_dim, table_stride, head_dim, num_heads, num_kv_heads, sm_scale,
    tiles_ptr, num_tiles,
    BLOCK_M: tl.constexpr, RATIO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (tile, kv_head): flash attention of the tile's (token, head) rows over their sequence's pages."""
    tile, kv_head = tl.program_id(0), tl.program_id(1)
    seq = tl.load(tiles_ptr + tile)
    first = tl.load(tiles_ptr + num_tiles + tile)
    count = tl.load(tiles_ptr + 2 * num_tiles + tile)
    q_start = tl.load(query_start_ptr + seq)
    pages_ptr = page_table_ptr + tl.load(table_rows_ptr + seq) * table_stride  # the sequence's row
    # position of the sequence's first new token, then of the tile's first token
    tile_pos = tl.load(context_lens_ptr + seq) - (tl.load(query_start_ptr + seq + 1) - q_start) + first - q_start

    m = tl.arange(0, BLOCK_M)
    row_ok = m // RATIO < count
    query_pos = tile_pos + m // RATIO
    q_rows = (first + m // RATIO) * num_heads + kv_head * RATIO + m % RATIO  # row of (T * H, d)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = _operand(tl.load(q_ptr + q_rows[:, None] * head_dim + d[None, :], mask=io_mask, other=0.0), UPCAST)
    qk_scale = sm_scale * 1.4426950408889634  # scores in log2 units, for exp2

    kv_size = num_kv_heads * head_dim
    max_seen = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for key_start in range(0, tile_pos + count, BLOCK_N):
        pos = key_start + tl.arange(0, BLOCK_N)
        pos_ok = pos < tile_pos + count
        page = tl.load(pages_ptr + pos, mask=pos_ok, other=0)
        kv_row = page * page_dim + kv_head * head_dim
        k_t = tl.load(pool_ptr + kv_row[None, :] + d[:, None], mask=d_ok[:, None] & pos_ok[None, :], other=0.0)
        scores = tl.dot(q, _operand(k_t, UPCAST), input_precision="ieee") * qk_scale
        scores = tl.where(pos[None, :] <= query_pos[:, None], scores, float("-inf"))
        new_max = tl.maximum(max_seen, tl.max(scores, axis=1))
        rescale = tl.exp2(max_seen - new_max)
        p = tl.exp2(scores - new_max[:, None])
        denom = denom * rescale + tl.sum(p, axis=1)
        v = tl.load(pool_ptr + kv_row[:, None] + kv_size + d[None, :], mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
        p_v = tl.dot(_operand(p.to(v.dtype), UPCAST), _operand(v, UPCAST), input_precision="ieee")
        acc = acc * rescale[:, None] + p_v
        max_seen = new_max
    out = acc / denom[:, None]
    tl.store(out_ptr + q_rows[:, None] * head_dim + d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)
