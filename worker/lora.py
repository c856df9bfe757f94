"""LoRA in the tensor-parallel model: how an adapter is packed into pages, and the
two ways a LoRA delta joins a sharded projection (DESIGN.md, the TP table).

Packing: for each layer, one flat vector per rank, group by group
    [A_q A_k A_v | B_q B_k B_v] [A_o | B_o] [A_gate A_up | B_gate B_up] [A_down | B_down]
(targets the adapter lacks are left out), padded to whole pages. A is stored (r, in)
row-major and B transposed, (r, out) row-major, so both ops read whole contiguous rows:
the shrink dots a row of A with x, the expand adds s_i times a row of B^T to y. The
layout is the same in every layer, so one page list serves them all.

Sharding, for a group of N ranks:
- column-parallel targets (q, k, v, gate, up): A split on r (r padded to a multiple of N,
  the zero rows are exact), B split on out. The shrink outputs are all-gathered.
- row-parallel targets (o, down): A split on in, B split on out. The partial shrink is
  all-reduced, and B's rows land in this rank's columns of the base partial sum, which
  the base all-reduce then carries: no extra collective for the output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.lora import LoraBatch, lora_apply, lora_expand, lora_shrink
from .adapters import LoraWeights, target_shape
from .comm import Comm
from .config import ModelConfig
from .loader import Shard

GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
ROW_PARALLEL = ("o_proj", "down_proj")


@dataclass(frozen=True)
class TargetSlot:
    rank: int  # rows of this rank's A shard (columns of B)
    a_offset: int
    b_offset: int
    scale: float


@dataclass(frozen=True)
class AdapterLayout:
    """Where each target of an adapter sits in this rank's flat per-layer vector."""

    slots: dict[str, TargetSlot]
    length: int  # elements of the flat vector
    num_pages: int


def shard_dims(cfg: ModelConfig, target: str, shard: Shard) -> tuple[int, int]:
    """(rows of B, columns of A) on this rank: B is split on out for every target,
    A on in for the row-parallel ones."""
    out_f, in_f = target_shape(cfg, target)
    return out_f // shard.size, (in_f // shard.size if target in ROW_PARALLEL else in_f)


def shard_rank(target: str, rank: int, shard: Shard) -> int:
    """Rows of A this rank holds: column-parallel targets split r (padded to a multiple of N)."""
    if target in ROW_PARALLEL:
        return rank
    return math.ceil(rank / shard.size)


def plan_layout(ranks: dict[str, int], scales: dict[str, float], cfg: ModelConfig, shard: Shard, page_dim: int) -> AdapterLayout:
    slots, pos = {}, 0
    for targets in GROUPS.values():
        present = [t for t in targets if t in ranks]
        a_at = {}
        for t in present:
            _, in_f = shard_dims(cfg, t, shard)
            a_at[t] = pos
            pos += shard_rank(t, ranks[t], shard) * in_f
        for t in present:
            out_f, _ = shard_dims(cfg, t, shard)
            full_rank = shard_rank(t, ranks[t], shard) * (1 if t in ROW_PARALLEL else shard.size)
            slots[t] = TargetSlot(shard_rank(t, ranks[t], shard), a_at[t], pos, scales[t])
            pos += out_f * full_rank
    return AdapterLayout(slots, pos, max(1, math.ceil(pos / page_dim)))


