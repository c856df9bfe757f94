"""worker/batch.py: the page rows a worker keeps across steps for the attention kernels, and the batches
forward_batch builds from them."""
from __future__ import annotations

from lorafleet.worker.batch import PageRows, forward_batch
from lorafleet.worker.config import ModelConfig
from lorafleet.worker.loader import Shard
from lorafleet.worker.step import PageTables, SeqWork, Step

TINY = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position=128, tie_embeddings=False, qkv_bias=False)


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
    batch = forward_batch(step.seqs, rows, {}, {}, TINY, Shard(), "cpu")
    attention = batch.attention
    assert attention.page_table is rows.table
    assert attention.table_rows.tolist() == [rows.slot[3], rows.slot[1]]
    assert attention.context_lens.tolist() == [4, 3]
    owned = [rows.table[r, :c].tolist() for r, c in zip(attention.table_rows.tolist(), attention.context_lens_list)]
    assert owned == [[3, 4, 8, 9], [3, 4, 10]]
    assert batch.lora is None
