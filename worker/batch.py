"""Turns a Step into the tensors of one forward pass (built once, shared by every layer)."""
from __future__ import annotations

import torch

from ..kernels.attention import AttentionBatch
from ..kernels.lora import LoraBatch, LoraGroup
from .lora import GROUPS, ROW_PARALLEL, AdapterLayout, shard_dims
from .config import ModelConfig
from .loader import Shard
from .model import ForwardBatch
from .step import SeqWork, Step


class PageRows:
    """Every running sequence's KV page list as a row of one int64 tensor, kept across steps: a Step
    adds its new pages in one scatter (O(new tokens)), and a batch gathers its rows in one copy, so the
    host work of a step does not grow with the context in Python."""

    def __init__(self, rows: int = 16, cols: int = 256):
        self.table = torch.zeros((rows, cols), dtype=torch.int64)
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
            self.table[torch.tensor(rows), torch.tensor(cols)] = torch.tensor(pages, dtype=torch.int64)

    def gather(self, seq_ids: list[int], width: int, device) -> torch.Tensor:
        """(len(seq_ids), width): each sequence's pages, then whatever the row held (never read: positions
        past its context)."""
        index = torch.tensor([self.slot[s] for s in seq_ids])
        return self.table[:, :width].index_select(0, index).to(device)

    def _row(self) -> int:
        if not self.free:  # twice the rows
            grown = torch.zeros((2 * self.table.shape[0], self.table.shape[1]), dtype=torch.int64)
            grown[: self.table.shape[0]] = self.table
            self.free = list(range(grown.shape[0] - 1, self.table.shape[0] - 1, -1))
            self.table = grown
        return self.free.pop()

    def _fit(self, cols: int) -> None:
        if cols > self.table.shape[1]:
            grown = torch.zeros((self.table.shape[0], max(cols, 2 * self.table.shape[1])), dtype=torch.int64)
            grown[:, : self.table.shape[1]] = self.table
            self.table = grown


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
    table = page_rows.gather([w.seq_id for w in seqs], max(context_lens), device)
    decode = [i for i, w in enumerate(seqs) if len(w.token_ids) == 1]
    as_long = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    attention = AttentionBatch(
        query_start=as_long(query_start), context_lens=as_long(context_lens), page_table=table,
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
