"""bench/offline.py's lorafleet side: what the throughput benchmarks (offline.py, vllm_side.py) time.

The timed runs send the same prompts again and again (a warm-up, then repeat after repeat); the
peers compute each of them, so lorafleet must too: its engine there has no prefix cache. With
one, every repeat after the first would be served from the cache (this measured lorafleet 2x
faster than it is, in bench/vllm_side.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import offline  # noqa: E402


def test_the_benchmark_engine_computes_every_repeat_again(tiny_models, tmp_path):
    cfg = offline.BenchConfig(model=str(tiny_models["llama_gqa"]), workdir=str(tmp_path), adapters=2, requests=6,
                              prompt_len=(8, 24), output_len=(2, 4), pool_bytes="32MiB", max_num_seqs=4)
    requests = offline.without_adapters(offline.make_requests(cfg, offline.vocab_size(cfg.model)))
    engine = offline.lorafleet_engine(cfg, None)
    try:
        runs = [offline.run_lorafleet_inprocess(engine, "lorafleet", requests, None) for _ in range(2)]
        queried, hit = engine.scheduler.prefix_tokens[None]
    finally:
        engine.shutdown()
    assert runs[0].outputs == runs[1].outputs
    assert queried == 2 * sum(len(r["prompt_token_ids"]) for r in requests)
    assert hit == 0, "a repeat was served from the prefix cache"