def pack_adapter(lora: LoraWeights, layout: AdapterLayout, cfg: ModelConfig, shard: Shard, page_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """This rank's shard of every layer, ready to copy into pages: (layers, num_pages, page_dim).

    Each target is copied (and cast) for all layers at once, straight into its place: the layers'
    A (and B) stacked, then one strided copy, where a copy per layer and weight cost a reader of
    thousands of adapters a few ms each. A layer the target skips stacks zeros in its place (its
    rank is the target's in every layer that has it). Only what no weight covers (rank padding,
    the last page's tail) is zeroed besides.
    """
    flat = torch.empty(cfg.num_layers, layout.num_pages * page_dim, dtype=dtype)
    flat[:, layout.length:].zero_()
    for target, slot in layout.slots.items():
        b_rows, a_cols = shard_dims(cfg, target, shard)
        a_rows = slot.rank
        b_cols = slot.rank * (1 if target in ROW_PARALLEL else shard.size)
        pairs = [lora.weights.get((layer, target)) for layer in range(cfg.num_layers)]
        some_a, some_b = next(pair for pair in pairs if pair is not None)
        a = torch.stack([some_a.new_zeros(some_a.shape) if pair is None else pair[0] for pair in pairs])
        b = torch.stack([some_b.new_zeros(some_b.shape) if pair is None else pair[1] for pair in pairs])
        a_dst = flat[:, slot.a_offset:slot.a_offset + a_rows * a_cols].view(-1, a_rows, a_cols)
        b_dst = flat[:, slot.b_offset:slot.b_offset + b_rows * b_cols].view(-1, b_cols, b_rows).transpose(1, 2)  # B^T stored
        _copy_shard(target, a, b, a_dst, b_dst, shard)
    return flat.view(cfg.num_layers, layout.num_pages, page_dim)


def _copy_shard(target: str, a: torch.Tensor, b: torch.Tensor, a_dst: torch.Tensor, b_dst: torch.Tensor, shard: Shard) -> None:
    """Writes this rank's part of A (..., r, in) and B (..., out, r) into a_dst and b_dst, zero-padding
    the rank; leading dimensions (the layers) are copied alike."""
    n, i = shard.size, shard.rank
    out_part = b.shape[-2] // n
    if target in ROW_PARALLEL:  # A split on in, B on out
        in_part = a.shape[-1] // n
        a_dst.copy_(a[..., i * in_part:(i + 1) * in_part])
        b_dst.copy_(b[..., i * out_part:(i + 1) * out_part, :])
        return
    # column-parallel: r padded to rank_shard * n; this rank holds rows [i * rank_shard, (i + 1) * rank_shard) of A
    r, rank_shard = a.shape[-2], a_dst.shape[-2]
    real = max(0, min(rank_shard, r - i * rank_shard))
    a_dst[..., :real, :].copy_(a[..., i * rank_shard:i * rank_shard + real, :])
    a_dst[..., real:, :].zero_()
    b_dst[..., :r].copy_(b[..., i * out_part:(i + 1) * out_part, :])
    b_dst[..., r:].zero_()


def add_column_lora(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, lora: LoraBatch | None, group: str, comm: Comm) -> None:
    """y (T, this rank's fused outputs) += LoRA deltas of a column-parallel group."""
    if lora is None or group not in lora.groups:
        return
    meta = lora.groups[group]
    if comm.size == 1:  # no collective between the two: one call
        lora_apply(y, x, pool, lora, meta)
        return
    s = comm.all_gather_last(lora_shrink(x, pool, lora, meta), kind="lora_all_gather")
    lora_expand(y, s, pool, lora, meta)


def row_parallel_output(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, lora: LoraBatch | None, group: str,
                        comm: Comm) -> torch.Tensor:
    """The full output of a row-parallel projection with its LoRA deltas; y (T, out) is this rank's
    partial sum of the base.

    S-LoRA's fused communication: x_i A_i is all-reduced to (T, r), B_i's deltas go into this rank's
    columns of y, and the base all-reduce then sums the base and gathers the deltas in one collective.
    """
    if lora is not None and group in lora.groups:
        meta = lora.groups[group]
        if comm.size == 1:  # y is all of the output, and s needs no all-reduce: one call
            lora_apply(y, x, pool, lora, meta)
            return comm.all_reduce(y)
        s = comm.all_reduce(lora_shrink(x, pool, lora, meta), kind="lora_all_reduce")
        width = meta.out_dims[0]
        lora_expand(y[:, comm.rank * width:(comm.rank + 1) * width], s, pool, lora, meta)
    return comm.all_reduce(y)
