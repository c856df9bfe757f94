"""worker/batch.py: the tables a worker keeps across steps (PageRows for the attention kernels, AdapterRows
for the LoRA kernels) and the batches forward_batch builds from them."""
from __future__ import annotations

import torch

from lorafleet.worker.batch import AdapterRows, PageRows, forward_batch
from lorafleet.worker.config import ModelConfig
from lorafleet.worker.loader import Shard
from lorafleet.worker.lora import GROUPS, plan_layout
from lorafleet.worker.step import PageTables, SeqWork, Step

TINY = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position=128, tie_embeddings=False, qkv_bias=False)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
PAGE_DIM = 2 * TINY.kv_size
LAYOUTS = {
    "attn8": plan_layout({t: 8 for t in ATTN}, {t: 2.0 for t in ATTN}, TINY, Shard(), PAGE_DIM),
    "v4": plan_layout({"v_proj": 4}, {"v_proj": 0.5}, TINY, Shard(), PAGE_DIM),
    "mlp2": plan_layout({"gate_proj": 2, "down_proj": 3}, {"gate_proj": 1.5, "down_proj": 1.0}, TINY, Shard(), PAGE_DIM),
}


def test_page_rows_follow_the_page_tables():
    """The tensor rows the attention kernels read hold exactly each running sequence's pages, across
    starts (after a cached prefix too), continuations (decodes and prefill chunks), restarts (a
    preempted sequence recomputed from 0), growth and finished ids."""
    tables, rows = PageTables(), PageRows(rows=2, cols=4)
    steps = [
        Step(seqs=[SeqWork(1, [5, 6, 7], 0, [10, 11, 12], prefix=[]), SeqWork(2, [5], 0, [20], prefix=[])]),
        Step(seqs=[SeqWork(1, [8], 3, [13]), SeqWork(2, [9], 1, [21]), SeqWork(3, [1, 2], 0, [30, 31], prefix=[])]),
        Step(seqs=[SeqWork(1, [4], 4, [14]), SeqWork(3, [3], 2, [32])], finished=[2]),
        Step(seqs=[SeqWork(3, [1, 2, 3, 4, 5], 0, [40, 41, 42, 43, 44], prefix=[]), SeqWork(4, [1], 0, [50], prefix=[])], finished=[1]),
        # a start after a cached prefix: the first pages are another sequence's, read and never written
        Step(seqs=[SeqWork(5, [9, 9], 3, [60, 61], prefix=[40, 41, 42])]),
        # chunked prefill: a later chunk of several tokens continues at start > 0, past the columns so far
        Step(seqs=[SeqWork(4, [2, 3, 4, 5, 6, 7, 8, 9, 10], 1, [51, 52, 53, 54, 55, 56, 57, 58, 59]), SeqWork(3, [6], 5, [45])]),
    ]
    for step in steps:
        tables.apply(step)
        rows.apply(step)
        ids = sorted(tables.seq_pages)
        index = rows.rows_of(ids)
        assert len(set(index.tolist())) == len(ids)  # no two running sequences share a row
        for s, row in zip(ids, index.tolist()):
            pages = tables.seq_pages[s]
            assert rows.table[row, :len(pages)].tolist() == pages
    assert rows.table.shape[0] >= 3 and rows.table.shape[1] >= 10  # it grew past 2 x 4


