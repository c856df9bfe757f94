"""Collectives per layer under tensor parallelism: the fused S-LoRA partition, the same without
fusion, and the S-LoRA paper's formula; plus the wall time of a decode step on CPU (gloo).

    .venv/bin/python bench/tp_comm.py [--tp 2 4] [--seqs 32] [--rank 16]

Counts come from the workers' own counters (worker/comm.py), for one decode step of a batch
where every sequence has its own adapter. Volumes are per rank, with ring collectives:
an all-gather of M elements in total moves (N-1)/N * M, an all-reduce 2 (N-1)/N * M.
The paper's formula for the LoRA part of attention is 5 (N-1) T r / N; with the MLP the
same reasoning gives 9 (N-1) T r / N (gate+up gathered like q+k+v, down reduced like o).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_model(folder: Path, layers: int) -> Path:
    """A random Llama of 8 query and 8 KV heads (so tp 2 and 4 divide it), hidden 512."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8,
                      num_hidden_layers=layers, vocab_size=4096, max_position_embeddings=1024)
    tmp = folder.with_name(folder.name + ".tmp")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def make_adapters(model: Path, root: Path, count: int, rank: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = [f"a{i:02d}" for i in range(count)]
    if all((root / n / "adapter_config.json").is_file() for n in names):
        return names
    shutil.rmtree(root, ignore_errors=True)
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(model)
        peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL, init_lora_weights=False))
        peft.save_pretrained(root / name)
    return names


def measure(model: Path, adapters: Path, names: list[str], tp: int, fused: bool, seqs: int, steps: int) -> dict:
    from ablations import unfused_executor  # bench/ is this script's folder

    from lorafleet.coordinator.config import EngineConfig
    from lorafleet.coordinator.engine import Engine
    from lorafleet.coordinator.sequence import Request

    cfg = EngineConfig(str(model), str(adapters), tp=tp, pool_bytes=256 * 2**20, max_num_seqs=seqs)
    engine = Engine(cfg, None if fused else unfused_executor(cfg))
    try:
        for i in range(seqs):
            engine.ensure_adapter(names[i % len(names)])
            engine.add(Request(str(i), [5 + i, 6, 7, 8], steps + 2, names[i % len(names)], ignore_eos=True))
        engine.step()  # prefill
        engine.step()  # a warm decode step
        engine.executor.call_all("comm_counts", True)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
        counts = engine.executor.call_all("comm_counts", True)[0]
        layers = engine.model.num_layers
    finally:
        engine.shutdown()
    per_layer = {k: {"calls": v["calls"] / steps / layers, "elements": v["elements"] / steps / layers}
                 for k, v in counts.items() if k.startswith("lora") or k == "all_reduce"}
    return {"per_layer": per_layer, "step_ms": 1000 * statistics.median(times)}


def ring_volume(per_layer: dict, tp: int) -> float:
    """Elements each rank sends per layer for the LoRA collectives (ring algorithms)."""
    frac = (tp - 1) / tp
    total = 0.0
    for kind, c in per_layer.items():
        if kind.endswith("all_gather"):
            total += frac * c["elements"] * tp  # a rank contributes elements; the gathered tensor is tp times that
        elif kind == "lora_all_reduce":
            total += 2 * frac * c["elements"]
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--seqs", type=int, default=32, help="decode batch size T (one token per sequence)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per configuration")
    p.add_argument("--workdir", default=str(ROOT / "bench" / ".cache" / "tp_comm"))
    args = p.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / f"llama-512-l{args.layers}", args.layers)
    names = make_adapters(model, work / f"adapters-r{args.rank}", args.seqs, args.rank)
    t, r = args.seqs, args.rank
    print(f"model: hidden 512, 8/8 heads, {args.layers} layers, float32; batch T={t} decode tokens, "
          f"{len(names)} distinct rank-{r} adapters on all seven projections; gloo on CPU", flush=True)
    rows = []
    for tp in args.tp:
        fused = measure(model, work / f"adapters-r{r}", names, tp, True, args.seqs, args.steps)
        unfused = measure(model, work / f"adapters-r{r}", names, tp, False, args.seqs, args.steps)
        rows.append((tp, fused, unfused))

    print("\nper layer and step       | tp | base all-reduce calls | LoRA calls | LoRA elements sent per rank | paper 5(N-1)Tr/N (attn) | 9(N-1)Tr/N (attn+MLP) | step ms")
    print("-" * 150)
    for tp, fused, unfused in rows:
        paper_attn = 5 * (tp - 1) * t * r / tp
        paper_all = 9 * (tp - 1) * t * r / tp
        for label, res in (("fused (S-LoRA)", fused), ("unfused (outputs gathered)", unfused)):
            pl = res["per_layer"]
            lora_calls = sum(c["calls"] for k, c in pl.items() if k.startswith("lora"))
            print(f"{label:26s}| {tp:2d} | {pl['all_reduce']['calls']:21.0f} | {lora_calls:10.0f} | "
                  f"{ring_volume(pl, tp):27.0f} | {paper_attn:23.0f} | {paper_all:21.0f} | {res['step_ms']:7.1f}")
        extra = ring_volume(unfused["per_layer"], tp) / ring_volume(fused["per_layer"], tp)
        print(f"{'':26s}| unfused moves {extra:.1f}x the LoRA elements of fused; step time unfused/fused "
              f"{unfused['step_ms'] / fused['step_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
