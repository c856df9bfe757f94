"""Turns a Step into the tensors of one forward pass (built once, shared by every layer).

Each running sequence's KV pages sit in PageRows, a table the worker keeps on its device across
steps: a Step writes into it only its new pages, and a batch names its sequences' rows, so the
attention metadata of a step costs O(sequences + new tokens), whatever the length of the contexts.
"""
from __future__ import annotations

import torch

from ..kernels.attention import AttentionBatch
from ..kernels.lora import LoraBatch, LoraGroup
from .lora import GROUPS, ROW_PARALLEL, AdapterLayout, shard_dims
from .config import ModelConfig
from .loader import Shard
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


def forward_batch(seqs: list[SeqWork], page_rows: PageRows, adapter_pages: dict[str, list[int]],
                  layouts: dict[str, AdapterLayout], cfg: ModelConfig, shard: Shard, device) -> ForwardBatch:
    """page_rows already holds this step's new pages."""
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
        lora=lora_batch(seqs, adapter_pages, layouts, cfg, shard, device),
        logits_rows=as_long([e - 1 for e in query_start[1:]]),
    )


def lora_batch(seqs: list[SeqWork], adapter_pages: dict[str, list[int]], layouts: dict[str, AdapterLayout],
               cfg: ModelConfig, shard: Shard, device) -> LoraBatch | None:
    index: dict[str, int] = {}
    token_adapter: list[int] = []
    for w in seqs:
        if w.adapter is not None:
            index.setdefault(w.adapter, len(index))
        token_adapter += [index[w.adapter] if w.adapter is not None else -1] * len(w.token_ids)
    names = list(index)
    if not names:
        return None
    width = max(len(adapter_pages[n]) for n in names)
    table = [adapter_pages[n] + [0] * (width - len(adapter_pages[n])) for n in names]
    groups = {}
    for group, targets in GROUPS.items():
        rows = [[layouts[n].slots.get(t) for t in targets] for n in names]
        if not any(s for row in rows for s in row):
            continue
        dims = [shard_dims(cfg, t, shard) for t in targets]
        groups[group] = LoraGroup(
            in_dim=dims[0][1],
            out_dims=tuple(d[0] for d in dims),
            a_offset=torch.tensor([[s.a_offset if s else -1 for s in row] for row in rows], dtype=torch.int64, device=device),
            b_offset=torch.tensor([[s.b_offset if s else -1 for s in row] for row in rows], dtype=torch.int64, device=device),
            rank=torch.tensor([[s.rank if s else 0 for s in row] for row in rows], dtype=torch.int64, device=device),
            scale=torch.tensor([[s.scale if s else 0.0 for s in row] for row in rows], dtype=torch.float32, device=device),
            max_rank=max(s.rank for row in rows for s in row if s),
            shards=1 if targets[0] in ROW_PARALLEL else shard.size,
        )
    return LoraBatch(torch.tensor(token_adapter, dtype=torch.int64, device=device),
                     torch.tensor(table, dtype=torch.int64, device=device), groups)