def test_the_attention_batch_reads_the_kept_table_in_place():
    """forward_batch copies nothing of the table: the kernels get the table itself and one row index per
    sequence of the step, in step order (here not the order the rows were given out in)."""
    rows = PageRows(rows=4, cols=8)
    # sequence 3 starts after a cached prefix: sequence 1's first two pages, read through its own row
    rows.apply(Step(seqs=[SeqWork(1, [1, 2], 0, [3, 4], prefix=[]), SeqWork(2, [1], 0, [5], prefix=[]),
                          SeqWork(3, [3], 2, [8], prefix=[3, 4])]))
    step = Step(seqs=[SeqWork(3, [4], 3, [9]), SeqWork(1, [3], 2, [10])], finished=[2])
    rows.apply(step)
    batch = forward_batch(step.seqs, rows, AdapterRows(TINY, Shard()), "cpu")
    attention = batch.attention
    assert attention.page_table is rows.table
    assert attention.table_rows.tolist() == [rows.slot[3], rows.slot[1]]
    assert attention.context_lens.tolist() == [4, 3]
    owned = [rows.table[r, :c].tolist() for r, c in zip(attention.table_rows.tolist(), attention.context_lens_list)]
    assert owned == [[3, 4, 8, 9], [3, 4, 10]]
    assert batch.lora is None


def pages_for(name: str, first: int) -> list[int]:
    return list(range(first, first + LAYOUTS[name].num_pages))


def expected_group(names: list[str], key: str) -> dict[str, list]:
    slots = [[LAYOUTS[n].slots.get(t) for t in GROUPS[key]] for n in names]
    return {
        "a_offset": [[s.a_offset if s else -1 for s in row] for row in slots],
        "b_offset": [[s.b_offset if s else -1 for s in row] for row in slots],
        "rank": [[s.rank if s else 0 for s in row] for row in slots],
        "scale": [[s.scale if s else 0.0 for s in row] for row in slots],
    }


def test_a_batch_selects_its_adapters_rows_in_order_of_first_use():
    """Loads, an eviction and a reload into other pages, with the tables growing past 2 rows x 2 pages:
    the batch's page table and groups are exactly its adapters', in the order the step first names them;
    a group no adapter of the batch targets is absent."""
    rows = AdapterRows(TINY, Shard(), rows=2, cols=2)
    layouts = lambda step: {n: LAYOUTS[n] for n in step.load_adapters}  # noqa: E731
    for step in [
        Step(load_adapters={"attn8": pages_for("attn8", 100), "v4": pages_for("v4", 200)}),
        Step(load_adapters={"mlp2": pages_for("mlp2", 300)}, evicted_adapters=["attn8"]),
        Step(load_adapters={"attn8": pages_for("attn8", 400)}),
    ]:
        rows.apply(step, layouts(step))
    seqs = [SeqWork(1, [1, 2, 3], 0, [1, 2, 3], "v4", prefix=[]), SeqWork(2, [1], 0, [4], prefix=[]),
            SeqWork(3, [1, 2], 0, [5, 6], "attn8", prefix=[]), SeqWork(4, [5], 0, [7], "v4", prefix=[])]
    page_rows = PageRows()
    page_rows.apply(Step(seqs=seqs))
    lora = forward_batch(seqs, page_rows, rows, "cpu").lora
    names = ["v4", "attn8"]
    assert lora.token_adapter.tolist() == [0, 0, 0, -1, 1, 1, 0]
    width = max(LAYOUTS[n].num_pages for n in names)
    first = {"v4": 200, "attn8": 400}
    assert lora.page_table.tolist() == [pages_for(n, first[n]) + [0] * (width - LAYOUTS[n].num_pages) for n in names]
    assert set(lora.groups) == {"qkv", "o"}
    for key, group in lora.groups.items():
        expected = expected_group(names, key)
        for field, values in expected.items():
            assert getattr(group, field).tolist() == values, (key, field)
        assert group.max_rank == max(r for row in expected["rank"] for r in row)
        assert group.a_offset.is_contiguous() and group.scale.dtype == torch.float32

    only_mlp = [SeqWork(5, [1], 0, [8], "mlp2", prefix=[])]
    page_rows.apply(Step(seqs=only_mlp))
    lora = forward_batch(only_mlp, page_rows, rows, "cpu").lora
    assert set(lora.groups) == {"gate_up", "down"} and lora.page_table.tolist() == [pages_for("mlp2", 300)]
    assert lora.groups["gate_up"].rank.tolist() == [[2, 0]] and lora.groups["down"].max_rank == 3
