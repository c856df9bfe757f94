"""Host work of one step, with no model: schedule() + the Step + the worker's page tables and batch
metadata (forward_batch) + postprocess(), at GPU-scale shapes. A GPU step takes 10-30 ms, so this
work must stay small and flat in context length (issue 16's target: under 2 ms on one core at 256
sequences x 4096 tokens).

    .venv/bin/python bench/host_overhead.py [--seqs 256] [--contexts 512,1024,2048,4096] [--adapters 128]

It prints the median ms per decode step and its parts, for each context length.

    .venv/bin/python bench/host_overhead.py --adapter-reads FOLDER --model MODEL [--reads 200]

instead times the loader's host work: reading, checking and packing one adapter (AdapterStore.read,
bfloat16, one thread) from a folder of PEFT adapters, with the checked header layouts kept (as a
server runs) and cleared before every read (each read then checks its header and config), the two
alternated, the files already in the page cache.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from lorafleet.coordinator.pages import PagePlan
from lorafleet.coordinator.scheduler import Scheduler, SchedulerConfig
from lorafleet.coordinator.sequence import Request
from lorafleet.worker.batch import AdapterRows, PageRows, forward_batch
from lorafleet.worker.config import ModelConfig
from lorafleet.worker.loader import Shard
from lorafleet.worker.lora import plan_layout
from lorafleet.worker.step import PageTables

# Llama-2-7B's shapes: what a GPU replica would serve
LLAMA_7B = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                       num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, max_position=8192,
                       tie_embeddings=False, qkv_bias=False)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def measure(seqs: int, context: int, adapters: int, steps: int) -> dict[str, float]:
    cfg, shard = LLAMA_7B, Shard()
    page_dim = 2 * cfg.kv_size
    layouts = {}
    for a in range(adapters):
        r = (8, 16, 32, 64)[a % 4]
        layouts[f"a{a}"] = plan_layout({t: r for t in TARGETS}, {t: 2.0 for t in TARGETS}, cfg, shard, page_dim)
    need = seqs * (context + steps + 2) + sum(lay.num_pages for lay in layouts.values())
    sched = Scheduler(SchedulerConfig(max_num_seqs=seqs, max_batched_tokens=seqs * context + seqs, max_model_len=context + steps + 4),
                      PagePlan(need), eos_ids=(), adapter_pages={n: lay.num_pages for n, lay in layouts.items()})
    for i in range(seqs):
        sched.add(Request(str(i), [7] * context, steps + 2, f"a{i % adapters}", ignore_eos=True))
    device = torch.device("cpu")
    tables, rows, adapter_rows = PageTables(), PageRows(device=device), AdapterRows(cfg, shard, device=device)

    def apply(step):  # what Worker.execute does before it builds the batch
        tables.apply(step)
        rows.apply(step)
        adapter_rows.apply(step, {n: layouts[n] for n in step.load_adapters})

    step = sched.schedule()  # the prefill of everyone: not timed
    apply(step)
    sched.postprocess([1] * len(step.seqs))
    parts = {"schedule": [], "worker tables": [], "batch metadata": [], "postprocess": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        step = sched.schedule()
        t1 = time.perf_counter()
        apply(step)
        t2 = time.perf_counter()
        forward_batch(step.seqs, rows, adapter_rows, device)
        t3 = time.perf_counter()
        sched.postprocess([1] * len(step.seqs))
        t4 = time.perf_counter()
        for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[key].append(seconds * 1e3)
    result = {k: statistics.median(v) for k, v in parts.items()}
    result["total"] = sum(result.values())
    return result


def adapter_reads(model: str, folder: str, reads: int, rounds: int) -> dict[str, float]:
    """Median ms per adapter read, {"kept": ..., "cleared": ...} (see the module's docstring)."""
    from lorafleet.worker import adapters
    from lorafleet.worker.adapter_store import AdapterStore

    cfg = ModelConfig.from_dir(model)
    store = AdapterStore(cfg, Shard(), 2 * cfg.kv_size, torch.bfloat16, max_rank=256)
    paths = sorted(p for p in Path(folder).iterdir() if (p / "adapter_config.json").is_file())[:reads]
    if not paths:
        raise SystemExit(f"{folder} holds no PEFT adapter folders")
    for path in paths:  # into the page cache
        store.read(path.name, path)
    times: dict[str, list[float]] = {"kept": [], "cleared": []}
    for _ in range(rounds):
        for how, samples in times.items():
            start = time.perf_counter()
            for path in paths:
                if how == "cleared":
                    adapters._LAYOUTS.clear()
                store.read(path.name, path)
            samples.append((time.perf_counter() - start) / len(paths) * 1e3)
    return {how: statistics.median(samples) for how, samples in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--contexts", default="512,1024,2048,4096")
    p.add_argument("--adapters", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--adapter-reads", metavar="FOLDER", help="time adapter reads from this folder instead")
    p.add_argument("--model", help="the base model of --adapter-reads")
    p.add_argument("--reads", type=int, default=200, help="adapters read per round (--adapter-reads)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.adapter_reads:
        if not args.model:
            p.error("--adapter-reads needs --model")
        r = adapter_reads(args.model, args.adapter_reads, args.reads, args.rounds)
        print(f"one adapter read, checked and packed (bfloat16, 1 thread), ms, medians of {args.rounds} rounds of "
              f"{args.reads} reads: layouts kept {r['kept']:.2f}, cleared before every read {r['cleared']:.2f} "
              f"({r['cleared'] / r['kept']:.2f}x)")
        return 0
    contexts = [int(c) for c in args.contexts.split(",")]
    print(f"host work per decode step, {args.seqs} sequences, {args.adapters} distinct adapters, Llama-2-7B shapes, "
          f"1 thread; medians of {args.steps} steps (ms)")
    header = ["context", "schedule", "worker tables", "batch metadata", "postprocess", "total"]
    print("  ".join(f"{h:>14}" for h in header))
    for context in contexts:
        r = measure(args.seqs, context, args.adapters, args.steps)
        print("  ".join([f"{context:>14}"] + [f"{r[h]:>14.2f}" for h in header[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
