"""Triton kernels of the LoRA ops, reading A and B straight from the page pool.

Element f of adapter a's flat vector is `pool[page_table[a, f // D], f % D]`, so every
weight tile is a gather through the page table; no adapter needs contiguous pages.

Two variants of each op, with the semantics of `lora.lora_shrink` / `lora.lora_expand`:
- "segment" (prefill; S-LoRA's MBGMM, Punica's SGMV): the tokens are cut into runs of
  consecutive tokens with the same adapter, each run into tiles of SEGMENT_BLOCK_M rows,
  and each tile is one `tl.dot` over the adapter's A (or B) read once per tile.
- "token" (decode; MBGMV, BGMV): one program per token, a gathered matrix-vector product.
Every grid covers all targets of the group (axis 1), so q+k+v or gate+up take one launch;
each program masks by its adapter's rank for that target (any rank, mixed in one launch)
and returns at once for base-only tokens and absent targets.

Accumulation is in fp32. `tl.dot` takes fp16/bf16 operands as they are (tensor cores)
and fp32 ones at full IEEE precision; bf16 on CPU, i.e. under TRITON_INTERPRET, whose
bf16 arithmetic is wrong, is upcast to fp32 first (UPCAST). The mat-vec kernels do
their products in fp32.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from .lora import LoraBatch, LoraGroup

SEGMENT_BLOCK_M = 32  # tokens per tile of the segment kernels
MIN_DOT_BLOCK = 16  # tl.dot needs every block dimension >= 16 on a GPU
MAX_WEIGHT_TILE = 4096  # gathered weight elements per loop step of one program
MODES = ("auto", "segment", "token")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def shrink(x: torch.Tensor, pool: torch.Tensor, batch: LoraBatch, group: LoraGroup, mode: str = "auto") -> torch.Tensor:
    """s[t, g, :r] = x[t] @ A_g(a_t).T with r = rank(a_t, g); zero elsewhere and for base-only tokens.

    x: (T, in_dim), row stride free, unit column stride; pool: (P, D) contiguous, x.dtype;
    returns s: (T, G, R) in x.dtype with R = group.max_rank.
    mode: "segment" (prefill), "token" (decode) or "auto" (segment unless runs average < 2 tokens).
    """
    _check_common(x, pool, batch, group, "shrink")
    if x.shape[1] != group.in_dim:
        raise ValueError(f"triton shrink: x has {x.shape[1]} columns, the group's in_dim is {group.in_dim}")
    num_tokens, num_targets, max_rank = x.shape[0], len(group.out_dims), group.max_rank
    s = torch.zeros(num_tokens, num_targets, max_rank, dtype=x.dtype, device=x.device)
    if num_tokens == 0 or max_rank == 0:
        return s
    block_r = _dot_block(max_rank, cap=128)
    block_k = _dot_block(group.in_dim, cap=max(MIN_DOT_BLOCK, MAX_WEIGHT_TILE // block_r))
    tiles = _pick_tiles(batch.token_adapter, mode)
    common = (
        x, pool, s, batch.page_table, group.a_offset, group.rank,
        group.in_dim, batch.page_table.shape[1], num_targets, max_rank, x.stride(0),
    )
    blocks = dict(PAGE_DIM=pool.shape[1], BLOCK_R=block_r, BLOCK_K=block_k)
    if tiles is None:
        grid = (num_tokens, num_targets, triton.cdiv(max_rank, block_r))
        _shrink_token_kernel[grid](*common, batch.token_adapter, **blocks)
    elif tiles.shape[1]:
        grid = (tiles.shape[1], num_targets, triton.cdiv(max_rank, block_r))
        _shrink_segment_kernel[grid](
            *common, tiles, tiles.shape[1], BLOCK_M=SEGMENT_BLOCK_M, UPCAST=_upcast(x), **blocks,
        )
    return s


def expand(y: torch.Tensor, s: torch.Tensor, pool: torch.Tensor, batch: LoraBatch, group: LoraGroup, mode: str = "auto") -> torch.Tensor:
    """y[t, off_g:off_g+out_g] += scale(a_t, g) * s[t, g, :r] @ B_g(a_t).T, in place; returns y.

    y: (T, sum(out_dims)), unit column stride; s: (T, G, N * R) contiguous, y.dtype, with
    N = group.shards: under tensor parallelism s holds N all-gathered shrink outputs, s[t, g, :r]
    means cat_j s[t, g, j*R : j*R + r], and B_g has N * r columns. pool: (P, D) contiguous,
    y.dtype. mode as in `shrink`.
    """
    _check_common(y, pool, batch, group, "expand")
    num_tokens, num_targets, max_rank, shards = y.shape[0], len(group.out_dims), group.max_rank, group.shards
    if y.shape[1] != sum(group.out_dims):
        raise ValueError(f"triton expand: y has {y.shape[1]} columns, the group's outputs sum to {sum(group.out_dims)}")
    if s.shape != (num_tokens, num_targets, shards * max_rank) or s.dtype != y.dtype or not s.is_contiguous():
        expected = (num_tokens, num_targets, shards * max_rank)
        raise ValueError(f"triton expand: s {tuple(s.shape)} {s.dtype} must be contiguous {expected} {y.dtype}")
    if num_tokens == 0 or max_rank == 0:
        return y
    out_dims = _device_ints(tuple(group.out_dims), y.device)
    out_offsets = _device_ints(tuple(group.out_offsets), y.device)
    block_n = _dot_block(max(group.out_dims), cap=64)
    block_r = _dot_block(shards * max_rank, cap=MAX_WEIGHT_TILE // block_n)
    tiles = _pick_tiles(batch.token_adapter, mode)
    common = (
        y, s, pool, batch.page_table, group.b_offset, group.rank, group.scale, out_dims, out_offsets,
        batch.page_table.shape[1], num_targets, max_rank, shards, y.stride(0),
    )
    blocks = dict(PAGE_DIM=pool.shape[1], BLOCK_N=block_n, BLOCK_R=block_r)
    n_blocks = triton.cdiv(max(group.out_dims), block_n)
    if tiles is None:
        _expand_token_kernel[(num_tokens, num_targets, n_blocks)](*common, batch.token_adapter, **blocks)
    elif tiles.shape[1]:
        _expand_segment_kernel[(tiles.shape[1], num_targets, n_blocks)](
            *common, tiles, tiles.shape[1], BLOCK_M=SEGMENT_BLOCK_M, UPCAST=_upcast(y), **blocks,
        )
    return y


def segment_tiles(token_adapter: torch.Tensor, block_m: int) -> torch.Tensor:
    """(3, num_tiles) int64 rows: first token, token count (<= block_m), adapter of each tile.

    A segment is a maximal run of consecutive tokens with the same adapter; base-only
    runs (-1) get no tile. token_adapter: (T,) int64.
    """
    num_tokens = token_adapter.shape[0]
    change = torch.ones(num_tokens, dtype=torch.bool, device=token_adapter.device)
    change[1:] = token_adapter[1:] != token_adapter[:-1]
    starts = change.nonzero().squeeze(1)
    lengths = torch.diff(starts, append=starts.new_tensor([num_tokens]))
    adapters = token_adapter[starts]
    keep = adapters >= 0
    starts, lengths, adapters = starts[keep], lengths[keep], adapters[keep]
    per_segment = (lengths + block_m - 1) // block_m
    segment = torch.repeat_interleave(torch.arange(len(starts), device=starts.device), per_segment)
    first_tile = torch.cumsum(per_segment, 0) - per_segment
    offset = (torch.arange(len(segment), device=starts.device) - first_tile[segment]) * block_m
    counts = torch.clamp(lengths[segment] - offset, max=block_m)
    return torch.stack([starts[segment] + offset, counts, adapters[segment]]).contiguous()


# token_adapter -> (its version, {mode: tiles}). Every layer and group of a step shares
# one token_adapter, so the tiles (and the host sync that counts them) cost once a step;
# an in-place write to the tensor bumps its version and drops the entry.
_TILES_OF_STEP: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _pick_tiles(token_adapter: torch.Tensor, mode: str) -> torch.Tensor | None:
    """The segment tiles, or None for the per-token kernel."""
    if mode not in MODES:
        raise ValueError(f"LoRA kernel mode {mode!r} is not one of {MODES}")
    if mode == "token":
        return None
    version, by_mode = _TILES_OF_STEP.get(token_adapter, (None, {}))
    if version != token_adapter._version:
        by_mode = {}
        _TILES_OF_STEP[token_adapter] = (token_adapter._version, by_mode)
    if mode not in by_mode:
        tiles = segment_tiles(token_adapter, SEGMENT_BLOCK_M)
        decode_like = 2 * tiles.shape[1] > int((token_adapter >= 0).sum())  # runs average under 2 tokens
        by_mode[mode] = None if mode == "auto" and tiles.shape[1] and decode_like else tiles
    return by_mode[mode]


@functools.lru_cache(maxsize=64)
def _device_ints(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A read-only int64 tensor of a group's static sizes, copied to the device once."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def _check_common(t: torch.Tensor, pool: torch.Tensor, batch: LoraBatch, group: LoraGroup, op: str) -> None:
    num_adapters, num_targets = batch.page_table.shape[0], len(group.out_dims)
    if t.dim() != 2 or t.stride(1) != 1 or t.shape[0] != batch.token_adapter.shape[0]:
        raise ValueError(f"triton {op}: activations {tuple(t.shape)} need unit column stride and one row per token")
    if t.dtype not in _DTYPES or pool.dtype != t.dtype or pool.dim() != 2 or not pool.is_contiguous():
        raise ValueError(f"triton {op}: pool {tuple(pool.shape)} {pool.dtype} must be contiguous, 2-D and match {t.dtype}")
    if batch.token_adapter.dtype != torch.int64 or batch.page_table.dtype != torch.int64 or not batch.page_table.is_contiguous():
        raise ValueError(f"triton {op}: token_adapter and page_table must be int64 (page_table contiguous)")
    for name in ("a_offset", "b_offset", "rank", "scale"):
        field = getattr(group, name)
        if field.shape != (num_adapters, num_targets) or not field.is_contiguous():
            raise ValueError(f"triton {op}: group.{name} {tuple(field.shape)} must be contiguous {(num_adapters, num_targets)}")
    if group.scale.dtype != torch.float32 or group.rank.dtype != torch.int64:
        raise ValueError(f"triton {op}: group.rank must be int64 and group.scale float32")
    tensors = (pool, batch.token_adapter, batch.page_table, group.a_offset, group.b_offset, group.rank, group.scale)
    if any(other.device != t.device for other in tensors):
        raise ValueError(f"triton {op}: every tensor must be on {t.device}")


def _dot_block(n: int, cap: int) -> int:
    return max(MIN_DOT_BLOCK, min(cap, triton.next_power_of_2(n)))


def _upcast(t: torch.Tensor) -> bool:
    """CPU tensors run under the interpreter, where bf16 arithmetic is wrong: use fp32 there."""
    return t.dtype == torch.bfloat16 and not t.is_cuda


# ------------------------------------------------------------------ kernels


@triton.jit
def _gather(pool_ptr, page_table_ptr, adapter, f, mask, max_pages, PAGE_DIM: tl.constexpr):
    """Elements f (any shape, int32) of the adapter's flat vector, in the pool's dtype; 0 where masked.

    PAGE_DIM is a compile-time constant (one per server), so // and % become multiplies and shifts.
    """
    page = tl.load(page_table_ptr + adapter * max_pages + f // PAGE_DIM, mask=mask, other=0)
    return tl.load(pool_ptr + page * PAGE_DIM + f % PAGE_DIM, mask=mask, other=0.0)


@triton.jit
def _operand(t, UPCAST: tl.constexpr):
    """t as a tl.dot operand: fp32 when UPCAST, else its own dtype."""
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _shrink_segment_kernel(
    x_ptr, pool_ptr, s_ptr, page_table_ptr, a_offset_ptr, rank_ptr,
    in_dim, max_pages, num_targets, max_rank, stride_x,
    tiles_ptr, num_tiles,
    PAGE_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (tile, g, r-block): s[tile rows, g, r-block] = x[tile rows] @ A_g.T[:, r-block]."""
    tile, g, r_start = tl.program_id(0), tl.program_id(1), tl.program_id(2) * BLOCK_R
    first = tl.load(tiles_ptr + tile)
    count = tl.load(tiles_ptr + num_tiles + tile)
    adapter = tl.load(tiles_ptr + 2 * num_tiles + tile)
    rank = tl.load(rank_ptr + adapter * num_targets + g).to(tl.int32)
    if r_start >= rank:
        return
    a_offset = tl.load(a_offset_ptr + adapter * num_targets + g).to(tl.int32)
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = tl.arange(0, BLOCK_M) < count
    r = r_start + tl.arange(0, BLOCK_R)
    r_ok = r < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(0, in_dim, BLOCK_K):
        k = k_start + tl.arange(0, BLOCK_K)
        k_ok = k < in_dim
        x = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_t = _gather(  # (BLOCK_K, BLOCK_R) tile of A_g.T
            pool_ptr, page_table_ptr, adapter, a_offset + r[None, :] * in_dim + k[:, None],
            k_ok[:, None] & r_ok[None, :], max_pages, PAGE_DIM,
        )
        acc += tl.dot(_operand(x, UPCAST), _operand(a_t, UPCAST), input_precision="ieee")
    s_ptrs = s_ptr + rows[:, None] * (num_targets * max_rank) + g * max_rank + r[None, :]
    tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _shrink_token_kernel(
    x_ptr, pool_ptr, s_ptr, page_table_ptr, a_offset_ptr, rank_ptr,
    in_dim, max_pages, num_targets, max_rank, stride_x,
    token_adapter_ptr,
    PAGE_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (t, g, r-block): s[t, g, r-block] = A_g[r-block] @ x[t]."""
    t, g, r_start = tl.program_id(0), tl.program_id(1), tl.program_id(2) * BLOCK_R
    adapter = tl.load(token_adapter_ptr + t)
    if adapter < 0:
        return
    rank = tl.load(rank_ptr + adapter * num_targets + g).to(tl.int32)
    if r_start >= rank:
        return
    a_offset = tl.load(a_offset_ptr + adapter * num_targets + g).to(tl.int32)
    r = r_start + tl.arange(0, BLOCK_R)
    r_ok = r < rank
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k_start in range(0, in_dim, BLOCK_K):
        k = k_start + tl.arange(0, BLOCK_K)
        k_ok = k < in_dim
        x = tl.load(x_ptr + t.to(tl.int64) * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)
        a = _gather(  # (BLOCK_R, BLOCK_K) tile of A_g
            pool_ptr, page_table_ptr, adapter, a_offset + r[:, None] * in_dim + k[None, :],
            r_ok[:, None] & k_ok[None, :], max_pages, PAGE_DIM,
        )
        acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    s_ptrs = s_ptr + t.to(tl.int64) * (num_targets * max_rank) + g * max_rank + r
    tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty), mask=r_ok)


@triton.jit
def _expand_segment_kernel(
    y_ptr, s_ptr, pool_ptr, page_table_ptr, b_offset_ptr, rank_ptr, scale_ptr, out_dims_ptr, out_offsets_ptr,
    max_pages, num_targets, max_rank, shards, stride_y,
    tiles_ptr, num_tiles,
    PAGE_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (tile, g, n-block): y[tile rows, off_g + n-block] += scale * s[tile rows, g, :r] @ B_g.T[:, n-block].

    Column c < N * r of B_g pairs with s[:, g, (c // r) * R + c % r] (shard c // r).
    """
    tile, g, n_start = tl.program_id(0), tl.program_id(1), tl.program_id(2) * BLOCK_N
    first = tl.load(tiles_ptr + tile)
    count = tl.load(tiles_ptr + num_tiles + tile)
    adapter = tl.load(tiles_ptr + 2 * num_tiles + tile)
    rank = tl.load(rank_ptr + adapter * num_targets + g).to(tl.int32)
    out_dim = tl.load(out_dims_ptr + g)
    if rank == 0 or n_start >= out_dim:
        return
    b_offset = tl.load(b_offset_ptr + adapter * num_targets + g).to(tl.int32)
    scale = tl.load(scale_ptr + adapter * num_targets + g)
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = tl.arange(0, BLOCK_M) < count
    n = n_start + tl.arange(0, BLOCK_N)
    n_ok = n < out_dim
    s_width = shards * max_rank
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c_start in range(0, shards * rank, BLOCK_R):
        c = c_start + tl.arange(0, BLOCK_R)
        c_ok = c < shards * rank
        s_cols = g * s_width + (c // rank) * max_rank + c % rank
        s = tl.load(s_ptr + rows[:, None] * (num_targets * s_width) + s_cols[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b_t = _gather(  # (BLOCK_R, BLOCK_N) tile of B_g.T, stored row-major: coalesced along n
            pool_ptr, page_table_ptr, adapter, b_offset + c[:, None] * out_dim + n[None, :],
            c_ok[:, None] & n_ok[None, :], max_pages, PAGE_DIM,
        )
        acc += tl.dot(_operand(s, UPCAST), _operand(b_t, UPCAST), input_precision="ieee")
    col = tl.load(out_offsets_ptr + g) + n
    y_ptrs = y_ptr + rows[:, None] * stride_y + col[None, :]
    y_mask = row_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _expand_token_kernel(
    y_ptr, s_ptr, pool_ptr, page_table_ptr, b_offset_ptr, rank_ptr, scale_ptr, out_dims_ptr, out_offsets_ptr,
    max_pages, num_targets, max_rank, shards, stride_y,
    token_adapter_ptr,
    PAGE_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (t, g, n-block): y[t, off_g + n-block] += scale * B_g[n-block] @ s[t, g, :r] (shards as above)."""
    t, g, n_start = tl.program_id(0), tl.program_id(1), tl.program_id(2) * BLOCK_N
    adapter = tl.load(token_adapter_ptr + t)
    if adapter < 0:
        return
    rank = tl.load(rank_ptr + adapter * num_targets + g).to(tl.int32)
    out_dim = tl.load(out_dims_ptr + g)
    if rank == 0 or n_start >= out_dim:
        return
    b_offset = tl.load(b_offset_ptr + adapter * num_targets + g).to(tl.int32)
    scale = tl.load(scale_ptr + adapter * num_targets + g)
    n = n_start + tl.arange(0, BLOCK_N)
    n_ok = n < out_dim
    s_width = shards * max_rank
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c_start in range(0, shards * rank, BLOCK_R):
        c = c_start + tl.arange(0, BLOCK_R)
        c_ok = c < shards * rank
        s_cols = g * s_width + (c // rank) * max_rank + c % rank
        s = tl.load(s_ptr + t.to(tl.int64) * (num_targets * s_width) + s_cols, mask=c_ok, other=0.0)
        b = _gather(  # (BLOCK_N, BLOCK_R) tile of B_g (B_g.T is what is stored)
            pool_ptr, page_table_ptr, adapter, b_offset + c[None, :] * out_dim + n[:, None],
            n_ok[:, None] & c_ok[None, :], max_pages, PAGE_DIM,
        )
        acc += tl.sum(b.to(tl.float32) * s.to(tl.float32)[None, :], axis=1)
    y_ptrs = y_ptr + t.to(tl.int64) * stride_y + tl.load(out_offsets_ptr + g) + n
    y = tl.load(y_ptrs, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=n_ok)
