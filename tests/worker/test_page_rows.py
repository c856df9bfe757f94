"""The worker's page rows: the tensor the attention kernels read, kept across steps."""
from __future__ import annotations

from lorafleet.worker.batch import PageRows
from lorafleet.worker.step import PageTables, SeqWork, Step


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
        width = max(len(tables.seq_pages[s]) for s in ids)
        got = rows.gather(ids, width, "cpu")
        for i, s in enumerate(ids):
            pages = tables.seq_pages[s]
            assert got[i, :len(pages)].tolist() == pages
    assert rows.table.shape[0] >= 3 and rows.table.shape[1] >= 10  # it grew past 2 x 4
