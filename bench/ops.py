"""CPU benchmark of the elementwise ops between the matmuls: the C kernels against their torch references.

At SmolLM2-135M's shapes, for each --rows (a prefill of 1024 tokens, a decode step of 64) and
each --dtype, per layer:

- residual add + RMSNorm: h += delta, then the norm (hidden 576); the reference is what the model
  did before the kernels, `h = h + delta` then kernels.ops.rms_norm;
- rotary: q (9 heads) and k (3 heads) of head_dim 64, as views of the fused q|k|v output; the
  reference is kernels.ops.rotate on each;
- silu(gate) * up: from the fused gate|up output (2 x 1536); the reference is F.silu(gate) * up.

The C kernels are kernels/cpu_ops.c through the launchers of kernels/ops.py, in place as the
model calls them. Each C result is checked against its reference before timing. Times are the best of --repeats measurements of
enough calls to last 20 ms (the machine is shared: the best is the least disturbed).

With --steps N, a second table: bench/roofline.py's prefill step (8 prompts of 128 tokens) and
decode step (64 sequences, one token each) of one engine, N rounds alternating between the C ops
and the torch references, timed by the main thread's CPU time (so other processes' load on a
shared machine does not count); the medians of the rounds, and of each round's ratio.

Run: .venv/bin/python bench/ops.py [--rows 1024 64] [--dtype bfloat16 float32] [--repeats 7] [--threads 1]
                                   [--steps 4 [--model DIR] [--adapters DIR]]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lorafleet.kernels import cpu, ops
from lorafleet.worker.config import DTYPES

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 576, 9, 3, 64, 1536
CHECK = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def best_ms(fn, repeats: int, min_seconds: float = 0.02) -> float:
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def cases(rows: int, dtype: torch.dtype) -> dict[str, tuple]:
    """op -> (the reference, the C path), each a function of no arguments."""
    gen = torch.Generator().manual_seed(rows)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    h, delta, weight = randn(rows, HIDDEN), randn(rows, HIDDEN), randn(HIDDEN)
    qkv = randn(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q = qkv[:, : HEADS * HEAD_DIM].unflatten(-1, (HEADS, HEAD_DIM))
    k = qkv[:, HEADS * HEAD_DIM: (HEADS + KV_HEADS) * HEAD_DIM].unflatten(-1, (KV_HEADS, HEAD_DIM))
    freqs = torch.arange(rows)[:, None].float() / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)
    gate_up = randn(rows, 2 * INTER)
    gate, up = gate_up.split([INTER, INTER], dim=-1)
    return {
        "add + RMSNorm": (lambda: ops.rms_norm(h + delta, weight, 1e-5),
                          lambda: ops.add_rms_norm_(h, delta, weight, 1e-5)),
        "rotary q, k": (lambda: (ops.rotate(q, cos, sin), ops.rotate(k, cos, sin)),
                        lambda: ops.rotary(q, k, cos, sin)),
        "silu(gate) * up": (lambda: F.silu(gate) * up, lambda: ops.silu_mul(gate_up)),
    }


def check(reference, fused, dtype: torch.dtype) -> None:
    want, got = reference(), fused()
    for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(g, w, **CHECK[dtype])


def engine_steps(args) -> None:
    import roofline  # bench/roofline.py, beside this file
    from lorafleet.coordinator.config import EngineConfig
    from lorafleet.coordinator.engine import Engine
    from lorafleet.worker.config import ModelConfig

    roofline.clock = time.thread_time  # one torch thread: the step runs on this thread
    steps_args = roofline.parse_args(["--model", args.model, "--repeats", "3"])
    cfg, names, c_path = ModelConfig.from_dir(args.model), roofline.adapter_names(args.adapters), cpu.ops_usable
    print(f"\nEngine steps, {args.steps} rounds, {'adapters ' + ', '.join(names) if args.adapters else 'base'}; "
          "ms of CPU time, median of the rounds (norm/rotary/activation: the residual adds included)")
    print("| dtype | step | torch | C | C / torch | norm/rotary/activation, torch | C |\n|---|---|---:|---:|---:|---:|---:|")
    for name in args.dtype:
        # no prefix cache: every round sends the same prompts, which must be computed again
        engine = Engine(EngineConfig(model_dir=args.model, adapters_dir=args.adapters, dtype=name, pool_bytes=512 * 2**20,
                                     max_num_seqs=64, max_batched_tokens=4096, prefix_cache=False))
        runs = {}
        try:
            for r in range(args.steps):
                for path in ("C", "torch") if r % 2 == 0 else ("torch", "C"):
                    cpu.ops_usable = c_path if path == "C" else (lambda t: False)
                    for kind in ("prefill", "decode"):
                        m = roofline.measure_steps(engine, cfg, steps_args, names, kind)
                        runs.setdefault((path, kind), []).append((m["seconds"], m["ops"].get("norm/rotary/activation", 0.0)))
        finally:
            cpu.ops_usable = c_path
            engine.shutdown()
        for kind in ("prefill", "decode"):
            torch_runs, c_runs = runs[("torch", kind)], runs[("C", kind)]
            median = lambda runs, i: statistics.median(run[i] for run in runs) * 1e3  # noqa: E731
            ratio = statistics.median(c[0] / t[0] for c, t in zip(c_runs, torch_runs))
            print(f"| {name} | {kind} | {median(torch_runs, 0):.1f} | {median(c_runs, 0):.1f} | {ratio:.2f} | "
                  f"{median(torch_runs, 1):.1f} | {median(c_runs, 1):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 64])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0, help="rounds of engine steps, C ops against references (0: none)")
    parser.add_argument("--model", default=None, help="for --steps (default: the demo model)")
    parser.add_argument("--adapters", default=None, help="for --steps: PEFT adapters spread over the requests")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if cpu.library() is None:
        raise SystemExit(f"the CPU kernels did not build: {cpu._failed}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), native bf16: {cpu.native_bf16()}; "
          f"ms per call, best of {args.repeats}")
    print("| dtype | rows | op | torch | C | torch / C |\n|---|---:|---|---:|---:|---:|")
    for name in args.dtype:
        dtype = DTYPES[name]
        for rows in args.rows:
            times = {}
            for op, (reference, fused) in cases(rows, dtype).items():
                check(reference, fused, dtype)
                times[op] = best_ms(reference, args.repeats), best_ms(fused, args.repeats)
                print(f"| {name} | {rows} | {op} | {times[op][0]:.3f} | {times[op][1]:.3f} | {times[op][0] / times[op][1]:.1f}x |")
            layer = [sum(t[side] * (2 if op == "add + RMSNorm" else 1) for op, t in times.items()) for side in (0, 1)]
            print(f"| {name} | {rows} | one layer: 2 norms, rotary, silu | {layer[0]:.3f} | {layer[1]:.3f} | "
                  f"{layer[0] / layer[1]:.1f}x |")
    if args.steps:
        if args.threads != 1:
            raise SystemExit("--steps times the main thread's CPU time: use --threads 1")
        import roofline

        args.model = args.model or str(roofline.DEMO_MODEL)
        engine_steps(args)

if __name__ == "__main__":
    main()
