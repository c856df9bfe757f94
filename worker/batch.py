"""Turns a Step into the tensors of one forward pass (built once, shared by every layer).

What outlives a step sits in two tables the worker keeps on its device: PageRows (each running
sequence's KV pages) and AdapterRows (each resident adapter's pages and where its targets lie). A
Step writes into them only what it adds (new pages, loaded adapters); a batch then names its rows.
Building one costs O(sequences + new tokens + adapters), whatever the length of the contexts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.attention import AttentionBatch
from ..kernels.lora import LoraBatch, LoraGroup
from .config import ModelConfig
from .loader import Shard
from .lora import GROUPS, ROW_PARALLEL, AdapterLayout, shard_dims
from .model import ForwardBatch
from .step import SeqWork, Step


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`; to CUDA through pinned memory, so the copy does not wait for the stream."""
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _grown(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """t in the top-left corner of a zero (rows, cols) tensor of its dtype and device."""
    out = t.new_zeros((rows, cols))
    out[: t.shape[0], : t.shape[1]] = t
    return out


class PageRows:
    """Every running sequence's KV page list as a row of one int64 tensor on the device, kept across
    steps: a Step adds its new pages in one scatter (O(new tokens)), a batch names its sequences' rows
    (O(sequences)), and the attention kernels read the pages through those rows in place, so no part
    of the table is copied per step. Cells past a sequence's context hold whatever an earlier owner of
    the row left there; nothing reads them."""

    def __init__(self, rows: int = 16, cols: int = 256, device="cpu"):
        self.table = torch.zeros((rows, cols), dtype=torch.int64, device=device)
        self.slot: dict[int, int] = {}  # seq_id -> row
        self.free: list[int] = list(range(rows - 1, -1, -1))

    def apply(self, step: Step) -> None:
        """After PageTables.apply has checked the Step."""
        for seq_id in step.finished:
            row = self.slot.pop(seq_id, None)
            if row is not None:
                self.free.append(row)
        rows, cols, pages = [], [], []
        for w in step.seqs:
            if w.prefix is not None:
                if w.seq_id not in self.slot:
                    self.slot[w.seq_id] = self._row()
                rows += [self.slot[w.seq_id]] * len(w.prefix)
                cols += range(len(w.prefix))
                pages += w.prefix
            rows += [self.slot[w.seq_id]] * len(w.new_pages)
            cols += range(w.start, w.start + len(w.new_pages))
            pages += w.new_pages
        if pages:
            self._fit(max(cols) + 1)
            rows, cols, pages = to_device(torch.tensor([rows, cols, pages], dtype=torch.int64), self.table.device)
            self.table[rows, cols] = pages

    def rows_of(self, seq_ids: list[int]) -> torch.Tensor:
        """(len(seq_ids),) int64 on the table's device: the row of self.table holding each sequence's pages."""
        return to_device(torch.tensor([self.slot[s] for s in seq_ids], dtype=torch.int64), self.table.device)

    def _row(self) -> int:
        if not self.free:  # twice the rows
            rows = self.table.shape[0]
            self.table = _grown(self.table, 2 * rows, self.table.shape[1])
            self.free = list(range(2 * rows - 1, rows - 1, -1))
        return self.free.pop()

    def _fit(self, cols: int) -> None:
        if cols > self.table.shape[1]:
            self.table = _grown(self.table, self.table.shape[0], max(cols, 2 * self.table.shape[1]))


@dataclass
class _GroupRows:
    """One input group's part of AdapterRows: a row per adapter, a column per target of the group."""

    targets: tuple[str, ...]
    in_dim: int
    out_dims: tuple[int, ...]
    shards: int
    a_offset: torch.Tensor  # (rows, G) int64, -1 where the adapter lacks the target
    b_offset: torch.Tensor  # (rows, G) int64, -1 where absent
    rank: torch.Tensor  # (rows, G) int64, 0 where absent
    scale: torch.Tensor  # (rows, G) float32, 0 where absent
    max_rank: list[int]  # per row, on the host: the adapter's widest target here (0: it skips the group)

    @staticmethod
    def empty(cfg: ModelConfig, shard: Shard, targets: tuple[str, ...], rows: int, device) -> "_GroupRows":
        dims = [shard_dims(cfg, t, shard) for t in targets]
        zeros = lambda dtype: torch.zeros((rows, len(targets)), dtype=dtype, device=device)  # noqa: E731
        return _GroupRows(
            targets, in_dim=dims[0][1], out_dims=tuple(d[0] for d in dims),
            shards=1 if targets[0] in ROW_PARALLEL else shard.size,
            a_offset=zeros(torch.int64), b_offset=zeros(torch.int64), rank=zeros(torch.int64),
            scale=zeros(torch.float32), max_rank=[0] * rows,
        )

    def write(self, row: int, layout: AdapterLayout) -> None:
        slots = [layout.slots.get(t) for t in self.targets]
        device = self.rank.device
        ints = torch.tensor([[s.a_offset if s else -1 for s in slots], [s.b_offset if s else -1 for s in slots],
                             [s.rank if s else 0 for s in slots]], dtype=torch.int64)
        self.a_offset[row], self.b_offset[row], self.rank[row] = to_device(ints, device)
        self.scale[row] = to_device(torch.tensor([s.scale if s else 0.0 for s in slots], dtype=torch.float32), device)
        self.max_rank[row] = max((s.rank for s in slots if s), default=0)

    def grow(self, rows: int) -> None:
        cols = len(self.targets)
        self.a_offset, self.b_offset, self.rank, self.scale = (
            _grown(t, rows, cols) for t in (self.a_offset, self.b_offset, self.rank, self.scale))
        self.max_rank += [0] * (rows - len(self.max_rank))

    def select(self, index: torch.Tensor, max_rank: int) -> LoraGroup:
        """The LoraGroup of the adapters in rows `index`, in that order."""
        return LoraGroup(
            in_dim=self.in_dim, out_dims=self.out_dims,
            a_offset=self.a_offset.index_select(0, index), b_offset=self.b_offset.index_select(0, index),
            rank=self.rank.index_select(0, index), scale=self.scale.index_select(0, index),
            max_rank=max_rank, shards=self.shards,
        )


class AdapterRows:
    """Every resident adapter's page list and, per input group, its targets' offsets, ranks and scales,
    as rows of tensors on the device kept across steps. A row is written when a Step loads the adapter
    and freed when one evicts it, so a batch takes its adapters' rows with one index_select per tensor:
    O(adapters), nothing rebuilt from Python lists."""

    def __init__(self, cfg: ModelConfig, shard: Shard, rows: int = 16, cols: int = 64, device="cpu"):
        self.pages = torch.zeros((rows, cols), dtype=torch.int64, device=device)
        self.num_pages: list[int] = [0] * rows  # per row, on the host
        self.groups = {key: _GroupRows.empty(cfg, shard, targets, rows, device) for key, targets in GROUPS.items()}
        self.slot: dict[str, int] = {}  # adapter name -> row
        self.free: list[int] = list(range(rows - 1, -1, -1))

    def apply(self, step: Step, layouts: dict[str, AdapterLayout]) -> None:
        """After PageTables.apply has checked the Step; layouts: those of step.load_adapters."""
        for name in step.evicted_adapters:
            row = self.slot.pop(name, None)
            if row is not None:
                self.free.append(row)
        for name, pages in step.load_adapters.items():
            row = self.slot.get(name)
            if row is None:
                row = self.slot[name] = self._row()
            self._fit(len(pages))
            padded = torch.zeros(self.pages.shape[1], dtype=torch.int64)  # 0 past its pages, as LoraBatch says
            padded[: len(pages)] = torch.tensor(pages, dtype=torch.int64)
            self.pages[row] = to_device(padded, self.pages.device)
            self.num_pages[row] = len(pages)
            for group in self.groups.values():
                group.write(row, layouts[name])

    def select(self, names: list[str]) -> tuple[torch.Tensor, dict[str, LoraGroup]]:
        """The page table (len(names), most pages) of these resident adapters, and the groups any of
        them targets, each with a row per adapter in names' order."""
        rows = [self.slot[n] for n in names]
        index = to_device(torch.tensor(rows, dtype=torch.int64), self.pages.device)
        width = max(self.num_pages[r] for r in rows)
        groups = {}
        for key, group in self.groups.items():
            max_rank = max(group.max_rank[r] for r in rows)
            if max_rank:
                groups[key] = group.select(index, max_rank)
        return self.pages[:, :width].index_select(0, index), groups

    def _row(self) -> int:
        if not self.free:  # twice the rows
            rows = self.pages.shape[0]
            self.pages = _grown(self.pages, 2 * rows, self.pages.shape[1])
            self.num_pages += [0] * rows
            for group in self.groups.values():
                group.grow(2 * rows)
            self.free = list(range(2 * rows - 1, rows - 1, -1))
        return self.free.pop()

    def _fit(self, cols: int) -> None:
        if cols > self.pages.shape[1]:
            self.pages = _grown(self.pages, self.pages.shape[0], max(cols, 2 * self.pages.shape[1]))


def forward_batch(seqs: list[SeqWork], page_rows: PageRows, adapter_rows: AdapterRows, device) -> ForwardBatch:
    """page_rows and adapter_rows already hold this step's new pages and loaded adapters."""
    ids, positions, slots = [], [], []
    query_start, context_lens = [0], []
    for w in seqs:
        ids += w.token_ids
        positions += range(w.start, w.start + len(w.token_ids))
        slots += w.new_pages
        query_start.append(len(ids))
        context_lens.append(w.start + len(w.token_ids))
    decode = [i for i, w in enumerate(seqs) if len(w.token_ids) == 1]
    as_long = lambda x: to_device(torch.tensor(x, dtype=torch.int64), device)  # noqa: E731
    attention = AttentionBatch(
        query_start=as_long(query_start), context_lens=as_long(context_lens),
        page_table=page_rows.table, table_rows=page_rows.rows_of([w.seq_id for w in seqs]),
        slots=as_long(slots), decode_rows=as_long(decode),
        prefill_rows=[i for i, w in enumerate(seqs) if len(w.token_ids) != 1],
        query_start_list=query_start, context_lens_list=context_lens,
    )
    return ForwardBatch(
        input_ids=as_long(ids), positions=as_long(positions), attention=attention,
        lora=lora_batch(seqs, adapter_rows, device),
        logits_rows=as_long([e - 1 for e in query_start[1:]]),
    )


def lora_batch(seqs: list[SeqWork], adapter_rows: AdapterRows, device) -> LoraBatch | None:
    """The step's adapters in order of first use; None when no sequence has one."""
    index: dict[str, int] = {}
    token_adapter: list[int] = []
    for w in seqs:
        a = -1 if w.adapter is None else index.setdefault(w.adapter, len(index))
        token_adapter += [a] * len(w.token_ids)
    if not index:
        return None
    page_table, groups = adapter_rows.select(list(index))
    return LoraBatch(to_device(torch.tensor(token_adapter, dtype=torch.int64), device), page_table, groups)
